package librarycache

import (
	"errors"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
)

// TestZstdWindowBombRefused: a zstd layer that declares a 512 MiB window is refused at its
// frame header, before the decoder allocates the window (a decoder that honours it takes the
// plugin far over its memory limit). The error names the window and the limit.
func TestZstdWindowBombRefused(t *testing.T) {
	reg := libimages.Start(t)
	img := must[v1.Image](t)(libimages.ZstdWindowBomb(29, 600<<20))
	must[string](t)(reg.Push("hostile/zstd-window", "v1", img))
	c := newCache(t, Config{}, reg)
	image := reg.Repo("hostile/zstd-window") + ":v1"
	_, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if !errors.Is(err, library.ErrImageRejected) {
		t.Fatalf("Layer = %v, want ErrImageRejected for a 512 MiB zstd window", err)
	}
	t.Logf("refused: %v", err)
	checkMessage(t, err, image, "window", "536870912", "8388608")
}

// TestZstdLayerWithinWindowServed: zstd layers made with ordinary settings (a window within
// the limit) are decoded and served.
func TestZstdLayerWithinWindowServed(t *testing.T) {
	reg := libimages.Start(t)
	img := must[v1.Image](t)(libimages.ZstdWindowBomb(22, 1<<20))
	must[string](t)(reg.Push("hostile/zstd-small", "v1", img))
	c := newCache(t, Config{}, reg)
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: reg.Repo("hostile/zstd-small") + ":v1"}); err != nil {
		t.Fatalf("Layer = %v, want a zstd layer with a 4 MiB window served", err)
	}
}

// TestOversizedManifestRefused: a manifest larger than the manifest cap is refused while it
// is read, instead of being held in memory whole (go-containerregistry allows 100 MiB).
func TestOversizedManifestRefused(t *testing.T) {
	reg := libimages.Start(t)
	img := must[v1.Image](t)(libimages.OversizedManifest(5 << 20))
	must[string](t)(reg.Push("hostile/big-manifest", "v1", img))
	c := newCache(t, Config{}, reg)
	image := reg.Repo("hostile/big-manifest") + ":v1"
	_, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if !errors.Is(err, library.ErrImageRejected) {
		t.Fatalf("Layer = %v, want ErrImageRejected for a 5 MiB manifest", err)
	}
	t.Logf("refused: %v", err)
	if !strings.Contains(err.Error(), "manifest") || !strings.Contains(err.Error(), "4194304") {
		t.Errorf("message %q should name the manifest and the 4194304 byte limit", err)
	}
}

// TestDirectoryBombCountsAgainstCap: 20,000 empty directories hold no file bytes but take
// 20,000 inodes and blocks; with a 1 MiB cap the image is refused.
func TestDirectoryBombCountsAgainstCap(t *testing.T) {
	reg := libimages.Start(t)
	img := must[v1.Image](t)(libimages.DirectoryBomb(20_000))
	must[string](t)(reg.Push("hostile/dirs", "v1", img))
	c := newCache(t, Config{MaxLibraryBytes: 1 << 20}, reg)
	image := reg.Repo("hostile/dirs") + ":v1"
	_, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if !errors.Is(err, library.ErrImageRejected) {
		t.Fatalf("Layer = %v, want ErrImageRejected: 20,000 directories exceed a 1 MiB cap", err)
	}
	t.Logf("refused: %v", err)
	if !strings.Contains(err.Error(), "1048576 byte limit") {
		t.Errorf("message %q should name the byte limit", err)
	}
}

// TestDirectoryBombChargedToBudget: with a cap that admits it, a layer of directories and
// each view of it are charged a block per directory, so the disk budget sees what they use.
func TestDirectoryBombChargedToBudget(t *testing.T) {
	reg := libimages.Start(t)
	img := must[v1.Image](t)(libimages.DirectoryBomb(2_000))
	must[string](t)(reg.Push("hostile/dirs", "v1", img))
	c := newCache(t, Config{}, reg)
	image := reg.Repo("hostile/dirs") + ":v1"
	for _, lang := range []string{"java", "python"} {
		if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: image, Target: libref.LanguageTarget(lang)}); err != nil {
			t.Fatal(err)
		}
	}
	c.store.mu.Lock()
	defer c.store.mu.Unlock()
	const want = 2_000 * 4096
	if len(c.store.images) != 1 || len(c.store.views) != 2 {
		t.Fatalf("%d images, %d views; want 1 and 2", len(c.store.images), len(c.store.views))
	}
	for _, e := range c.store.images {
		if e.meta.Bytes < want {
			t.Errorf("image charged %d bytes, want at least %d (a block per directory)", e.meta.Bytes, want)
		}
	}
	for _, e := range c.store.views {
		if e.meta.Bytes < want {
			t.Errorf("view %s charged %d bytes, want at least %d (a block per directory)", e.meta.Target, e.meta.Bytes, want)
		}
	}
}

// TestRejectionSurvivesRestart: a rejected image is remembered in the store, so a plugin
// that restarts (or crash-loops) does not download it again until the rejection expires.
func TestRejectionSurvivesRestart(t *testing.T) {
	reg := libimages.Start(t)
	img := must[v1.Image](t)(libimages.ZstdWindowBomb(29, 1<<20))
	must[string](t)(reg.Push("hostile/zstd-window", "v1", img))
	image := reg.Repo("hostile/zstd-window") + ":v1"
	store := filepath.Join(t.TempDir(), "store")
	clk := clocktesting.NewFakeClock(time.Now())

	first, err := New(trust(Config{StoreDir: store, Clock: clk, Logger: slog.New(slog.DiscardHandler)}, reg))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.Layer(t.Context(), volumeattrs.Library{Image: image}); !errors.Is(err, library.ErrImageRejected) {
		t.Fatalf("Layer = %v, want ErrImageRejected", err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if err := reg.WaitQuiet(100*time.Millisecond, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	reg.ResetCounts()

	second := newCache(t, Config{StoreDir: store, Clock: clk}, reg)
	_, err = second.Layer(t.Context(), volumeattrs.Library{Image: image})
	if !errors.Is(err, library.ErrImageRejected) || !strings.Contains(err.Error(), "window") {
		t.Fatalf("Layer after a restart = %v, want the remembered rejection", err)
	}
	byDigest := func(q libimages.Request) bool {
		return q.Method == http.MethodGet && (q.Kind == "blob" || q.Kind == "manifest" && strings.HasPrefix(q.Ref, "sha256:"))
	}
	if n := reg.Count(byDigest); n != 0 {
		t.Errorf("after a restart the rejected image was fetched again (%d manifest or blob GETs)", n)
	}

	// Once the rejection expires, the image is tried again.
	clk.Step(rejectionTTL + time.Second)
	_, err = second.Layer(t.Context(), volumeattrs.Library{Image: image})
	if !errors.Is(err, library.ErrImageRejected) {
		t.Fatalf("Layer after expiry = %v, want a fresh rejection", err)
	}
	if n := reg.Count(byDigest); n == 0 {
		t.Error("an expired rejection still kept the image from being fetched")
	}
}

// TestDiskBudgetRefusesNewLibraries: once the cache is at its disk budget, a new library is
// refused with a retryable ResourceExhausted error, even though what fills the cache is in
// use (so GC cannot free it); cached libraries are still served.
func TestDiskBudgetRefusesNewLibraries(t *testing.T) {
	reg := libimages.Start(t)
	javaRef, _ := pushLibrary(t, reg, "java", "v1")
	rubyRef, _ := pushLibrary(t, reg, "ruby", "v1")
	c := newCache(t, Config{DiskBudget: 4096}, reg)
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: javaRef}); err != nil {
		t.Fatal(err)
	}
	_, err := c.Layer(t.Context(), volumeattrs.Library{Image: rubyRef})
	if !errors.Is(err, library.ErrCacheFull) {
		t.Fatalf("Layer over the disk budget = %v, want ErrCacheFull", err)
	}
	t.Logf("refused: %v", err)
	checkMessage(t, err, rubyRef, "disk budget of 4096 bytes", "--cache-disk-budget")
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: javaRef}); err != nil {
		t.Errorf("a cached library over the budget: %v, want it served", err)
	}
}

// TestDefaultDiskBudget: without a configured budget, the cache may use 20% of its
// filesystem.
func TestDefaultDiskBudget(t *testing.T) {
	c := newCache(t, Config{})
	var st unix.Statfs_t
	if err := unix.Statfs(c.Dir(), &st); err != nil {
		t.Fatal(err)
	}
	want := int64(st.Blocks) * int64(st.Bsize) / 100 * 20
	if c.cfg.DiskBudget != want {
		t.Errorf("default disk budget = %d, want 20%% of the filesystem = %d", c.cfg.DiskBudget, want)
	}
}
