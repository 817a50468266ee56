package driver

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/state"
)

func TestReconcile(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	kept, lost, keptRO := f.target("pod-kept"), f.target("pod-lost"), f.target("pod-ro")
	for _, p := range []struct {
		id, target string
		attrs      map[string]string
		ro         bool
	}{
		{"vol-kept", kept, libraryAttrs("r.local/a:v1"), false},
		{"vol-lost", lost, libraryAttrs("r.local/b:v1"), false},
		{"vol-ro", keptRO, libraryAttrs("r.local/c:v1"), true},
	} {
		req := f.publishReq(p.id, p.target, p.attrs)
		req.Readonly = p.ro
		if _, err := f.d.NodePublishVolume(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	var keptRec, lostRec state.Record
	for _, r := range f.d.Records() {
		switch r.VolumeID {
		case "vol-kept":
			keptRec = r
		case "vol-lost":
			lostRec = r
		}
	}
	// The node rebooted (or someone unmounted): one target lost its mount.
	if err := f.m.Forget(lost); err != nil {
		t.Fatal(err)
	}
	// An overlay dir that no record references, and one a live mount still uses.
	orphan := filepath.Join(f.state, "overlays", "orphan")
	live := filepath.Join(f.state, "overlays", "live")
	for _, d := range []string{orphan, live + "/upper", live + "/work"} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	f.m.Add(mounter.Entry{MountPoint: "/elsewhere", FsType: "overlay", SuperOptions: []string{"lowerdir=/x", "upperdir=" + live + "/upper", "workdir=" + live + "/work"}})

	// Restart: a new driver over the same state dir and mount table.
	d2, err := New(Config{NodeID: "node-1", KubeletDir: f.kubelet, StateDir: f.state, Mounter: f.m, WritableLayers: f.wl, Libraries: f.store, Logger: slog.New(slog.NewTextHandler(f.logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if !d2.Ready() {
		t.Fatal("not ready after reconcile")
	}
	got := map[string]bool{}
	for _, r := range d2.Records() {
		got[r.VolumeID] = true
	}
	if !got["vol-kept"] || !got["vol-ro"] || got["vol-lost"] {
		t.Fatalf("records after reconcile: %v", got)
	}
	if list, _ := d2.store.List(); len(list) != 2 {
		t.Fatalf("records on disk: %d, want 2", len(list))
	}
	for dir, want := range map[string]bool{keptRec.OverlayDir: true, lostRec.OverlayDir: false, orphan: false, live: true} {
		_, err := os.Stat(dir)
		if exists := err == nil; exists != want {
			t.Errorf("overlay dir %s exists = %t, want %t", dir, exists, want)
		}
	}
	if _, err := os.Stat(lost); !os.IsNotExist(err) {
		t.Error("the empty target of the lost volume was not removed")
	}

	// The kept volume is still idempotent after the restart, and unpublishes cleanly.
	if _, err := d2.NodePublishVolume(ctx, f.publishReq("vol-kept", kept, libraryAttrs("r.local/a:v1"))); err != nil {
		t.Fatal(err)
	}
	if f.m.Mounts(kept) != 1 {
		t.Fatal("republish after restart stacked a mount")
	}
	inUse, err := d2.LibrariesInUse()
	if err != nil {
		t.Fatal(err)
	}
	// The lower dir "/x" of the record-less overlay is the cache collector's to find in the
	// mount table: LibrariesInUse reports records and publishes in progress.
	for _, want := range []string{keptRec.Layers[0].Dir, keptRec.Layers[0].Digest} {
		if _, ok := inUse[want]; !ok {
			t.Errorf("LibrariesInUse lacks %s: %v", want, inUse)
		}
	}
	if _, ok := inUse[lostRec.Layers[0].Dir]; ok {
		t.Error("LibrariesInUse reports the layer of a dropped volume")
	}
}

func TestLibrariesInUseIncludesInFlight(t *testing.T) {
	f := newFixture(t)
	release := f.d.holdLayers([]state.Layer{{Dir: "/cache/x", Digest: "sha256:x"}})
	inUse, _ := f.d.LibrariesInUse()
	if _, ok := inUse["/cache/x"]; !ok {
		t.Fatal("in-flight layer not reported")
	}
	release()
	inUse, _ = f.d.LibrariesInUse()
	if _, ok := inUse["sha256:x"]; ok {
		t.Fatal("released layer still reported")
	}
}

// gatedMounter holds SurelyMountRoot, the first step of Start's background check, until
// open is closed.
type gatedMounter struct {
	*mounter.Fake
	open chan struct{}
}

func (g *gatedMounter) SurelyMountRoot(dirfd int, rel string) bool {
	<-g.open
	return g.Fake.SurelyMountRoot(dirfd, rel)
}

// TestStartServesBeforeCheckingTargetsAndKeepsWhatChangedMeanwhile: Start marks the driver
// ready before it checks any record's target; a publish of a target whose record is stale
// meanwhile replaces that record, and the background check, when it gets there, neither
// drops the new record nor unmounts its target; a stale record that nothing touched is
// dropped once the check is done.
func TestStartServesBeforeCheckingTargetsAndKeepsWhatChangedMeanwhile(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	republished, untouched := f.target("pod-a"), f.target("pod-b")
	for id, target := range map[string]string{"vol-a": republished, "vol-b": untouched} {
		if _, err := f.d.NodePublishVolume(ctx, f.publishReq(id, target, libraryAttrs("r.local/a:v1"))); err != nil {
			t.Fatal(err)
		}
		// The node rebooted: neither target is mounted any more.
		if err := f.m.Forget(target); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.d.Close(); err != nil {
		t.Fatal(err)
	}
	gate := &gatedMounter{Fake: f.m, open: make(chan struct{})}
	d, err := New(Config{NodeID: "node-1", KubeletDir: f.kubelet, StateDir: f.state, Mounter: gate, WritableLayers: f.wl, Libraries: f.store, Logger: slog.New(slog.NewTextHandler(f.logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var openOnce sync.Once
	openGate := func() { openOnce.Do(func() { close(gate.open) }) }
	t.Cleanup(func() { openGate(); d.Close() })
	if err := d.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if !d.Ready() {
		t.Fatal("not ready after Start")
	}
	select {
	case <-d.Verified():
		t.Fatal("the background check finished although no target could be checked yet")
	default:
	}
	// kubelet publishes vol-a again while the check is held.
	if _, err := d.NodePublishVolume(ctx, f.publishReq("vol-a", republished, libraryAttrs("r.local/a:v1"))); err != nil {
		t.Fatal(err)
	}
	fresh := d.record(republished)
	openGate()
	<-d.Verified()
	if got := d.record(republished); got != fresh {
		t.Fatalf("the republished record was replaced or dropped by the background check: %+v", got)
	}
	if f.m.Mounts(republished) != 1 {
		t.Fatalf("republished target has %d mounts, want 1", f.m.Mounts(republished))
	}
	if d.record(untouched) != nil {
		t.Fatal("the stale record of an unmounted target was kept after the check")
	}
	if list, _ := d.store.List(); len(list) != 1 || list[0].VolumeID != "vol-a" {
		t.Fatalf("records on disk after the check: %+v", list)
	}
}
