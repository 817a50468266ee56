package nodeplugin

import (
	"context"
	"errors"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/driver"
	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// The attacks of a root pod on the node plugin's host boundary: links planted where the
// plugin mounts from, mounts onto, or removes. Each test is the attack and what must hold.

// hostMount mounts a tmpfs holding one file at dir, standing for a host mount outside the pods
// dir (another volume, a kubelet mount). The test unmounts it itself at the end, checking it
// is still there.
func hostMount(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "host-data"), "keep")
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("the host mount at %s is gone: %v", dir, err)
		}
	})
}

// assertHostMountIntact checks that the host mount at dir is still mounted, once, with its data.
func assertHostMountIntact(t *testing.T, dir string) {
	t.Helper()
	if n := nodeplugintest.CountMounts(t, dir); n != 1 {
		t.Fatalf("the host mount at %s has %d mounts, want 1 (untouched)", dir, n)
	}
	if got := readFile(t, filepath.Join(dir, "host-data")); got != "keep" {
		t.Fatalf("host data = %q", got)
	}
}

// listenSocket serves a unix socket at path until the test ends.
func listenSocket(t *testing.T, path string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
}

// TestSocketSwappedForALinkIsRefused: the Datadog socket entry's socket is replaced by a link to
// a sensitive host directory (here kubelet's pods dir), or its directory by a link. The next
// APMSocket volume is refused with FailedPrecondition and nothing is mounted: before, the pod
// got a read-write bind mount of the link's target.
func TestSocketSwappedForALinkIsRefused(t *testing.T) {
	for _, swap := range []struct {
		name string
		do   func(t *testing.T, dir, sock, sensitive string)
	}{
		{"socket replaced by a link", func(t *testing.T, dir, sock, sensitive string) {
			must(t, os.Remove(sock))
			must(t, os.Symlink(sensitive, sock))
		}},
		{"socket dir replaced by a link", func(t *testing.T, dir, sock, sensitive string) {
			must(t, os.Rename(dir, dir+".old"))
			must(t, os.Mkdir(filepath.Join(sensitive, "apm.socket"), 0o755))
			must(t, os.Symlink(sensitive, dir))
		}},
		{"socket replaced by a directory", func(t *testing.T, dir, sock, sensitive string) {
			must(t, os.Remove(sock))
			must(t, os.Mkdir(sock, 0o755))
		}},
	} {
		t.Run(swap.name, func(t *testing.T) {
			np := nodeplugintest.New(t, nodeplugintest.Config{})
			dir := filepath.Join(np.Root, "host", "datadog")
			must(t, os.MkdirAll(dir, 0o755))
			sock := filepath.Join(dir, "apm.socket")
			listenSocket(t, sock)
			sensitive := filepath.Join(np.Kubelet, "pods")
			must(t, os.MkdirAll(sensitive, 0o750))
			set, err := hostdir.NewSet([]hostdir.Entry{
				{Name: "apm-socket-dir", Path: dir, ReadOnly: true, Namespaces: []string{"*"}},
				{Name: "apm-socket", Path: sock, Namespaces: []string{"*"}},
			})
			must(t, err)
			np.Config.HostDirs = set
			np.Start()

			first := np.Target("app-1", "datadog-apm")
			np.MustPublish("csi-1", first, nodeplugintest.Ephemeral(map[string]string{"type": "APMSocket"}, "app-1"), false)
			np.MustUnpublish("csi-1", first)

			swap.do(t, dir, sock, sensitive)
			target := np.Target("app-2", "datadog-apm")
			err = np.Publish("csi-2", target, nodeplugintest.Ephemeral(map[string]string{"type": "APMSocket"}, "app-2"), false)
			if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), `hostdir "apm-socket"`) || !strings.Contains(err.Error(), "changed") {
				t.Fatalf("publish after the swap: %v, want FailedPrecondition naming the entry and the change", err)
			}
			if left := np.MountsLeft(); len(left) != 0 {
				t.Fatalf("mounted after a refused publish: %q", left)
			}
			if len(np.Driver.Records()) != 0 {
				t.Fatalf("records after a refused publish: %+v", np.Driver.Records())
			}
		})
	}
}

// TestNestedEntriesAreRefusedAtStart: the shipped Datadog layout of old (the socket entry
// inside a writable, created socket dir entry) lets any pod that mounts the dir swap the
// socket: the plugin refuses to start with it, naming both entries.
func TestNestedEntriesAreRefusedAtStart(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "datadog")
	must(t, os.MkdirAll(dir, 0o755))
	listenSocket(t, filepath.Join(dir, "apm.socket"))
	set, err := hostdir.NewSet([]hostdir.Entry{
		{Name: "apm-socket-dir", Path: dir, Create: true, Namespaces: []string{"*"}},
		{Name: "apm-socket", Path: filepath.Join(dir, "apm.socket"), Namespaces: []string{"*"}},
	})
	must(t, err)
	_, err = driver.New(driver.Config{NodeID: "n", KubeletDir: filepath.Join(root, "kubelet"), StateDir: filepath.Join(root, "state"), HostDirs: set, Mounter: mounter.New(), WritableLayers: writablelayer.NewFake()})
	if err == nil || !strings.Contains(err.Error(), `hostdir "apm-socket" (`) || !strings.Contains(err.Error(), `inside hostdir "apm-socket-dir"`) {
		t.Fatalf("driver.New with a socket entry inside a writable entry: %v; want an error naming both", err)
	}
}

// TestPublishThroughALinkedVolumeDirIsRefused: the pod's CSI volume dir (the target's parent),
// or the pod dir, is a link to a directory outside the pods dir. Hostdir and writable library
// publishes are refused and nothing is mounted outside; before, the mount landed outside.
func TestPublishThroughALinkedVolumeDirIsRefused(t *testing.T) {
	p := startPlugin(t)
	outside := filepath.Join(p.Root, "outside")
	must(t, os.MkdirAll(outside, 0o755))
	// The volume dir is a link.
	csiDir := filepath.Join(p.Kubelet, "pods", "pod-a", "volumes", "kubernetes.io~csi")
	must(t, os.MkdirAll(csiDir, 0o750))
	must(t, os.Symlink(outside, filepath.Join(csiDir, "data")))
	// The pod dir is a link.
	must(t, os.Symlink(outside, filepath.Join(p.Kubelet, "pods", "pod-b")))
	must(t, os.MkdirAll(filepath.Join(outside, "volumes", "kubernetes.io~csi", "data"), 0o750))

	for _, target := range []string{
		filepath.Join(csiDir, "data", "mount"),
		filepath.Join(p.Kubelet, "pods", "pod-b", "volumes", "kubernetes.io~csi", "data", "mount"),
	} {
		for _, attrs := range []map[string]string{hostdirData, injectorAttrs()} {
			err := p.Publish("csi-x", target, nodeplugintest.Ephemeral(attrs, "x"), false)
			if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "symbolic link") {
				t.Fatalf("publish of %s at %s: %v, want FailedPrecondition about the link", attrs["type"], target, err)
			}
		}
	}
	if left := p.MountsLeft(); len(left) != 0 {
		t.Fatalf("mounted through a link: %q", left)
	}
	for _, p := range []string{filepath.Join(outside, "mount"), filepath.Join(outside, "volumes", "kubernetes.io~csi", "data", "mount")} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("publish created %s outside the pods dir: %v", p, err)
		}
	}
	if entries, _ := os.ReadDir(filepath.Join(p.State, "overlays")); len(entries) != 0 {
		t.Fatalf("overlay dirs left: %v", entries)
	}
}

// TestUnpublishThroughALinkedVolumeDirLeavesTheHostMount: the volume dir is a link to a
// directory holding a host mount at "mount". Unpublish answers OK without touching it: the
// mount stays and its directory is not removed. Before, the plugin unmounted the host's mount
// and removed its directory.
func TestUnpublishThroughALinkedVolumeDirLeavesTheHostMount(t *testing.T) {
	p := startPlugin(t)
	outside := filepath.Join(p.Root, "outside")
	hostMount(t, filepath.Join(outside, "mount"))
	csiDir := filepath.Join(p.Kubelet, "pods", "pod-a", "volumes", "kubernetes.io~csi")
	must(t, os.MkdirAll(csiDir, 0o750))
	must(t, os.Symlink(outside, filepath.Join(csiDir, "data")))

	if err := p.Unpublish("csi-x", filepath.Join(csiDir, "data", "mount")); err != nil {
		t.Fatalf("unpublish through a linked volume dir: %v, want OK (not ours, nothing done)", err)
	}
	assertHostMountIntact(t, filepath.Join(outside, "mount"))
}

// TestUnpublishOfATargetThatIsALinkToAMount: the target itself is a link to a host mount.
// Unpublish answers at once, OK, and leaves the mount and the link alone. Before, it tried
// 1,024 unmounts (the link is followed by the mount check, not by the unmount) and answered
// Internal, on every retry.
func TestUnpublishOfATargetThatIsALinkToAMount(t *testing.T) {
	p := startPlugin(t)
	mnt := filepath.Join(p.Root, "outside", "mnt")
	hostMount(t, mnt)
	target := p.Target("pod-a", "data")
	must(t, os.Symlink(mnt, target))

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := p.Node.NodeUnpublishVolume(ctx, unpublishReq("csi-x", target))
	if err != nil {
		t.Fatalf("unpublish of a target that is a link: %v, want OK", err)
	}
	assertHostMountIntact(t, mnt)
	if fi, err := os.Lstat(target); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("the link was touched: %v", err)
	}
	// A publish there replaces the link itself, never what it points to.
	p.MustPublish("csi-y", target, nodeplugintest.Ephemeral(hostdirData, "y"), false)
	if fi, err := os.Lstat(target); err != nil || !fi.IsDir() {
		t.Fatalf("target after publish: %v", err)
	}
	assertHostMountIntact(t, mnt)
	p.MustUnpublish("csi-y", target)
}

// TestTargetShape: only kubelet's CSI target shape is accepted. ".." inside it, another
// plugin's volume dir (the pod's emptyDir), or a path of another depth is refused with
// InvalidArgument naming the shape, and nothing is mounted. Before, any path that cleaned to
// somewhere below the pods dir was accepted.
func TestTargetShape(t *testing.T) {
	p := startPlugin(t)
	pods := filepath.Join(p.Kubelet, "pods")
	emptyDir := filepath.Join(pods, "pod-a", "volumes", "kubernetes.io~empty-dir", "cache")
	must(t, os.MkdirAll(emptyDir, 0o750))
	p.Target("pod-b", "data")
	for _, target := range []string{
		pods + "/pod-a/volumes/kubernetes.io~csi/x/../../../../pod-b/volumes/kubernetes.io~csi/data/mount",
		pods + "/pod-a/volumes/kubernetes.io~csi/../kubernetes.io~empty-dir/cache/mount",
		emptyDir + "/mount",
		pods + "/pod-a/etc-hosts",
		pods + "/pod-a/volumes/kubernetes.io~csi/data/mount/sub",
	} {
		err := p.Publish("csi-x", target, nodeplugintest.Ephemeral(hostdirData, "x"), false)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "/pods/<pod-uid>/volumes/kubernetes.io~csi/<volume>/mount") {
			t.Fatalf("publish at %s: %v, want InvalidArgument naming the shape", target, err)
		}
	}
	if left := p.MountsLeft(); len(left) != 0 {
		t.Fatalf("mounted at a refused target: %q", left)
	}
	if entries, _ := os.ReadDir(emptyDir); len(entries) != 0 {
		t.Fatalf("created in the pod's emptyDir: %v", entries)
	}
}

// TestReconcileLeavesCraftedRecordsAlone: records in the state dir are untrusted input. A record
// whose target climbs out of the pods dir with "..", and one whose overlay dir is
// "<overlays>/..", are logged and left alone at restart: nothing is removed. Before, the first
// removed the directory its target named, the second removed the whole state dir.
func TestReconcileLeavesCraftedRecordsAlone(t *testing.T) {
	p := startPlugin(t)
	victim := filepath.Join(p.Root, "victim")
	must(t, os.MkdirAll(victim, 0o755))
	sentinel := filepath.Join(p.State, "keep")
	writeFile(t, sentinel, "state")
	p.Stop()

	store, err := state.Open(p.State)
	must(t, err)
	overlays := filepath.Join(p.State, "overlays")
	crafted := []*state.Record{
		{VolumeID: "csi-climb", TargetPath: filepath.Join(p.Kubelet, "pods") + "/../../victim", Kind: "hostdir"},
		{VolumeID: "csi-overlays", TargetPath: p.Target("pod-a", "data"), Kind: "library",
			OverlayDir: overlays + "/..", UpperDir: overlays + "/../upper", WorkDir: overlays + "/../work"},
		{VolumeID: "csi-other-overlay", TargetPath: p.Target("pod-b", "data"), Kind: "library",
			OverlayDir: filepath.Join(overlays, "someone-elses"), UpperDir: filepath.Join(overlays, "someone-elses", "upper"), WorkDir: filepath.Join(overlays, "someone-elses", "work")},
	}
	must(t, os.MkdirAll(filepath.Join(overlays, "someone-elses", "upper"), 0o700))
	for _, rec := range crafted {
		must(t, store.Put(rec))
	}
	p.Start()

	if _, err := os.Stat(victim); err != nil {
		t.Fatalf("a record with a climbing target removed %s: %v", victim, err)
	}
	if got := readFile(t, sentinel); got != "state" {
		t.Fatal("the state dir was emptied")
	}
	if _, err := os.Stat(filepath.Join(overlays, "someone-elses", "upper")); err != nil {
		t.Fatalf("an overlay dir named by a mismatched record was removed: %v", err)
	}
	list, err := store.List()
	must(t, err)
	if len(list) != len(crafted) {
		t.Fatalf("%d records on disk after reconcile, want the %d crafted ones left alone", len(list), len(crafted))
	}
	if len(p.Driver.Records()) != 0 {
		t.Fatalf("crafted records were adopted: %+v", p.Driver.Records())
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func unpublishReq(volumeID, target string) *csi.NodeUnpublishVolumeRequest {
	return &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target}
}

// TestReconcileKeepsAVolumeWhoseDirBecameALink: while the plugin is down, a published
// writable volume's dir is moved out of the pods dir and a link to it put in its place. At
// restart the record is kept and nothing is done through the link: the volume stays mounted
// where it went, with its upper dir, and once the dir is back a normal unpublish cleans up.
func TestReconcileKeepsAVolumeWhoseDirBecameALink(t *testing.T) {
	p := startPlugin(t)
	target := p.Target("pod-a", "data")
	p.MustPublish("csi-a", target, nodeplugintest.Ephemeral(injectorAttrs(), "a"), false)
	writeFile(t, filepath.Join(target, "tracer.log"), "written")
	p.Stop()

	volDir := filepath.Dir(target)
	moved := filepath.Join(p.Root, "outside", "data")
	must(t, os.MkdirAll(filepath.Dir(moved), 0o755))
	must(t, os.Rename(volDir, moved))
	must(t, os.Symlink(moved, volDir))
	p.Start()

	if len(p.Driver.Records()) != 1 {
		t.Fatalf("records after restart: %+v, want the volume's kept", p.Driver.Records())
	}
	if n := nodeplugintest.CountMounts(t, filepath.Join(moved, "mount")); n != 1 {
		t.Fatalf("the volume behind the link has %d mounts, want 1", n)
	}
	if got := readFile(t, filepath.Join(moved, "mount", "tracer.log")); got != "written" {
		t.Fatalf("the volume's data after restart: %q", got)
	}
	if entries, _ := os.ReadDir(filepath.Join(p.State, "overlays")); len(entries) != 1 {
		t.Fatalf("overlay dirs after restart: %v, want the volume's", entries)
	}

	must(t, os.Remove(volDir))
	must(t, os.Rename(moved, volDir))
	p.MustUnpublish("csi-a", target)
	if left := p.MountsLeft(); len(left) != 0 {
		t.Fatalf("mounts left: %q", left)
	}
}
