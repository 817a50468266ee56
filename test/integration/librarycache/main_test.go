// Package librarycache_test exercises the library cache end to end: real overlayfs mounts
// over the directories it hands out (as root), a plugin process killed mid-download, and the
// benchmarks of its costs (first volume versus a plain pull, peak RSS while extracting).
package librarycache_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
)

// The test binary re-executes itself as a plugin process for the crash and RSS measurements:
// childEnv carries a childRequest as JSON.
const childEnv = "APM_CSI_LIBRARYCACHE_CHILD"

type childRequest struct {
	// Registry is the test registry's host:port: allowed, and reached over plain HTTP.
	Registry string
	Store    string
	Image    string
	Target   string
}

func TestMain(m *testing.M) {
	if req := os.Getenv(childEnv); req != "" {
		os.Exit(runChild(req))
	}
	if req := os.Getenv(childManyEnv); req != "" {
		os.Exit(runChildMany(req))
	}
	os.Exit(m.Run())
}

// runChild is the plugin process: open the store, publish one library, report on stdout.
func runChild(raw string) int {
	var req childRequest
	if err := json.Unmarshal([]byte(raw), &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	c, err := startChildCache(req.Store, req.Registry)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	layer, err := c.Layer(ctx, volumeattrs.Library{Image: req.Image, Target: req.Target})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(layer.Dir)
	// The peak resident memory of this process. (The rusage of a child is no use here: Go
	// starts children with vfork, and the kernel counts the parent's memory before exec.)
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			fmt.Println(line)
		}
	}
	return 0
}

// newCache opens a cache that may pull from reg (an allowed repository reached over plain
// HTTP, as an --insecure-registry).
func newCache(t testing.TB, cfg librarycache.Config, reg *libimages.Registry) *librarycache.Cache {
	t.Helper()
	cfg.AllowedRepositories = append(cfg.AllowedRepositories, reg.Addr())
	cfg.InsecureRegistries = append(cfg.InsecureRegistries, reg.Addr())
	if cfg.StoreDir == "" {
		cfg.StoreDir = filepath.Join(t.TempDir(), "store")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	c, err := librarycache.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return c
}

func merge(maps ...map[string]string) map[string]string {
	out := map[string]string{}
	for _, m := range maps {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

// startChildCache opens and starts the library cache of a plugin process, with the test
// registry allowed and reached over plain HTTP.
func startChildCache(store, registry string) (*librarycache.Cache, error) {
	c, err := librarycache.New(librarycache.Config{StoreDir: store, Logger: slog.New(slog.DiscardHandler),
		AllowedRepositories: []string{registry}, InsecureRegistries: []string{registry}})
	if err != nil {
		return nil, err
	}
	if err := c.Start(context.Background()); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}
