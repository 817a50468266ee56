package librarycache

import (
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// newCache opens a cache in a fresh directory with test defaults (fast, silent), started, and
// closes it at cleanup.
func newCache(t *testing.T, cfg Config, regs ...*libimages.Registry) *Cache {
	t.Helper()
	cfg = trust(cfg, regs...)
	if cfg.StoreDir == "" {
		cfg.StoreDir = filepath.Join(t.TempDir(), "store")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if err := c.Start(t.Context()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	return c
}

func must[T any](t testing.TB) func(T, error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// pushLibrary pushes a dd-lib-<lang>-init image as repo datadog/dd-lib-<lang>-init:<tag> and
// returns the tag reference and the image.
func pushLibrary(t *testing.T, reg *libimages.Registry, lang, tag string) (string, v1.Image) {
	t.Helper()
	l := nodeplugintest.PushLibrary(t, reg, lang, tag)
	return l.Ref, l.Image
}

func equalTrees(t *testing.T, got, want map[string]string) {
	t.Helper()
	for k, v := range want {
		g, ok := got[k]
		if !ok {
			t.Errorf("file %s is missing, want %q", k, v)
		} else if g != v {
			t.Errorf("file %s = %q, want %q", k, g, v)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("unexpected file %s", k)
		}
	}
}

// metricValue reads a counter or gauge (prometheus/testutil would pull a module the project
// does not use).
func metricValue(t *testing.T, c prometheus.Collector) float64 {
	t.Helper()
	ch := make(chan prometheus.Metric, 1)
	c.Collect(ch)
	var m dto.Metric
	if err := (<-ch).Write(&m); err != nil {
		t.Fatal(err)
	}
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	t.Fatalf("not a counter or gauge: %v", &m)
	return 0
}

// trust lets the cache pull from the test registries: their repositories are allowed and
// they are reached over plain HTTP, as an administrator configures a registry without TLS.
func trust(cfg Config, regs ...*libimages.Registry) Config {
	for _, r := range regs {
		cfg.AllowedRepositories = append(cfg.AllowedRepositories, r.Addr())
		cfg.InsecureRegistries = append(cfg.InsecureRegistries, r.Addr())
	}
	return cfg
}

// waitUntil polls cond until it holds or timeout passes, and reports whether it held. It waits
// in real time, for downloads and workers running in other goroutines that no clock drives.
func waitUntil(t *testing.T, timeout time.Duration, cond func() bool) bool {
	t.Helper()
	err := wait.PollUntilContextTimeout(t.Context(), 10*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		return cond(), nil
	})
	return err == nil
}

// checkMessage checks the message of a cache error: it says each of want, and it does not
// name image, which the driver's message names once (the cache says what failed, not again
// which image).
func checkMessage(t *testing.T, err error, image string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("message %q does not say %q", err, w)
		}
	}
	if image != "" && strings.Contains(err.Error(), image) {
		t.Errorf("message %q names the image %s again: the driver's message names it", err, image)
	}
}
