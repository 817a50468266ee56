package library

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	testingclock "k8s.io/utils/clock/testing"

	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/eventually"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// TestHundredConcurrentPublishes: "100 concurrent publishes of one uncached library: the
// registry sees exactly one pull of it (count at the registry), all 100 volumes show identical
// content, and a write in one volume is seen in none of the other 99 nor in the cache." The
// volume is the webhook's injector layout: apm-inject + python + js + the ld.so.preload file,
// four lower dirs in one overlay per pod, every publish through NodePublishVolume.
func TestHundredConcurrentPublishes(t *testing.T) {
	reg := libimages.Start(t)
	p := startPlugin(t, options{registry: reg})
	vol := pushInjectorVolume(t, reg, "1.42.0")
	reg.ResetCounts()

	const volumes = 100
	targets := make([]string, volumes)
	for i := range targets {
		targets[i] = p.Target(fmt.Sprintf("pod-%d", i), "datadog-auto-instrumentation")
	}
	errs := make([]error, volumes)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range volumes {
		wg.Go(func() {
			<-start
			errs[i] = p.Publish(fmt.Sprintf("csi-%d", i), targets[i], nodeplugintest.Ephemeral(vol.attrs(), fmt.Sprintf("pod-%d", i)), false)
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}

	// Exactly one pull of each image: one manifest GET, each layer blob fetched once from its
	// repository, one tag resolution.
	for _, l := range vol.all() {
		manifests, maxLayer := imageFetches(t, reg, l)
		if manifests != 1 || maxLayer != 1 {
			t.Errorf("%s: the registry served its manifest %d times and a layer up to %d times; want exactly one pull", l.Ref, manifests, maxLayer)
		}
		if heads := reg.Count(func(q libimages.Request) bool {
			return q.Method == http.MethodHead && q.Kind == "manifest" && q.Repo == l.Repo
		}); heads != 1 {
			t.Errorf("%s: tag resolved %d times, want once", l.Ref, heads)
		}
	}

	// One overlay per volume, over the same four shared lower dirs, each with its own upper.
	first := nodeplugintest.EntryAt(t, targets[0])
	lowers := first.LowerDirs()
	if first.FsType != "overlay" || len(lowers) != 4 {
		t.Fatalf("volume 0 is %s with lower dirs %q; want an overlay of the preload file and three libraries", first.FsType, lowers)
	}
	uppers := map[string]bool{}
	for i, target := range targets {
		e := nodeplugintest.EntryAt(t, target)
		if !slices.Equal(e.LowerDirs(), lowers) {
			t.Fatalf("volume %d lower dirs %q, volume 0 %q", i, e.LowerDirs(), lowers)
		}
		upper, _ := e.Option("upperdir")
		if upper == "" || uppers[upper] {
			t.Fatalf("volume %d upper dir %q is missing or shared", i, upper)
		}
		uppers[upper] = true
		if n := nodeplugintest.CountMounts(t, target); n != 1 {
			t.Fatalf("volume %d has %d mounts stacked", i, n)
		}
	}

	want := vol.files()
	for i, target := range targets {
		if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, target), want); d != "" {
			t.Fatalf("volume %d: %s", i, d)
		}
	}
	// The launcher that ld.so.preload names resolves inside the volume.
	if b, err := os.ReadFile(filepath.Join(targets[0], strings.TrimPrefix(libref.LauncherPath, "/"))); err != nil || !strings.Contains(string(b), "launcher 1.42.0") {
		t.Fatalf("launcher through the volume: %q, %v", b, err)
	}

	// Pod 0 writes a new file and rewrites a library file (overlayfs copies it up: the lower
	// file is a hardlink of the cached image's inode, which must not change).
	const marker = "pod-0-was-here"
	pyFile := filepath.Join(libref.LanguageTarget("python"), "ddtrace/__init__.py")
	writeFile(t, filepath.Join(targets[0], "tracer-"+marker+".log"), marker)
	writeFile(t, filepath.Join(targets[0], pyFile), "# patched by "+marker)
	got0 := nodeplugintest.ReadTree(t, targets[0])
	if got0["tracer-"+marker+".log"] != marker || got0[pyFile] != "# patched by "+marker {
		t.Fatalf("volume 0 does not see its own writes: %s", nodeplugintest.DiffTrees(got0, want))
	}
	for i, target := range targets[1:] {
		if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, target), want); d != "" {
			t.Errorf("volume %d sees volume 0's writes: %s", i+1, d)
		}
	}
	if leaked := filesContaining(t, p.store, marker); len(leaked) != 0 {
		t.Errorf("volume 0's writes reached the cache: %q", leaked)
	}
	upper0, _ := first.Option("upperdir")
	if inUpper := filesContaining(t, upper0, marker); len(inUpper) != 2 {
		t.Errorf("volume 0's writes in its upper dir: %q, want the two files", inUpper)
	}

	for i := range volumes {
		wg.Go(func() { errs[i] = p.Unpublish(fmt.Sprintf("csi-%d", i), targets[i]) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("unpublish %d: %v", i, err)
		}
	}
	p.assertNothingAllocated(t)
	for i, target := range targets {
		if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("target %d left after unpublish: %v", i, err)
		}
	}
}

// TestRegistryStopped: "Registry stopped: a cached tag still publishes; an uncached one gets
// Unavailable with a clear message". The tag TTL is tiny, so every publish of the cached tags
// asks the (stopped) registry first and falls back to the last known digest; a restart of the
// plugin during the outage keeps that knowledge.
func TestRegistryStopped(t *testing.T) {
	reg := libimages.Start(t)
	p := startPlugin(t, options{registry: reg, tagTTL: time.Nanosecond})
	vol := pushInjectorVolume(t, reg, "1.0.0")
	ruby := nodeplugintest.PushLibrary(t, reg, "ruby", "2.0.0")

	// A first pod on the node caches the libraries, then goes away.
	warm := p.Target("warm", "apm")
	p.MustPublish("csi-warm", warm, nodeplugintest.Ephemeral(vol.attrs(), "warm"), false)
	p.MustUnpublish("csi-warm", warm)

	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	reg.ResetCounts()

	cached := p.Target("cached", "apm")
	p.MustPublish("csi-cached", cached, nodeplugintest.Ephemeral(vol.attrs(), "cached"), false)
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, cached), vol.files()); d != "" {
		t.Fatalf("cached volume during the outage: %s", d)
	}

	// The same layout with a language this node never pulled.
	withRuby := vol
	withRuby.langs = []string{"python", "ruby"}
	withRuby.libs = maps.Clone(vol.libs)
	withRuby.libs["ruby"] = ruby
	withRuby.versions = maps.Clone(vol.versions)
	withRuby.versions["ruby"] = "2.0.0"
	uncached := p.Target("uncached", "apm")
	err := p.Publish("csi-uncached", uncached, nodeplugintest.Ephemeral(withRuby.attrs(), "uncached"), false)
	checkUnavailable(t, err, ruby.Ref, "not cached")
	if _, err := os.Lstat(uncached); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the failed publish left its target: %v", err)
	}
	if recs := p.Driver.Records(); len(recs) != 1 || recs[0].VolumeID != "csi-cached" {
		t.Errorf("records after the failed publish: %+v", recs)
	}
	if dirs := p.overlayDirs(); len(dirs) != 1 {
		t.Errorf("overlay dirs after the failed publish: %q, want only the cached volume's", dirs)
	}

	// The plugin restarts during the outage: the cached tags still publish (their digests are
	// remembered on disk), the uncached one still gets Unavailable.
	p.Restart()
	afterRestart := p.Target("after-restart", "apm")
	p.MustPublish("csi-after-restart", afterRestart, nodeplugintest.Ephemeral(vol.attrs(), "after-restart"), false)
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, afterRestart), vol.files()); d != "" {
		t.Fatalf("cached volume after a restart during the outage: %s", d)
	}
	err = p.Publish("csi-uncached", uncached, nodeplugintest.Ephemeral(withRuby.attrs(), "uncached"), false)
	checkUnavailable(t, err, ruby.Ref, "not cached")

	// The registry comes back: kubelet's retry succeeds.
	if err := reg.Start(); err != nil {
		t.Fatal(err)
	}
	p.MustPublish("csi-uncached", uncached, nodeplugintest.Ephemeral(withRuby.attrs(), "uncached"), false)
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, uncached), withRuby.files()); d != "" {
		t.Fatalf("volume after the registry came back: %s", d)
	}
	for id, target := range map[string]string{"csi-cached": cached, "csi-after-restart": afterRestart, "csi-uncached": uncached} {
		p.MustUnpublish(id, target)
	}
	p.assertNothingAllocated(t)
}

// checkUnavailable checks a publish error: gRPC Unavailable (non-final: kubelet retries) with
// a message that names the image and says why.
func checkUnavailable(t testing.TB, err error, image string, why ...string) {
	t.Helper()
	checkStatus(t, err, codes.Unavailable, image, why...)
}

func checkStatus(t testing.TB, err error, code codes.Code, image string, why ...string) {
	t.Helper()
	st, ok := status.FromError(err)
	if err == nil || !ok || st.Code() != code {
		t.Fatalf("publish: %v; want %s", err, code)
	}
	if !strings.Contains(st.Message(), image) {
		t.Errorf("the message does not name the image %s: %s", image, st.Message())
	}
	for _, w := range why {
		if !strings.Contains(st.Message(), w) {
			t.Errorf("the message does not say %q: %s", w, st.Message())
		}
	}
}

// TestSlowFirstDownload: with a stalled registry and a short publish budget, publish returns
// Unavailable while the download is still stalled (it does not wait for it), nothing is left
// allocated, the download goes on in the background, and kubelet's retry after it completes
// succeeds, with the registry having served a single pull.
func TestSlowFirstDownload(t *testing.T) {
	reg := libimages.Start(t)
	p := startPlugin(t, options{registry: reg, budget: 300 * time.Millisecond})
	java := nodeplugintest.PushLibrary(t, reg, "java", "1.30.0")
	reg.ResetCounts()
	release := reg.HoldBlobs(0)
	defer release()

	// Direct layout (java at the volume root), writable: a successful publish would allocate a
	// record, an upper/work dir and a mounted target.
	attrs := nodeplugintest.Ephemeral((&volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Libraries: []volumeattrs.Library{{Image: java.Ref}}}).Attributes(), "slow")
	target := p.Target("slow", "apm")
	for attempt := range 3 {
		start := time.Now()
		err := p.Publish("csi-slow", target, attrs, false)
		// The blobs are still held: the call came back without waiting for the download.
		t.Logf("attempt %d while the registry stalls: %s: %v", attempt, time.Since(start).Round(time.Millisecond), err)
		checkUnavailable(t, err, java.Ref, "still downloading")
		if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("the failed publish left its target: %v", err)
		}
		p.assertNothingAllocated(t)
		if t.Failed() {
			t.FailNow()
		}
	}
	// Retries join the download in progress instead of starting new ones.
	digest, err := java.Image.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if n := reg.ManifestFetches(java.Repo, digest.String()); n != 1 {
		t.Errorf("manifest fetched %d times while stalled, want 1 (one download in the background)", n)
	}

	release()
	eventually.Require(t, t.Context(), time.Minute, 50*time.Millisecond, "kubelet's retried publish to succeed once the registry resumed", func(context.Context) error {
		err := p.Publish("csi-slow", target, attrs, false)
		if err != nil && status.Code(err) != codes.Unavailable {
			return eventually.Stop(fmt.Errorf("retry after the registry resumed: %w", err))
		}
		return err
	})
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, target), libimages.LibraryFiles("java", "1.30.0")); d != "" {
		t.Fatalf("volume after the download completed: %s", d)
	}
	if manifests, maxLayer := imageFetches(t, reg, java); manifests != 1 || maxLayer != 1 {
		t.Errorf("the registry served the manifest %d times and a layer up to %d times; want one pull", manifests, maxLayer)
	}
	p.MustUnpublish("csi-slow", target)
	p.assertNothingAllocated(t)
}

// TestRestartDuringFirstDownload: the plugin restarts while a first download is stalled.
// Shutting down does not wait for the registry, the new process removes the abandoned work,
// and kubelet's retry downloads the library afresh and publishes it.
func TestRestartDuringFirstDownload(t *testing.T) {
	reg := libimages.Start(t)
	p := startPlugin(t, options{registry: reg, budget: 300 * time.Millisecond})
	java := nodeplugintest.PushLibrary(t, reg, "java", "1.31.0")
	release := reg.HoldBlobs(0)
	defer release()
	attrs := nodeplugintest.Ephemeral((&volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Libraries: []volumeattrs.Library{{Image: java.Ref}}}).Attributes(), "pod")
	target := p.Target("pod", "apm")
	checkUnavailable(t, p.Publish("csi-pod", target, attrs, false), java.Ref, "still downloading")

	stopped := make(chan struct{})
	go func() {
		p.Stop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(time.Minute):
		t.Fatal("the plugin does not stop while a download is stalled")
	}
	p.Start()
	if left := p.storeEntries(); len(left) != 0 {
		t.Errorf("the restarted plugin kept the abandoned download: %q", left)
	}
	release()
	eventually.Require(t, t.Context(), time.Minute, 50*time.Millisecond, "kubelet's retried publish to succeed after the restart", func(context.Context) error {
		err := p.Publish("csi-pod", target, attrs, false)
		if err != nil && status.Code(err) != codes.Unavailable {
			return eventually.Stop(fmt.Errorf("retry after the restart: %w", err))
		}
		return err
	})
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, target), libimages.LibraryFiles("java", "1.31.0")); d != "" {
		t.Fatalf("volume: %s", d)
	}
	p.MustUnpublish("csi-pod", target)
	p.assertNothingAllocated(t)
}

// TestRestart: "Restart: after the plugin restarts, existing pod mounts keep working,
// unpublishing a volume published before the restart frees everything, and no orphan
// upper/work dir or library remains" (after GC with a tiny grace period).
func TestRestart(t *testing.T) {
	reg := libimages.Start(t)
	p := startPlugin(t, options{registry: reg, grace: time.Nanosecond})
	vol := pushInjectorVolume(t, reg, "0.9.0")
	java := nodeplugintest.PushLibrary(t, reg, "java", "1.0.0")
	direct := (&volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Libraries: []volumeattrs.Library{{Image: java.Ref}}}).Attributes()

	a, ro, gone := p.Target("pod-a", "apm"), p.Target("pod-ro", "apm"), p.Target("pod-gone", "apm")
	p.MustPublish("csi-a", a, nodeplugintest.Ephemeral(vol.attrs(), "pod-a"), false)
	p.MustPublish("csi-ro", ro, nodeplugintest.Ephemeral(vol.attrs(), "pod-ro"), true)
	p.MustPublish("csi-gone", gone, nodeplugintest.Ephemeral(direct, "pod-gone"), false)
	writeFile(t, filepath.Join(a, "tracer.log"), "before restart\n")
	layersOf := map[string][]state.Layer{}
	for _, r := range p.Driver.Records() {
		layersOf[r.VolumeID] = r.Layers
	}
	if len(layersOf) != 3 {
		t.Fatalf("records: %v", layersOf)
	}

	p.Stop()
	// While the plugin is down: pod-gone's mount disappears (its pod was deleted and the node
	// cleaned it up, or the node rebooted), and a crash left an overlay dir nothing refers to.
	if err := syscallUnmount(gone); err != nil {
		t.Fatal(err)
	}
	orphan := filepath.Join(p.State, "overlays", "orphan-of-a-crash")
	for _, d := range []string{"upper", "work"} {
		if err := os.MkdirAll(filepath.Join(orphan, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(orphan, "upper", "left"), "x")
	p.Start()

	// The pod mounts kept working through the restart.
	wantA := vol.files()
	wantA["tracer.log"] = "before restart\n"
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, a), wantA); d != "" {
		t.Fatalf("pod-a's volume after the restart: %s", d)
	}
	writeFile(t, filepath.Join(a, "tracer.log"), "after restart\n")
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, ro), vol.files()); d != "" {
		t.Fatalf("pod-ro's volume after the restart: %s", d)
	}
	// kubelet republishes every volume after it restarts: a no-op.
	p.MustPublish("csi-a", a, nodeplugintest.Ephemeral(vol.attrs(), "pod-a"), false)
	p.MustPublish("csi-ro", ro, nodeplugintest.Ephemeral(vol.attrs(), "pod-ro"), true)
	if nodeplugintest.CountMounts(t, a) != 1 || nodeplugintest.CountMounts(t, ro) != 1 {
		t.Fatalf("republish after the restart stacked mounts: %d, %d", nodeplugintest.CountMounts(t, a), nodeplugintest.CountMounts(t, ro))
	}
	// The reconcile dropped pod-gone's record, overlay dir and target, and the orphan dir.
	if ids := recordIDs(p); !slices.Equal(ids, []string{"csi-a", "csi-ro"}) {
		t.Errorf("records after the restart: %q", ids)
	}
	if dirs := p.overlayDirs(); len(dirs) != 1 {
		t.Errorf("overlay dirs after the restart: %q, want only pod-a's", dirs)
	}
	if _, err := os.Lstat(gone); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("pod-gone's target survived the reconcile: %v", err)
	}

	// GC right after the restart, grace period tiny: the new cache process never handed out
	// pod-a's layers, yet they are mounted and must stay; the java library is unused and goes.
	p.gc()
	for _, l := range append(layersOf["csi-a"], layersOf["csi-ro"]...) {
		if _, err := os.Stat(l.Dir); err != nil {
			t.Fatalf("GC after the restart removed a mounted layer %s: %v", l.Dir, err)
		}
	}
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, ro), vol.files()); d != "" {
		t.Fatalf("pod-ro's volume after GC: %s", d)
	}
	for _, l := range layersOf["csi-gone"] {
		if _, err := os.Stat(l.Dir); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("the library of the volume that vanished during the restart was kept: %s (%v)", l.Dir, err)
		}
	}

	// Unpublishing volumes published before the restart frees everything.
	p.MustUnpublish("csi-a", a)
	p.MustUnpublish("csi-ro", ro)
	for _, target := range []string{a, ro} {
		if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("target %s left after unpublish: %v", target, err)
		}
	}
	p.assertNothingAllocated(t)
	p.gc()
	if left := p.storeEntries(); len(left) != 0 {
		t.Errorf("library cache entries left after the last unpublish and GC: %q", left)
	}
}

func recordIDs(p *plugin) []string {
	var ids []string
	for _, r := range p.Driver.Records() {
		ids = append(ids, r.VolumeID)
	}
	slices.Sort(ids)
	return ids
}

// TestGCThroughDriver: cache.GC(ctx, d.LibrariesInUse) never removes a mounted library (in
// an overlay, bind-mounted read-only, or the generated preload file bind-mounted), and removes
// it once its last volume is unpublished and the grace period has passed.
func TestGCThroughDriver(t *testing.T) {
	const grace = 3 * time.Second
	reg := libimages.Start(t)
	clk := testingclock.NewFakeClock(time.Now())
	p := startPlugin(t, options{registry: reg, grace: grace, clock: clk})
	vol := pushInjectorVolume(t, reg, "2.0.0")
	python := vol.libs["python"]

	// a: the injector layout (overlay); b: python alone, read-only (an overlay of the image's
	// own directory and the plugin's empty dir); c: the preload file alone (a bind mount of the generated file, the same
	// entry a's overlay stacks).
	a, b, c := p.Target("pod-a", "apm"), p.Target("pod-b", "apm"), p.Target("pod-c", "preload")
	p.MustPublish("csi-a", a, nodeplugintest.Ephemeral(vol.attrs(), "pod-a"), false)
	p.MustPublish("csi-b", b, nodeplugintest.Ephemeral((&volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Libraries: []volumeattrs.Library{{Image: python.Ref}}}).Attributes(), "pod-b"), true)
	p.MustPublish("csi-c", c, nodeplugintest.Ephemeral(map[string]string{"type": volumeattrs.TypeDatadogInjectorPreload}, "pod-c"), true)
	if e := nodeplugintest.EntryAt(t, b); e.FsType != "overlay" {
		t.Fatalf("pod-b's single read-only layer is a %s, want an overlay (a bind of the shared layer could be remounted writable): %+v", e.FsType, e)
	}
	layers := map[string][]string{}
	for _, r := range p.Driver.Records() {
		for _, l := range r.Layers {
			layers[r.VolumeID] = append(layers[r.VolumeID], l.Dir)
		}
	}
	preloadDir := layers["csi-c"][0]
	if layers["csi-a"][0] != preloadDir {
		t.Fatalf("the overlay's preload layer %s and the preload volume's %s differ; want one generated entry", layers["csi-a"][0], preloadDir)
	}
	check := func(when string) {
		t.Helper()
		if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, b), libimages.LibraryFiles("python", "2.0.0")); d != "" {
			t.Fatalf("%s: pod-b's volume: %s", when, d)
		}
		if got, err := os.ReadFile(c); err != nil || string(got) != libref.LauncherPath+"\n" {
			t.Fatalf("%s: pod-c's preload file: %q, %v", when, got, err)
		}
	}
	exists := func(dir string) bool {
		_, err := os.Stat(dir)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
		return err == nil
	}

	// Mounted, grace period long past: nothing goes.
	p.gc()
	clk.Step(grace + time.Second)
	p.gc()
	for id, dirs := range layers {
		for _, d := range dirs {
			if !exists(d) {
				t.Fatalf("GC removed %s of the mounted volume %s", d, id)
			}
		}
	}
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, a), vol.files()); d != "" {
		t.Fatalf("pod-a's volume after GC: %s", d)
	}
	check("after GC with everything mounted")
	entriesBefore := p.storeEntries()

	// pod-a goes. Within the grace period its libraries stay (a pod of the same deployment
	// usually follows)...
	p.MustUnpublish("csi-a", a)
	p.gc()
	for _, d := range layers["csi-a"] {
		if !exists(d) {
			t.Fatalf("GC removed %s right after its last volume went, within the grace period", d)
		}
	}
	// ...and after it, what only pod-a used goes: apm-inject and js (images and views) and the
	// python view. The python image stays (pod-b's overlay stacks it), so does the preload file
	// (pod-c bind-mounts it).
	clk.Step(grace + time.Second)
	p.gc()
	for _, d := range layers["csi-a"][1:] {
		if exists(d) {
			t.Errorf("GC kept %s after its last volume went and the grace period passed", d)
		}
	}
	for _, d := range append(layers["csi-b"], preloadDir) {
		if !exists(d) {
			t.Fatalf("GC removed %s, still mounted", d)
		}
	}
	check("after GC with pod-a gone")
	entriesAfter := p.storeEntries()
	if want := []string{"images/" + hexOf(t, python.Image), "generated/" + filepath.Base(filepath.Dir(preloadDir))}; !slices.Equal(entriesAfter, want) {
		t.Errorf("cache entries: before %q, after %q; want %q", entriesBefore, entriesAfter, want)
	}

	p.MustUnpublish("csi-b", b)
	p.MustUnpublish("csi-c", c)
	p.gc()
	if got := p.storeEntries(); !slices.Equal(got, entriesAfter) {
		t.Errorf("cache entries right after the last unpublish: %q, want %q kept for the grace period", got, entriesAfter)
	}
	clk.Step(grace + time.Second)
	p.gc()
	if left := p.storeEntries(); len(left) != 0 {
		t.Errorf("cache entries left after every volume went and the grace period passed: %q", left)
	}
	p.assertNothingAllocated(t)
}

// imageFetches returns, for l, the GETs of its manifest by digest and the largest number of
// GETs of one of its layer blobs from its repository. (Library images share their base layer:
// the cache keys images, not layers, so each image fetches it from its own repository once.)
func imageFetches(t testing.TB, reg *libimages.Registry, l nodeplugintest.PushedImage) (manifest, maxLayer int) {
	t.Helper()
	layers, err := l.Image.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, layer := range layers {
		d, err := layer.Digest()
		if err != nil {
			t.Fatal(err)
		}
		maxLayer = max(maxLayer, reg.Count(func(q libimages.Request) bool {
			return q.Method == http.MethodGet && q.Kind == "blob" && q.Repo == l.Repo && q.Ref == d.String()
		}))
	}
	return reg.ManifestFetches(l.Repo, "sha256:"+hexOf(t, l.Image)), maxLayer
}

func hexOf(t testing.TB, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.Hex
}

// TestHostileImage: a volume naming one of libimages' hostile images gets FailedPrecondition
// with a clear message, leaves nothing behind (no record, upper dir, target, mount, partial
// cache entry, or file outside the store), and a retry is refused without another pull.
func TestHostileImage(t *testing.T) {
	reg := libimages.Start(t)
	p := startPlugin(t, options{registry: reg})
	outside := t.TempDir()
	secret := filepath.Join(outside, "secret")
	writeFile(t, secret, "host secret\n")
	vol := pushInjectorVolume(t, reg, "3.0.0")
	warm := p.Target("warm", "apm")
	p.MustPublish("csi-warm", warm, nodeplugintest.Ephemeral(vol.attrs(), "warm"), false)
	p.MustUnpublish("csi-warm", warm)
	entriesBefore := p.storeEntries()

	cases := []struct {
		name string
		img  func() (v1.Image, error)
		// cached: the archive itself is fine, only the source directory is refused.
		cached bool
		why    string
	}{
		{"dotdot", func() (v1.Image, error) { return libimages.DotDot(outside) }, false, "unsafe tar path"},
		{"hardlink-absolute", func() (v1.Image, error) { return libimages.HardlinkAbsolute(secret) }, false, "outside the image root"},
		{"device-node", libimages.DeviceNode, false, "device node"},
		{"fifo", libimages.FIFO, false, "FIFO"},
		{"symlinked-source", func() (v1.Image, error) { return libimages.SymlinkedSource(outside) }, true, libref.LibrarySource + " is a symlink"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			img, err := tc.img()
			if err != nil {
				t.Fatal(err)
			}
			hostile := nodeplugintest.Push(t, reg, "datadog/"+libref.PackageName("java"), tc.name, img)
			v := vol
			v.langs = []string{"python", "java"}
			v.libs = maps.Clone(vol.libs)
			v.libs["java"] = hostile
			target := p.Target("pod-"+tc.name, "apm")
			for attempt := range 2 {
				// Requests of the aborted first download may still be on the wire.
				if err := reg.WaitQuiet(250*time.Millisecond, 5*time.Second); err != nil {
					t.Fatal(err)
				}
				reg.ResetCounts()
				err := p.Publish("csi-"+tc.name, target, nodeplugintest.Ephemeral(v.attrs(), "pod-"+tc.name), false)
				checkStatus(t, err, codes.FailedPrecondition, hostile.Ref, "cannot be served", tc.why)
				t.Logf("attempt %d: %v", attempt, err)
				if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("target left: %v", err)
				}
				p.assertNothingAllocated(t)
				if attempt == 1 {
					// A rejected image is remembered: kubelet's retries do not pull it again.
					if n := reg.Count(func(q libimages.Request) bool { return q.Method == http.MethodGet && q.Repo == hostile.Repo }); n != 0 {
						t.Errorf("the retry fetched %d manifests or blobs of the rejected image again", n)
					}
				}
			}
			entries := p.storeEntries()
			added := slices.DeleteFunc(slices.Clone(entries), func(e string) bool { return slices.Contains(entriesBefore, e) })
			switch {
			case tc.cached && !slices.Equal(added, []string{"images/" + hexOf(t, img)}):
				t.Errorf("cache entries added: %q; want only the image itself, never a view of its symlinked source", added)
			case !tc.cached && len(added) != 0:
				t.Errorf("cache entries added by a rejected image: %q", added)
			}
			if got := dirNames(t, outside); !slices.Equal(got, []string{"secret"}) {
				t.Errorf("the host dir outside the store changed: %q", got)
			}
			if b, err := os.ReadFile(secret); err != nil || string(b) != "host secret\n" {
				t.Errorf("the host file changed: %q, %v", b, err)
			}
		})
	}
}

// TestHostileImageNeutralised: a relative hardlink climbing out of the image is dropped by
// the flattener rather than refused; the volume publishes without it, and no file of the
// volume is the host file.
func TestHostileImageNeutralised(t *testing.T) {
	reg := libimages.Start(t)
	p := startPlugin(t, options{registry: reg})
	secret := filepath.Join(t.TempDir(), "secret")
	writeFile(t, secret, "host secret\n")
	img, err := libimages.HardlinkOutside(secret)
	if err != nil {
		t.Fatal(err)
	}
	hostile := nodeplugintest.Push(t, reg, "datadog/"+libref.PackageName("java"), "hardlink-outside", img)
	target := p.Target("pod", "apm")
	attrs := nodeplugintest.Ephemeral((&volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Libraries: []volumeattrs.Library{{Image: hostile.Ref}}}).Attributes(), "pod")
	p.MustPublish("csi-pod", target, attrs, false)
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, target), libimages.LibraryFiles("java", "hostile")); d != "" {
		t.Errorf("volume of the neutralised image: %s", d)
	}
	if leaked := filesContaining(t, target, "host secret"); len(leaked) != 0 {
		t.Errorf("the host file is reachable in the volume: %q", leaked)
	}
	p.MustUnpublish("csi-pod", target)
	p.assertNothingAllocated(t)
	if b, err := os.ReadFile(secret); err != nil || string(b) != "host secret\n" {
		t.Errorf("the host file changed: %q, %v", b, err)
	}
}

// TestDatadogLibraryVolumes: pods written for the Datadog Cluster Agent's "csi" injection
// mode (type DatadogLibrary with package, registry and version; DatadogInjectorPreload) are
// served from the same cache: a tag, a bare digest (pinned: never resolved at the registry)
// and the preload file.
func TestDatadogLibraryVolumes(t *testing.T) {
	reg := libimages.Start(t)
	p := startPlugin(t, options{registry: reg})
	inj := nodeplugintest.PushInjector(t, reg, "0.40.0")
	python := nodeplugintest.PushLibrary(t, reg, "python", "v3.2.0")
	registry := reg.Addr() + "/datadog"
	reg.ResetCounts()

	injTarget, pyTarget, preloadTarget := p.Target("dd", "apm-inject"), p.Target("dd", "python"), p.Target("dd", "preload")
	p.MustPublish("csi-inj", injTarget, nodeplugintest.Ephemeral(map[string]string{
		"type": volumeattrs.TypeDatadogLibrary, volumeattrs.DDKeyPackage: libref.InjectorPackage,
		volumeattrs.DDKeyRegistry: registry, volumeattrs.DDKeyVersion: "0.40.0",
	}, "dd"), true)
	p.MustPublish("csi-py", pyTarget, nodeplugintest.Ephemeral(map[string]string{
		"type": volumeattrs.TypeDatadogLibrary, volumeattrs.DDKeyPackage: libref.PackageName("python"),
		volumeattrs.DDKeyRegistry: registry, volumeattrs.DDKeyVersion: "sha256:" + hexOf(t, python.Image),
	}, "dd"), true)
	p.MustPublish("csi-preload", preloadTarget, nodeplugintest.Ephemeral(map[string]string{"type": volumeattrs.TypeDatadogInjectorPreload}, "dd"), true)

	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, injTarget), libimages.InjectorFiles("0.40.0")); d != "" {
		t.Errorf("apm-inject volume: %s", d)
	}
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, pyTarget), libimages.LibraryFiles("python", "v3.2.0")); d != "" {
		t.Errorf("python volume: %s", d)
	}
	if b, err := os.ReadFile(preloadTarget); err != nil || string(b) != libref.LauncherPath+"\n" {
		t.Errorf("preload file: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(pyTarget, "x"), nil, 0o644); err == nil {
		t.Errorf("a read-only Datadog library volume is writable")
	}
	if heads := reg.Count(func(q libimages.Request) bool { return q.Method == http.MethodHead && q.Repo == python.Repo }); heads != 0 {
		t.Errorf("a digest reference was resolved at the registry %d times", heads)
	}
	if manifests, maxLayer := imageFetches(t, reg, inj); manifests != 1 || maxLayer != 1 {
		t.Errorf("apm-inject pulled with %d manifest GETs and up to %d GETs of a layer; want one pull", manifests, maxLayer)
	}
	for id, target := range map[string]string{"csi-inj": injTarget, "csi-py": pyTarget, "csi-preload": preloadTarget} {
		p.MustUnpublish(id, target)
	}
	p.assertNothingAllocated(t)
}

// syscallUnmount detaches a mount behind the plugin's back.
func syscallUnmount(target string) error {
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	return nil
}
