// Package librarycache_test exercises the library cache end to end: real overlayfs mounts
// over the directories it hands out (as root), a plugin process killed mid-download, and the
// benchmarks of the issue (first volume versus a plain pull, peak RSS while extracting).
package librarycache_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// The test binary re-executes itself as a plugin process for the crash and RSS measurements:
// childEnv carries a childRequest as JSON.
const childEnv = "APM_CSI_LIBRARYCACHE_CHILD"

type childRequest struct {
	Store  string
	Image  string
	Target string
}

func TestMain(m *testing.M) {
	if req := os.Getenv(childEnv); req != "" {
		os.Exit(runChild(req))
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
	c, err := librarycache.New(librarycache.Config{StoreDir: req.Store, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	if err := c.Start(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
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

func newCache(t testing.TB, cfg librarycache.Config) *librarycache.Cache {
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

// readTree returns the regular files below dir (relative path -> content), following the
// symlinks that stay inside it as a container would.
func readTree(t testing.TB, dir string) map[string]string {
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
			if resolved := filepath.Join(filepath.Dir(p), target); strings.HasPrefix(resolved, dir+"/") {
				for k, v := range readTree(t, resolved) {
					out[filepath.Join(rel, k)] = v
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func prefixed(prefix string, files map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range files {
		out[filepath.Join(prefix, k)] = v
	}
	return out
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

func diffTrees(got, want map[string]string) string {
	var d []string
	for k, v := range want {
		if g, ok := got[k]; !ok {
			d = append(d, "missing "+k)
		} else if g != v {
			d = append(d, fmt.Sprintf("%s = %q, want %q", k, g, v))
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			d = append(d, "unexpected "+k)
		}
	}
	return strings.Join(d, "; ")
}
