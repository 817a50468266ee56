package librarycache

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

func set(paths ...string) func() (library.InUse, error) {
	return func() (library.InUse, error) { return library.NewInUse(paths...), nil }
}

// gcFixture is a cache with two cached libraries, on a fake clock.
type gcFixture struct {
	c          *Cache
	clk        *clocktesting.FakeClock
	reg        *libimages.Registry
	java, ruby string
	javaLayer  library.Layer
	rubyLayer  library.Layer
	javaView   library.Layer
	preload    string
}

func newGCFixture(t *testing.T, cfg Config) *gcFixture {
	t.Helper()
	f := &gcFixture{reg: libimages.Start(t), clk: clocktesting.NewFakeClock(time.Now())}
	f.java, _ = pushLibrary(t, f.reg, "java", "v1")
	f.ruby, _ = pushLibrary(t, f.reg, "ruby", "v1")
	cfg.Clock = f.clk
	f.c = newCache(t, cfg, f.reg)
	var err error
	if f.javaLayer, err = f.c.Layer(t.Context(), volumeattrs.Library{Image: f.java}); err != nil {
		t.Fatal(err)
	}
	if f.javaView, err = f.c.Layer(t.Context(), volumeattrs.Library{Image: f.java, Target: libref.LanguageTarget("java")}); err != nil {
		t.Fatal(err)
	}
	if f.rubyLayer, err = f.c.Layer(t.Context(), volumeattrs.Library{Image: f.ruby}); err != nil {
		t.Fatal(err)
	}
	if f.preload, err = f.c.GeneratedFiles(map[string]string{volumeattrs.PreloadFile: libref.LauncherPath}); err != nil {
		t.Fatal(err)
	}
	return f
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func TestGCRemovesOnlyUnusedPastGrace(t *testing.T) {
	f := newGCFixture(t, Config{GCGracePeriod: time.Hour})
	// Within the grace period nothing goes, used or not.
	if err := f.c.GC(t.Context(), set()); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{f.javaLayer.Dir, f.javaView.Dir, f.rubyLayer.Dir, f.preload} {
		if !exists(d) {
			t.Errorf("%s removed within the grace period", d)
		}
	}
	f.clk.Step(2 * time.Hour)
	// The java view is in use (so its image is too), ruby and the preload file are not.
	if err := f.c.GC(t.Context(), set(f.javaView.Dir)); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{f.javaLayer.Dir, f.javaView.Dir} {
		if !exists(d) {
			t.Errorf("%s removed while in use", d)
		}
	}
	for _, d := range []string{f.rubyLayer.Dir, f.preload} {
		if exists(d) {
			t.Errorf("%s kept past the grace period though unused", d)
		}
	}
	if n := metricValue(t, f.c.store.metrics.libraries); n != 1 {
		t.Errorf("libraries gauge = %v, want 1", n)
	}
	if n := metricValue(t, f.c.store.metrics.librariesInUse); n != 1 {
		t.Errorf("libraries in use = %v, want 1", n)
	}
	if n := metricValue(t, f.c.store.metrics.evictions.WithLabelValues(evictUnused)); n != 2 {
		t.Errorf("evictions{unused} = %v, want 2", n)
	}
	// Being in use counts as a use: after the view goes away, the grace period starts again.
	if err := f.c.GC(t.Context(), set()); err != nil {
		t.Fatal(err)
	}
	if !exists(f.javaLayer.Dir) || !exists(f.javaView.Dir) {
		t.Errorf("java removed right after its last use")
	}
	// A removed library is downloaded again when asked for.
	f.reg.ResetCounts()
	layer, err := f.c.Layer(t.Context(), volumeattrs.Library{Image: f.ruby})
	if err != nil {
		t.Fatal(err)
	}
	if layer.Dir != f.rubyLayer.Dir || len(nodeplugintest.ReadTree(t, layer.Dir)) == 0 {
		t.Errorf("re-download = %v", layer)
	}
	if n := f.reg.Count(func(q libimages.Request) bool { return q.Kind == "blob" }); n == 0 {
		t.Errorf("ruby was served without downloading it again")
	}
	if n := dirEntries(t, filepath.Join(f.c.Dir(), tmpDir)); n != 0 {
		t.Errorf("GC left %d dirs in tmp/", n)
	}
}

// TestGCKeepsEveryEntryAPathInUseLiesIn: the set the driver builds names what its records and
// the mount table reference: an overlay's lower dirs (an image's directory, a view) and a file
// bind-mounted from inside an entry (the preload file). Each keeps its entry, a view keeps its
// image, and once the set no longer names them they go.
func TestGCKeepsEveryEntryAPathInUseLiesIn(t *testing.T) {
	f := newGCFixture(t, Config{GCGracePeriod: time.Hour})
	f.clk.Step(2 * time.Hour)
	used := set(f.javaView.Dir, f.rubyLayer.Dir, filepath.Join(f.preload, volumeattrs.PreloadFile))
	if err := f.c.GC(t.Context(), used); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{f.javaView.Dir, f.javaLayer.Dir, f.rubyLayer.Dir, f.preload} {
		if !exists(d) {
			t.Errorf("%s removed while a path in use lies in it", d)
		}
	}
	// Seen in use is a use: the grace period starts again.
	f.clk.Step(2 * time.Hour)
	if err := f.c.GC(t.Context(), set()); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{f.javaView.Dir, f.javaLayer.Dir, f.rubyLayer.Dir, f.preload} {
		if exists(d) {
			t.Errorf("%s kept after its mounts went away", d)
		}
	}
}

func TestGCRemovesNothingWhenUnsure(t *testing.T) {
	f := newGCFixture(t, Config{GCGracePeriod: time.Hour})
	f.clk.Step(2 * time.Hour)
	err := f.c.GC(t.Context(), func() (library.InUse, error) { return nil, errors.New("mount table unreadable") })
	if err == nil || !strings.Contains(err.Error(), "nothing removed") {
		t.Errorf("GC with failing inUse = %v, want an error saying nothing was removed", err)
	}
	for _, d := range []string{f.javaLayer.Dir, f.rubyLayer.Dir, f.preload} {
		if !exists(d) {
			t.Errorf("%s removed although GC could not tell what is in use", d)
		}
	}
}

func TestGCKeepsBusyAndPrefetched(t *testing.T) {
	reg := libimages.Start(t)
	pre, _ := pushLibrary(t, reg, "js", "v1")
	other, _ := pushLibrary(t, reg, "php", "v1")
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCache(t, Config{GCGracePeriod: time.Hour, Prefetch: []string{pre}, Clock: clk}, reg)
	preLayer, err := c.Layer(t.Context(), volumeattrs.Library{Image: pre})
	if err != nil {
		t.Fatal(err)
	}
	otherLayer, err := c.Layer(t.Context(), volumeattrs.Library{Image: other})
	if err != nil {
		t.Fatal(err)
	}
	clk.Step(2 * time.Hour)
	// A publish between lookup and hand-out holds the entry.
	busy := c.pull.acquireDigest(otherLayer.Digest)
	if err := c.GC(t.Context(), set()); err != nil {
		t.Fatal(err)
	}
	if !exists(otherLayer.Dir) {
		t.Errorf("busy entry removed")
	}
	c.store.release(busy)
	// The acquisition was a use: the grace period starts again.
	clk.Step(2 * time.Hour)
	if err := c.GC(t.Context(), set()); err != nil {
		t.Fatal(err)
	}
	if exists(otherLayer.Dir) {
		t.Errorf("unused entry kept")
	}
	if !exists(preLayer.Dir) {
		t.Errorf("prefetched library removed")
	}
}

func TestGCDiskBudget(t *testing.T) {
	reg := libimages.Start(t)
	var refs []string
	for _, lang := range []string{"java", "js", "python"} {
		r, _ := pushLibrary(t, reg, lang, "v1")
		refs = append(refs, r)
	}
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCache(t, Config{GCGracePeriod: 24 * time.Hour, Clock: clk}, reg)
	// Used an hour apart, oldest first: java, js, python; the last an hour ago, past the
	// protection of a fresh hand-out.
	var layers []library.Layer
	for _, r := range refs {
		l, err := c.Layer(t.Context(), volumeattrs.Library{Image: r, Target: "x"})
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, l)
		clk.Step(time.Hour)
	}
	// Each image holds a few hundred bytes: a budget of one byte less than all three.
	c.store.mu.Lock()
	var total int64
	for _, l := range layers {
		total += c.store.images[strings.TrimPrefix(l.Digest, "sha256:")].meta.Bytes
	}
	c.cfg.DiskBudget = total - 1
	c.store.mu.Unlock()

	// java is in use, so the least recently used unreferenced library is js.
	if err := c.GC(t.Context(), set(layers[0].Dir)); err != nil {
		t.Fatal(err)
	}
	if !exists(layers[0].Dir) {
		t.Errorf("the in-use library was evicted for the budget")
	}
	if exists(layers[1].Dir) {
		t.Errorf("the least recently used unreferenced library (and its view) was kept")
	}
	if !exists(layers[2].Dir) {
		t.Errorf("more was evicted than the budget needs")
	}
	if n := metricValue(t, c.store.metrics.evictions.WithLabelValues(evictBudget)); n != 2 {
		t.Errorf("evictions{budget} = %v, want 2 (the image and its view)", n)
	}
}

func TestStartRemovesLeftovers(t *testing.T) {
	reg := libimages.Start(t)
	image, _ := pushLibrary(t, reg, "java", "v1")
	store := filepath.Join(t.TempDir(), "store")
	c := newCache(t, Config{StoreDir: store}, reg)
	layer, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	// What a crash leaves: a half-extracted download, an entry dir without its metadata (a
	// reboot before the data reached the disk), stray names.
	leftovers := []string{
		filepath.Join(store, tmpDir, "p1.2-pull-0123456789abcdef", "rootfs", "datadog-init"),
		filepath.Join(store, "images", strings.Repeat("ab", 32), "rootfs"),
		filepath.Join(store, "views", "not-a-key"),
		filepath.Join(store, "generated", strings.Repeat("cd", 32)),
	}
	for _, d := range leftovers {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c2 := newCache(t, Config{StoreDir: store}, reg)
	for _, d := range leftovers {
		if exists(d) {
			t.Errorf("leftover %s survived Start", d)
		}
	}
	reg.ResetCounts()
	again, err := c2.Layer(t.Context(), volumeattrs.Library{Image: image})
	if err != nil || again != layer {
		t.Errorf("after restart = %v, %v; want %v", again, err, layer)
	}
	if n := len(reg.Requests()); n != 0 {
		t.Errorf("a complete entry was not reused after the restart (%d requests)", n)
	}
	if n := metricValue(t, c2.store.metrics.evictions.WithLabelValues(evictOrphan)); n != 3 {
		t.Errorf("evictions{orphan} = %v, want 3", n)
	}
}

func TestCloseDuringDownloadLeavesNothing(t *testing.T) {
	reg := libimages.Start(t)
	large, err := libimages.Large(8<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Push("datadog/dd-lib-java-init", "large", large); err != nil {
		t.Fatal(err)
	}
	image := reg.Repo("datadog/dd-lib-java-init") + ":large"
	store := filepath.Join(t.TempDir(), "store")
	c := newCache(t, Config{StoreDir: store}, reg)
	release := reg.HoldBlobs(3 << 20)
	defer release()
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if _, err := c.Layer(ctx, volumeattrs.Library{Image: image}); !errors.Is(err, library.ErrDownloadInProgress) {
		t.Fatalf("Layer = %v, want in progress", err)
	}
	// Wait until the extraction has written part of the library.
	if !waitUntil(t, 10*time.Second, func() bool { return partial(t, store) }) {
		t.Fatal("the download never wrote anything")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if n := dirEntries(t, filepath.Join(store, "images")); n != 0 {
		t.Errorf("an interrupted download left %d entries", n)
	}
	if n := dirEntries(t, filepath.Join(store, tmpDir)); n != 0 {
		t.Errorf("an interrupted download left %d work dirs", n)
	}
	release()
	c2 := newCache(t, Config{StoreDir: store}, reg)
	layer, err := c2.Layer(t.Context(), volumeattrs.Library{Image: image})
	if err != nil {
		t.Fatalf("publish after the interruption: %v", err)
	}
	if got := len(nodeplugintest.ReadTree(t, layer.Dir)); got != 2 {
		t.Errorf("library has %d files, want 2", got)
	}
}

// partial reports whether a download has written part of a layer blob or a library file into
// tmp/.
func partial(t *testing.T, store string) bool {
	found := false
	_ = filepath.WalkDir(filepath.Join(store, tmpDir), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if strings.HasSuffix(p, ".jar") {
			found = true
		}
		if strings.HasPrefix(d.Name(), "layer-") {
			if info, err := d.Info(); err == nil && info.Size() > 0 {
				found = true
			}
		}
		return nil
	})
	return found
}

func TestStoreLocked(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	newCache(t, Config{StoreDir: store})
	_, err := lockStore(store, 300*time.Millisecond, clocktesting.NewFakeClock(time.Now()))
	if err == nil || !strings.Contains(err.Error(), "locked by another apm-csi-node process (pid "+strconv.Itoa(os.Getpid())) {
		t.Errorf("second lock = %v, want an error naming the holder", err)
	}
}

func readMeta(t *testing.T, dir string) entryMeta {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, metaFile))
	if err != nil {
		t.Fatal(err)
	}
	var m entryMeta
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func waitDurable(t *testing.T, dir string) {
	t.Helper()
	if !waitUntil(t, 10*time.Second, func() bool { return readMeta(t, dir).Durable }) {
		t.Fatalf("%s never became durable", dir)
	}
}

// TestDurabilityAcrossRestarts: entries are flushed in the background; an entry left
// unflushed by a crashed process of this boot is flushed at the next start, one from an
// earlier boot (a power loss may have torn it) is removed.
func TestDurabilityAcrossRestarts(t *testing.T) {
	reg := libimages.Start(t)
	javaRef, _ := pushLibrary(t, reg, "java", "v1")
	jsRef, _ := pushLibrary(t, reg, "js", "v1")
	store := filepath.Join(t.TempDir(), "store")
	c := newCache(t, Config{StoreDir: store}, reg)
	java, err := c.Layer(t.Context(), volumeattrs.Library{Image: javaRef})
	if err != nil {
		t.Fatal(err)
	}
	js, err := c.Layer(t.Context(), volumeattrs.Library{Image: jsRef})
	if err != nil {
		t.Fatal(err)
	}
	entryDir := func(l library.Layer) string {
		return filepath.Join(store, "images", strings.TrimPrefix(l.Digest, "sha256:"))
	}
	waitDurable(t, entryDir(java))
	waitDurable(t, entryDir(js))
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	unflush := func(l library.Layer, boot string) {
		m := readMeta(t, entryDir(l))
		m.Durable, m.BootID = false, boot
		b, _ := json.Marshal(m)
		if err := os.WriteFile(filepath.Join(entryDir(l), metaFile), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	unflush(java, readBootID())
	unflush(js, "an-earlier-boot")

	c2 := newCache(t, Config{StoreDir: store}, reg)
	if exists(entryDir(js)) {
		t.Errorf("an unflushed entry from an earlier boot survived the start")
	}
	waitDurable(t, entryDir(java))
	reg.ResetCounts()
	if _, err := c2.Layer(t.Context(), volumeattrs.Library{Image: javaRef}); err != nil {
		t.Fatal(err)
	}
	if n := len(reg.Requests()); n != 0 {
		t.Errorf("the flushed entry was downloaded again (%d requests)", n)
	}
}

// TestGCWaitsForAnEntryBeingRecordedDurable: a GC pass must not run while the durability
// worker rewrites an entry's entry.json. Removing the entry under the rewrite raced the new
// file into a directory being deleted, and the removal failed with "directory not empty".
func TestGCWaitsForAnEntryBeingRecordedDurable(t *testing.T) {
	reg := libimages.Start(t)
	ref, _ := pushLibrary(t, reg, "php", "v1")
	c := newCache(t, Config{GCGracePeriod: time.Nanosecond}, reg)
	gcCouldRun := make(chan bool, 1)
	gcDone := make(chan error, 1)
	var once sync.Once
	// The pass may start only once Layer has returned: until then nothing holds the entry,
	// and a pass with a grace period of 1 ns would rightly evict it under the download.
	layerReturned := make(chan struct{})
	c.store.beforeDurableRewrite = func() {
		once.Do(func() {
			select {
			case <-layerReturned:
			case <-time.After(time.Minute):
			}
			free := c.store.gcMu.TryLock()
			if free {
				c.store.gcMu.Unlock()
			}
			gcCouldRun <- free
			go func() { gcDone <- c.GC(context.Background(), set()) }()
		})
	}
	layer, err := c.Layer(t.Context(), volumeattrs.Library{Image: ref})
	close(layerReturned)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case free := <-gcCouldRun:
		if free {
			t.Errorf("a GC pass could start while an entry was being recorded durable")
		}
	case <-time.After(time.Minute):
		t.Fatal("the durability worker never rewrote the entry")
	}
	if err := <-gcDone; err != nil {
		t.Fatalf("GC started during a durability rewrite: %v", err)
	}
	if exists(layer.Dir) {
		t.Errorf("unused entry kept by the GC pass that waited for its durability rewrite")
	}
}
