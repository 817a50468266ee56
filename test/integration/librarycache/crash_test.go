package librarycache_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/eventually"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// startChild runs this test binary as a plugin process publishing image from store.
func startChild(t testing.TB, store, image, target string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	registry, _, _ := strings.Cut(image, "/")
	req, err := json.Marshal(childRequest{Registry: registry, Store: store, Image: image, Target: target})
	if err != nil {
		t.Fatal(err)
	}
	return startChildEnv(t, childEnv+"="+string(req))
}

// startChildEnv starts this test binary as a plugin process with env set.
func startChildEnv(t testing.TB, env string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), env)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, &out
}

// TestPluginKilledMidDownload kills the plugin process while it extracts a library: the
// store must hold no partial entry, and the next process must publish it.
func TestPluginKilledMidDownload(t *testing.T) {
	reg := libimages.Start(t)
	img, err := libimages.Large(32<<20, 7)
	if err != nil {
		t.Fatal(err)
	}
	image := nodeplugintest.Push(t, reg, "datadog/dd-lib-java-init", "big", img).Ref
	store := filepath.Join(t.TempDir(), "store")
	release := reg.HoldBlobs(12 << 20)
	defer release()

	child, out := startChild(t, store, image, "")
	err = eventually.Wait(t.Context(), 30*time.Second, 20*time.Millisecond, "the plugin process to extract half of the library", func(context.Context) error {
		if n := extractedBytes(store); n < 4<<20 {
			return fmt.Errorf("%d bytes extracted", n)
		}
		return nil
	})
	if err != nil {
		_ = child.Process.Kill()
		_ = child.Wait()
		t.Fatalf("%v: %s", err, out)
	}
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = child.Wait()
	if n := entries(t, filepath.Join(store, "images")); n != 0 {
		t.Fatalf("a killed download left %d entries in images/", n)
	}
	release()

	c := newCache(t, librarycache.Config{StoreDir: store}, reg)
	if n := entries(t, filepath.Join(store, "tmp")); n != 0 {
		t.Errorf("Start left %d work dirs of the killed process", n)
	}
	layer, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if err != nil {
		t.Fatalf("publish after the crash: %v", err)
	}
	files := nodeplugintest.ReadTree(t, layer.Dir)
	var total int
	for _, v := range files {
		total += len(v)
	}
	if total != 32<<20 {
		t.Errorf("library holds %d bytes, want %d", total, 32<<20)
	}
}

// extractedBytes sums the library files and downloaded layer blobs written in the store's
// tmp/ so far.
func extractedBytes(store string) int64 {
	var n int64
	_ = filepath.WalkDir(filepath.Join(store, "tmp"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && (strings.HasSuffix(p, ".jar") || strings.HasPrefix(d.Name(), "layer-")) {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

func entries(t *testing.T, dir string) int {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return len(des)
}
