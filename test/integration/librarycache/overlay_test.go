package librarycache_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// mountOverlay mounts lower dirs (top first) with a private upper and work dir under base, as
// the driver does for one volume, and unmounts it at cleanup.
func mountOverlay(t *testing.T, base string, lowers ...string) string {
	t.Helper()
	target, upper, work := filepath.Join(base, "mnt"), filepath.Join(base, "upper"), filepath.Join(base, "work")
	for _, d := range []string{target, upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s,index=off,metacopy=off", strings.Join(lowers, ":"), upper, work)
	if err := unix.Mount("overlay", target, "overlay", 0, opts); err != nil {
		t.Fatalf("mount overlay %s: %v", opts, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", target, err)
		}
	})
	return target
}

// TestHundredConcurrentPublishes: 100 concurrent publishes of
// one uncached library make exactly one pull, all 100 volumes show the same content, and a
// write in one volume is seen in none of the other 99 nor in the cache.
func TestHundredConcurrentPublishes(t *testing.T) {
	testenv.RequireRoot(t)
	reg := libimages.Start(t)
	java := nodeplugintest.PushLibrary(t, reg, "java", "v1.42.0")
	c := newCache(t, librarycache.Config{}, reg)

	const volumes = 100
	layers := make([]library.Layer, volumes)
	errs := make([]error, volumes)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range volumes {
		wg.Go(func() {
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			layers[i], errs[i] = c.Layer(ctx, volumeattrs.Library{Image: java.Ref, Source: libref.LibrarySource})
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	manifests, maxLayer, err := reg.ImageFetches(java.Repo, java.Image)
	if err != nil {
		t.Fatal(err)
	}
	if manifests != 1 || maxLayer != 1 {
		t.Fatalf("the registry served the manifest %d times and a layer up to %d times; want exactly one pull", manifests, maxLayer)
	}
	if heads := reg.Count(func(q libimages.Request) bool { return q.Method == http.MethodHead }); heads != 1 {
		t.Errorf("the tag was resolved %d times, want once", heads)
	}

	want := libimages.LibraryFiles("java", "v1.42.0")
	volDirs := make([]string, volumes)
	root := t.TempDir()
	for i, l := range layers {
		if l != layers[0] {
			t.Fatalf("publish %d got %+v, publish 0 got %+v", i, l, layers[0])
		}
		volDirs[i] = mountOverlay(t, filepath.Join(root, fmt.Sprint(i)), l.Dir)
	}
	for i, v := range volDirs {
		if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, v), want); d != "" {
			t.Fatalf("volume %d: %s", i, d)
		}
	}

	// Volume 0 writes a new file and rewrites a library file (an overlayfs copy-up).
	if err := os.WriteFile(filepath.Join(volDirs[0], "written-by-pod-0"), []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(volDirs[0], "dd-java-agent.jar"), []byte("patched by pod 0"), 0o644); err != nil {
		t.Fatal(err)
	}
	got0 := nodeplugintest.ReadTree(t, volDirs[0])
	if got0["written-by-pod-0"] != "mine" || got0["dd-java-agent.jar"] != "patched by pod 0" {
		t.Fatalf("volume 0 does not see its own writes: %v", got0)
	}
	for i, v := range volDirs[1:] {
		if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, v), want); d != "" {
			t.Errorf("volume %d sees volume 0's writes: %s", i+1, d)
		}
	}
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, layers[0].Dir), want); d != "" {
		t.Errorf("the cache sees volume 0's writes: %s", d)
	}
}

// TestLibrariesComposeIntoOneOverlay stacks the injector, two language packages at their
// injector-layout targets and the generated ld.so.preload into one overlay, as the driver
// does for a volume with several libraries.
func TestLibrariesComposeIntoOneOverlay(t *testing.T) {
	testenv.RequireRoot(t)
	reg := libimages.Start(t)
	inj, err := libimages.Injector("0.31.0")
	if err != nil {
		t.Fatal(err)
	}
	injRef, err := reg.Push("datadog/apm-inject", "0", inj)
	if err != nil {
		t.Fatal(err)
	}
	var lowers []string
	c := newCache(t, librarycache.Config{}, reg)
	preload, err := c.GeneratedFiles(map[string]string{volumeattrs.PreloadFile: libref.LauncherPath + "\n"})
	if err != nil {
		t.Fatal(err)
	}
	lowers = append(lowers, preload)
	l, err := c.Layer(t.Context(), volumeattrs.Library{Image: injRef, Source: libref.InjectorSource, Target: libref.InjectorTarget})
	if err != nil {
		t.Fatal(err)
	}
	lowers = append(lowers, l.Dir)
	want := merge(map[string]string{volumeattrs.PreloadFile: libref.LauncherPath + "\n"}, nodeplugintest.Prefixed(libref.InjectorTarget, libimages.InjectorFiles("0.31.0")))
	for _, lang := range []string{"python", "js"} {
		lib := nodeplugintest.PushLibrary(t, reg, lang, "v3")
		l, err := c.Layer(t.Context(), volumeattrs.Library{Image: lib.Ref, Target: libref.LanguageTarget(lang)})
		if err != nil {
			t.Fatal(err)
		}
		lowers = append(lowers, l.Dir)
		want = merge(want, nodeplugintest.Prefixed(libref.LanguageTarget(lang), libimages.LibraryFiles(lang, "v3")))
	}
	vol := mountOverlay(t, t.TempDir(), lowers...)
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, vol), want); d != "" {
		t.Errorf("composed volume: %s", d)
	}
	// The launcher that ld.so.preload names resolves inside the volume through "stable".
	launcher := filepath.Join(vol, strings.TrimPrefix(libref.LauncherPath, "/"))
	if b, err := os.ReadFile(launcher); err != nil || !strings.Contains(string(b), "launcher 0.31.0") {
		t.Errorf("launcher through the stable symlink: %q, %v", b, err)
	}
}

// TestGCNeverRemovesAMountedLibrary checks GC against this kernel's mount table: the
// driver's records are empty (inUse returns nothing) and the grace period is zero, so only
// the mount table keeps the entries alive.
func TestGCNeverRemovesAMountedLibrary(t *testing.T) {
	testenv.RequireRoot(t)
	reg := libimages.Start(t)
	image := nodeplugintest.PushLibrary(t, reg, "ruby", "v2").Ref
	c := newCache(t, librarycache.Config{GCGracePeriod: time.Nanosecond}, reg)
	view, err := c.Layer(t.Context(), volumeattrs.Library{Image: image, Target: libref.LanguageTarget("ruby")})
	if err != nil {
		t.Fatal(err)
	}
	rootLayer, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if err != nil {
		t.Fatal(err)
	}
	preload, err := c.GeneratedFiles(map[string]string{volumeattrs.PreloadFile: libref.LauncherPath + "\n"})
	if err != nil {
		t.Fatal(err)
	}
	// What the driver adds to its records: what the mount table references.
	mounted := func() (library.InUse, error) {
		table, err := mounter.New().MountTable()
		if err != nil {
			return nil, err
		}
		return library.NewInUse(mounter.ReferencedPaths(table)...), nil
	}

	base := t.TempDir()
	// A writable overlay over the view, a read-only one over the image's own directory, and a
	// bind-mounted generated file (how the driver serves a preload volume).
	rw := mountOverlayDetachable(t, filepath.Join(base, "rw"), fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s,index=off,metacopy=off", view.Dir, mk(t, base, "rw/upper"), mk(t, base, "rw/work")))
	ro := mountOverlayDetachable(t, filepath.Join(base, "ro"), fmt.Sprintf("lowerdir=%s:%s,index=off,metacopy=off", preload, rootLayer.Dir))
	bindTarget := filepath.Join(base, "ld.so.preload")
	if err := os.WriteFile(bindTarget, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(filepath.Join(preload, volumeattrs.PreloadFile), bindTarget, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	unbind := func() { _ = unix.Unmount(bindTarget, unix.MNT_DETACH) }
	t.Cleanup(unbind)

	if err := c.GC(t.Context(), mounted); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{view.Dir, rootLayer.Dir, preload} {
		if _, err := os.Stat(d); err != nil {
			t.Fatalf("GC removed %s while mounted: %v", d, err)
		}
	}
	// Unmount the overlays: only the bind mount keeps the generated file.
	rw()
	ro()
	if err := c.GC(t.Context(), mounted); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{view.Dir, rootLayer.Dir} {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("%s kept after its last mount and the grace period", d)
		}
	}
	if _, err := os.Stat(preload); err != nil {
		t.Errorf("GC removed the bind-mounted generated file: %v", err)
	}
	unbind()
	if err := c.GC(t.Context(), mounted); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(preload); err == nil {
		t.Errorf("generated file kept after its bind mount went away")
	}
}

func mk(t *testing.T, base, rel string) string {
	t.Helper()
	p := filepath.Join(base, rel)
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// mountOverlayDetachable mounts an overlay and returns a function that unmounts it (also
// run at cleanup).
func mountOverlayDetachable(t *testing.T, target, opts string) func() {
	t.Helper()
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("overlay", target, "overlay", 0, opts); err != nil {
		t.Fatalf("mount overlay %s: %v", opts, err)
	}
	var once sync.Once
	unmount := func() {
		once.Do(func() {
			if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", target, err)
			}
		})
	}
	t.Cleanup(unmount)
	return unmount
}
