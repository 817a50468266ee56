package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// TestRestartKeepsEveryFieldOfARecord: start-up loads the records without their attributes
// (nothing but diagnostics reads them), yet what Records shows after a restart is the record
// as published, attributes included, and a volume published after the restart has its own.
func TestRestartKeepsEveryFieldOfARecord(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	attrs := libraryAttrs("r.local/a:v1", "r.local/b:v2")
	attrs["csi.storage.k8s.io/pod.name"] = "app"
	if _, err := f.d.NodePublishVolume(ctx, f.publishReq("vol-a", f.target("pod-a"), attrs)); err != nil {
		t.Fatal(err)
	}
	before := f.d.Records()
	if len(before) != 1 || len(before[0].Attributes) == 0 {
		t.Fatalf("records before the restart: %+v", before)
	}

	d2, err := New(Config{NodeID: "node-1", KubeletDir: f.kubelet, StateDir: f.state, Mounter: f.m, WritableLayers: f.wl, Libraries: f.store, Logger: slog.New(slog.NewTextHandler(f.logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d2.Close() })
	if err := d2.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	after := d2.Records()
	if len(after) != 1 || !after[0].Created.Equal(before[0].Created) {
		t.Fatalf("records after the restart: %+v\nwant %+v", after, before)
	}
	after[0].Created = before[0].Created
	if !reflect.DeepEqual(after[0], before[0]) {
		t.Fatalf("record after the restart %+v\nwant %+v", after[0], before[0])
	}

	if _, err := d2.NodePublishVolume(ctx, f.publishReq("vol-b", f.target("pod-b"), libraryAttrs("r.local/c:v3"))); err != nil {
		t.Fatal(err)
	}
	for _, r := range d2.Records() {
		if r.VolumeID == "vol-b" && r.Attributes[volumeattrs.LibraryKey(0, "image")] != "r.local/c:v3" {
			t.Fatalf("record of a volume published after the restart: %+v", r)
		}
	}
}

// BenchmarkStartWith2000Records: what a start-up costs until ready (New and Start) with 2,000
// records of writable library volumes, as the driver writes them. Start gets a context that
// is done already, so that the background check of the targets stops before its first record:
// it would drop them all (the fake mounter has nothing mounted). Run it with -cpu 1.
func BenchmarkStartWith2000Records(b *testing.B) {
	root := b.TempDir()
	kubelet, stateDir := filepath.Join(root, "kubelet"), filepath.Join(root, "state")
	store, err := state.Open(stateDir)
	if err != nil {
		b.Fatal(err)
	}
	for i := range 2000 {
		pod := fmt.Sprintf("pod-%d-0123-4567-89ab-cdef01234567", i)
		r := &state.Record{
			VolumeID:   "csi-" + pod,
			TargetPath: filepath.Join(kubelet, "pods", pod, "volumes/kubernetes.io~csi/apm/mount"),
			Kind:       "library",
			Type:       "library",
			Attributes: map[string]string{
				"csi.storage.k8s.io/ephemeral":     "true",
				"csi.storage.k8s.io/pod.name":      pod,
				"csi.storage.k8s.io/pod.namespace": "default",
				"library.0.image":                  "registry.local:5000/datadog/apm-inject:1.0.0",
				"library.1.image":                  "registry.local:5000/datadog/dd-lib-python-init:1.0.0",
				"type":                             "library",
			},
			WritableLimit: 256 << 20,
			WritableLayer: "tmpfs",
			Pod:           state.Pod{Namespace: "default", Name: pod, UID: pod},
			Ephemeral:     true,
			Created:       time.Now(),
		}
		r.OverlayDir = filepath.Join(OverlaysDir(stateDir), r.Key())
		r.UpperDir, r.WorkDir = r.OverlayDir+"/upper", r.OverlayDir+"/work"
		for _, h := range []string{"c914a152f7024fc971d364a43d7c732592bd7d4d821590cf6e4a517f1cdb506e", "ea994367cb7753e8b2e004710b4fdde04622b3a863686e58ac8b1acaf459d218"} {
			r.Layers = append(r.Layers, state.Layer{Dir: stateDir + "/store/views/" + h + "/root", Digest: "sha256:" + h})
		}
		if err := os.MkdirAll(r.UpperDir, 0o700); err != nil {
			b.Fatal(err)
		}
		if err := store.Put(r); err != nil {
			b.Fatal(err)
		}
	}
	store.Close()
	cfg := Config{NodeID: "node-1", KubeletDir: kubelet, StateDir: stateDir, Mounter: mounter.NewFake(), WritableLayers: writablelayer.NewFake(), Logger: slog.New(slog.DiscardHandler)}
	// CPU time, which a loaded machine inflates less than the wall time.
	cpu := func() time.Duration {
		var ru unix.Rusage
		if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
			b.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	stopped, stop := context.WithCancel(context.Background())
	stop()
	cpu0, n := cpu(), 0
	for b.Loop() {
		n++
		d, err := New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		if err := d.Start(stopped); err != nil {
			b.Fatal(err)
		}
		d.mu.Lock()
		n := len(d.byTarget)
		d.mu.Unlock()
		if n != 2000 {
			b.Fatalf("%d records", n)
		}
		d.Close()
	}
	b.ReportMetric(float64(cpu()-cpu0)/float64(n)/1e6, "cpu-ms/op")
}

// TestUnreferencedEntriesReadsEveryEntry: the overlays dir is read in several getdents calls
// when it holds many entries (here about 60 KB of them, beyond one 32 KB buffer); every entry
// that no record references is returned, once, and none that one references.
func TestUnreferencedEntriesReadsEveryEntry(t *testing.T) {
	dir := t.TempDir()
	referenced := map[string]bool{}
	var want []string
	for i := range 700 {
		name := state.Key(fmt.Sprintf("vol-%d", i), "/t")
		if i%7 == 3 {
			name += ".x" // another length, so that entries are not all the same size
		}
		if err := os.Mkdir(filepath.Join(dir, name), 0o700); err != nil {
			t.Fatal(err)
		}
		if i%3 == 0 {
			want = append(want, name)
		} else {
			referenced[name] = true
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "a-file"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	want = append(want, "a-file")
	referenced["not-there"] = true
	got, err := unreferencedEntries(dir, referenced)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("got %d names, want %d:\n got %q\nwant %q", len(got), len(want), got, want)
	}
	if _, err := unreferencedEntries(filepath.Join(dir, "missing"), nil); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a missing dir: %v, want not-exist", err)
	}
}

// TestStartRefusesARecordWithAnotherRecordsOverlayDir: a record whose overlay dirs are of the
// right shape but under another record's key (a journal written by hand, or damaged and
// re-checksummed) is not adopted, and the dir it names is left in place: start-up compares
// the overlay dir with the key the store checked, as it did with a hash of its own.
func TestStartRefusesARecordWithAnotherRecordsOverlayDir(t *testing.T) {
	root := t.TempDir()
	kubelet, stateDir := filepath.Join(root, "kubelet"), filepath.Join(root, "state")
	store, err := state.Open(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	target := func(pod string) string {
		return filepath.Join(kubelet, "pods", pod, "volumes/kubernetes.io~csi/apm/mount")
	}
	own := &state.Record{VolumeID: "csi-own", TargetPath: target("pod-own"), Kind: "library", Type: "library", Created: time.Now()}
	own.OverlayDir = filepath.Join(OverlaysDir(stateDir), own.Key())
	own.UpperDir, own.WorkDir = own.OverlayDir+"/upper", own.OverlayDir+"/work"
	other := state.Key("csi-other", target("pod-other"))
	swapped := &state.Record{VolumeID: "csi-swapped", TargetPath: target("pod-swapped"), Kind: "library", Type: "library", Created: time.Now()}
	swapped.OverlayDir = filepath.Join(OverlaysDir(stateDir), other)
	swapped.UpperDir, swapped.WorkDir = swapped.OverlayDir+"/upper", swapped.OverlayDir+"/work"
	for _, r := range []*state.Record{own, swapped} {
		if err := os.MkdirAll(r.UpperDir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := store.Put(r); err != nil {
			t.Fatal(err)
		}
	}
	store.Close()

	d, err := New(Config{NodeID: "node-1", KubeletDir: kubelet, StateDir: stateDir, Mounter: mounter.NewFake(), WritableLayers: writablelayer.NewFake(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	d.mu.Lock()
	adoptedOwn, adoptedSwapped := d.byTarget[own.TargetPath] != nil, d.byTarget[swapped.TargetPath] != nil
	d.mu.Unlock()
	if !adoptedOwn || adoptedSwapped {
		t.Fatalf("adopted: own record %t (want true), record with another's overlay dir %t (want false)", adoptedOwn, adoptedSwapped)
	}
	if _, err := os.Stat(swapped.UpperDir); err != nil {
		t.Fatalf("the dir a refused record names was removed: %v", err)
	}
}

// TestStartReusesTheEmptyDirMountACrashLeft: the empty lower dir's own mount (a read-only
// tmpfs with the real mounter) left by a process that did not stop cleanly is used as it is
// by the next start, which neither fails on it nor stacks another; and a clean stop removes
// the one it made.
func TestStartReusesTheEmptyDirMountACrashLeft(t *testing.T) {
	testenv.RequireRoot(t)
	stateDir := t.TempDir()
	m := mounter.New()
	empty, releaseCrashed, err := prepareEmptyDir(m, stateDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(empty, unix.MNT_DETACH) })
	// No release: the process "crashed". The next start:
	again, release, err := prepareEmptyDir(m, stateDir)
	if err != nil || again != empty {
		t.Fatalf("start after a crash: %q, %v", again, err)
	}
	if err := release(); err != nil {
		t.Fatal(err)
	}
	if mounted, err := m.IsMountPoint(empty); err != nil || !mounted {
		t.Fatalf("the reused mount after the second start's release: mounted %v, %v; want still mounted", mounted, err)
	}
	if err := releaseCrashed(); err != nil {
		t.Fatal(err)
	}
	if mounted, _ := m.IsMountPoint(empty); mounted {
		t.Fatal("the empty dir is still a mount point after its release")
	}
	if fi, err := os.Stat(empty); err != nil || fi.Mode().Perm() != 0o555 {
		t.Fatalf("the empty dir itself: %v, %v; want mode 0555", fi, err)
	}
}
