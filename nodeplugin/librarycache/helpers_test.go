package librarycache

import (
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/test/libimages"
)

// newCache opens a cache in a fresh directory with test defaults (fast, silent), started, and
// closes it at cleanup.
func newCache(t *testing.T, cfg Config) *Cache {
	t.Helper()
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
	img := must[v1.Image](t)(libimages.Library(lang, tag))
	repo := "datadog/" + libref.PackageName(lang)
	if _, err := reg.Push(repo, tag, img); err != nil {
		t.Fatal(err)
	}
	return reg.Repo(repo) + ":" + tag, img
}

// readTree returns the regular files below dir (relative path -> content), following
// symlinks inside it as a container would see them.
func readTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		switch {
		case d.Type().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out[rel] = string(b)
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			resolved := filepath.Join(filepath.Dir(p), target)
			if !strings.HasPrefix(resolved, dir+"/") {
				return nil
			}
			sub := readTree(t, resolved)
			for k, v := range sub {
				out[filepath.Join(rel, k)] = v
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func equalTrees(t *testing.T, got, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("file %s = %q, want %q", k, got[k], v)
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
