package nodeplugin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

var hostdirData = map[string]string{"type": "hostdir", "name": "data"}

// TestHostDirPersistsAcrossPods is the proof of concept's demo: a host directory mounted into a
// pod without a hostPath volume, created if missing, whose data stays on the node when the pod
// is deleted and re-created.
func TestHostDirPersistsAcrossPods(t *testing.T) {
	p := startPlugin(t)
	demo := map[string]string{"type": "hostdir", "name": "demo"}
	first := p.Target("pod-1", "demo")
	p.MustPublish("csi-1", first, nodeplugintest.Ephemeral(demo, "web-1"), false)
	if fi, err := os.Stat(filepath.Join(p.host, "demo")); err != nil || !fi.IsDir() {
		t.Fatalf("the create entry was not created: %v", err)
	}
	writeFile(t, filepath.Join(first, "visits"), "1")
	p.MustUnpublish("csi-1", first)
	if _, err := os.Stat(first); !os.IsNotExist(err) {
		t.Fatal("target not removed on unpublish")
	}

	second := p.Target("pod-2", "demo")
	p.MustPublish("csi-2", second, nodeplugintest.Ephemeral(demo, "web-2"), false)
	if got := readFile(t, filepath.Join(second, "visits")); got != "1" {
		t.Fatalf("the re-created pod sees %q, want the data the first one wrote", got)
	}
	p.MustUnpublish("csi-2", second)
}

// TestHostDirSharedReadOnly is universal-csi-driver's case: a sidecar writes into a host
// directory and application pods read it through a static PersistentVolume (one volume handle,
// several pods on the node) with ReadOnlyMany.
func TestHostDirSharedReadOnly(t *testing.T) {
	p := startPlugin(t)
	sidecar := p.Target("agent", "shared-out")
	p.MustPublish("csi-agent", sidecar, nodeplugintest.Ephemeral(hostdirData, "agent"), false)
	writeFile(t, filepath.Join(sidecar, "config.json"), `{"v":1}`)

	var apps []string
	for i := range 2 {
		target := p.Target(fmt.Sprintf("app-%d", i), "pv-shared")
		_, err := p.Node.NodePublishVolume(context.Background(), &csi.NodePublishVolumeRequest{
			VolumeId:   "pv-shared-data", // a static PV's volumeHandle: the same for every pod
			TargetPath: target,
			VolumeCapability: &csi.VolumeCapability{
				AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
				AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY},
			},
			VolumeContext: map[string]string{"type": "hostdir", "name": "data", "csi.storage.k8s.io/pod.name": "app"},
			Readonly:      true, // the PV's csi.readOnly
		})
		if err != nil {
			t.Fatal(err)
		}
		apps = append(apps, target)
	}
	for _, a := range apps {
		if got := readFile(t, filepath.Join(a, "config.json")); got != `{"v":1}` {
			t.Fatalf("app sees %q", got)
		}
		if err := os.WriteFile(filepath.Join(a, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
			t.Fatalf("write through a ReadOnlyMany volume: %v, want EROFS", err)
		}
	}
	writeFile(t, filepath.Join(sidecar, "config.json"), `{"v":2}`)
	if got := readFile(t, filepath.Join(apps[1], "config.json")); got != `{"v":2}` {
		t.Fatalf("the sidecar's update is not visible: %q", got)
	}
	// Unpublishing one pod leaves the other's mount alone.
	p.MustUnpublish("pv-shared-data", apps[0])
	if nodeplugintest.CountMounts(t, apps[1]) != 1 {
		t.Fatal("unpublishing one pod of a shared volume unmounted another")
	}
	p.MustUnpublish("pv-shared-data", apps[1])
	p.MustUnpublish("csi-agent", sidecar)

	// A read-only entry is mounted read-only (and served only to a pod whose CSI volume is
	// readOnly: TestReadOnlyBindVolumesNeedThePodsReadOnlyFlag).
	target := p.Target("app-3", "shared")
	p.MustPublish("csi-3", target, nodeplugintest.Ephemeral(map[string]string{"type": "hostdir", "name": "shared"}, "app-3"), true)
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Fatalf("write through a read-only entry: %v, want EROFS", err)
	}
	p.MustUnpublish("csi-3", target)
}

// TestDatadogAPMSocket: a pod written for the Datadog Cluster Agent's CSI socket mode gets the
// agent's socket, through the default APMSocket -> apm-socket mapping.
func TestDatadogAPMSocket(t *testing.T) {
	p := startPlugin(t)
	l, err := net.Listen("unix", filepath.Join(p.host, "apm.socket"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	answered := serveReply(l, "agent")
	target := p.Target("app", "datadog-apm")
	p.MustPublish("csi-dd", target, nodeplugintest.Ephemeral(map[string]string{"type": "APMSocket"}, "app"), false)
	if fi, err := os.Lstat(target); err != nil || fi.IsDir() {
		t.Fatalf("the socket target must be a file: %v %v", fi, err)
	}
	got, err := readReply(target, answered)
	if err != nil {
		t.Fatalf("the agent through the volume: %v", err)
	}
	if got != "agent" {
		t.Fatalf("got %q from the socket", got)
	}
	p.MustUnpublish("csi-dd", target)
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		t.Fatal("socket target not removed")
	}
	if _, err := os.Stat(filepath.Join(p.host, "apm.socket")); err != nil {
		t.Fatal("unpublish touched the agent's socket")
	}

	// DSDSocket maps to dsd-socket, which this node does not declare.
	err = p.Publish("csi-dsd", p.Target("app", "dsd"), map[string]string{"type": "DSDSocket"}, false)
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "apm-socket, data, demo, shared") {
		t.Fatalf("DSDSocket without its entry: %v", err)
	}
}

func injectorAttrs() map[string]string {
	return map[string]string{
		"type":                                     "library",
		volumeattrs.LibraryKey(0, "image"):         "registry.local/apm-inject:0.52.0",
		volumeattrs.LibraryKey(0, "source"):        libref.InjectorSource,
		volumeattrs.LibraryKey(0, "target"):        libref.InjectorTarget,
		volumeattrs.LibraryKey(1, "image"):         "registry.local/dd-lib-python-init:v3",
		volumeattrs.LibraryKey(1, "target"):        libref.LanguageTarget("python"),
		volumeattrs.KeyPreload:                     libref.LauncherPath,
		"csi.storage.k8s.io/serviceAccount.tokens": `{"x":{"token":"t"}}`,
	}
}

func TestLibraryVolumes(t *testing.T) {
	p := startPlugin(t)
	a, b := p.Target("pod-a", "apm"), p.Target("pod-b", "apm")
	p.MustPublish("csi-a", a, nodeplugintest.Ephemeral(injectorAttrs(), "a"), false)
	p.MustPublish("csi-b", b, nodeplugintest.Ephemeral(injectorAttrs(), "b"), false)

	if got := readFile(t, filepath.Join(a, volumeattrs.PreloadFile)); got != libref.LauncherPath+"\n" {
		t.Fatalf("ld.so.preload in the volume = %q", got)
	}
	if got := readFile(t, filepath.Join(a, "registry.local_apm-inject_0.52.0")); got != "registry.local/apm-inject:0.52.0\n" {
		t.Fatalf("library layer content %q", got)
	}
	// Writable by default, and each pod's writes are its own.
	writeFile(t, filepath.Join(a, "tracer.log"), "a")
	if _, err := os.Stat(filepath.Join(b, "tracer.log")); !os.IsNotExist(err) {
		t.Fatal("pod a's write is visible in pod b")
	}
	e := nodeplugintest.EntryAt(t, a)
	if e.FsType != "overlay" || len(e.LowerDirs()) != 3 {
		t.Fatalf("library mount %+v", e)
	}
	inUse, err := p.Driver.LibrariesInUse()
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range e.LowerDirs() {
		if _, ok := inUse[dir]; !ok {
			t.Fatalf("LibrariesInUse lacks %s", dir)
		}
	}

	// Read-only: an overlay without an upper dir.
	ro := p.Target("pod-c", "apm")
	p.MustPublish("csi-c", ro, nodeplugintest.Ephemeral(injectorAttrs(), "c"), true)
	if err := os.WriteFile(filepath.Join(ro, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Fatalf("write to a read-only library volume: %v", err)
	}
	// Read-only with a single layer: an overlay of the layer and the plugin's empty dir.
	single := p.Target("pod-d", "apm")
	p.MustPublish("csi-d", single, nodeplugintest.Ephemeral(map[string]string{"type": "library", "library.0.image": "registry.local/dd-lib-java-init:v1"}, "d"), true)
	if e := nodeplugintest.EntryAt(t, single); e.FsType != "overlay" || !e.HasMountOption("ro") {
		t.Fatalf("single read-only layer mount %+v", e)
	}

	// The ld.so.preload file on its own, as DatadogInjectorPreload.
	preload := p.Target("pod-e", "preload")
	p.MustPublish("csi-e", preload, nodeplugintest.Ephemeral(map[string]string{"type": "DatadogInjectorPreload"}, "e"), true)
	if got := readFile(t, preload); got != libref.LauncherPath+"\n" {
		t.Fatalf("preload file = %q", got)
	}
	if err := os.WriteFile(preload, []byte("x"), 0o644); !errors.Is(err, unix.EROFS) {
		t.Fatalf("the preload file must be read-only: %v", err)
	}

	for id, target := range map[string]string{"csi-a": a, "csi-b": b, "csi-c": ro, "csi-d": single, "csi-e": preload} {
		p.MustUnpublish(id, target)
	}
	if entries, _ := os.ReadDir(filepath.Join(p.State, "overlays")); len(entries) != 0 {
		t.Fatalf("overlay dirs left after unpublish: %v", entries)
	}
	if left := p.MountsLeft(); len(left) != 0 {
		t.Fatalf("mounts left: %q", left)
	}
	// No record outlives its volume.
	if recs := recordsOnDisk(t, p.State); len(recs) != 0 {
		t.Fatalf("records left: %v", recs)
	}
}

func TestLibraryFailureLeavesNothing(t *testing.T) {
	p := startPlugin(t)
	p.store.FailWith("registry.local/dd-lib-python-init:v3", fmt.Errorf("manifest unknown: %w", library.ErrImageNotFound))
	target := p.Target("pod", "apm")
	err := p.Publish("csi-x", target, nodeplugintest.Ephemeral(injectorAttrs(), "x"), false)
	if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), "registry.local/dd-lib-python-init:v3") {
		t.Fatalf("publish with a missing image: %v", err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatal("target left after a failed publish")
	}
	if recs := recordsOnDisk(t, p.State); len(recs) != 0 {
		t.Fatalf("records left after a failed publish: %v", recs)
	}
	if entries, _ := os.ReadDir(filepath.Join(p.State, "overlays")); len(entries) != 0 {
		t.Fatalf("overlay dirs left after a failed publish: %v", entries)
	}
}

// TestRestartReconcile: volumes mounted before a restart are kept (and stay idempotent), a
// volume that lost its mount while the plugin was down (reboot) is forgotten with its dirs.
func TestRestartReconcile(t *testing.T) {
	p := startPlugin(t)
	hd, lib, lost := p.Target("p1", "v"), p.Target("p2", "v"), p.Target("p3", "v")
	p.MustPublish("csi-hd", hd, nodeplugintest.Ephemeral(hostdirData, "p1"), false)
	p.MustPublish("csi-lib", lib, nodeplugintest.Ephemeral(injectorAttrs(), "p2"), false)
	p.MustPublish("csi-lost", lost, nodeplugintest.Ephemeral(injectorAttrs(), "p3"), false)
	writeFile(t, filepath.Join(lib, "kept"), "upper data")

	p.Stop()
	// While the plugin is down, the node loses one mount (as a reboot loses all).
	if err := unix.Unmount(lost, 0); err != nil {
		t.Fatal(err)
	}
	p.Start()

	got := map[string]bool{}
	for _, r := range p.Driver.Records() {
		got[r.VolumeID] = true
	}
	if !got["csi-hd"] || !got["csi-lib"] || got["csi-lost"] || len(got) != 2 {
		t.Fatalf("records after restart: %v", got)
	}
	if entries, _ := os.ReadDir(filepath.Join(p.State, "overlays")); len(entries) != 1 {
		t.Fatalf("overlay dirs after restart: %v, want only csi-lib's", entries)
	}
	// kubelet republishes everything after its own restart: no second mount.
	p.MustPublish("csi-hd", hd, nodeplugintest.Ephemeral(hostdirData, "p1"), false)
	p.MustPublish("csi-lib", lib, nodeplugintest.Ephemeral(injectorAttrs(), "p2"), false)
	if nodeplugintest.CountMounts(t, hd) != 1 || nodeplugintest.CountMounts(t, lib) != 1 {
		t.Fatal("republish after restart stacked mounts")
	}
	if got := readFile(t, filepath.Join(lib, "kept")); got != "upper data" {
		t.Fatal("the writable layer did not survive the plugin restart")
	}
	// kubelet publishes the lost one again (the pod still exists): a fresh mount.
	p.MustPublish("csi-lost", lost, nodeplugintest.Ephemeral(injectorAttrs(), "p3"), false)
	for id, target := range map[string]string{"csi-hd": hd, "csi-lib": lib, "csi-lost": lost} {
		p.MustUnpublish(id, target)
	}
	if left := p.MountsLeft(); len(left) != 0 {
		t.Fatalf("mounts left: %q", left)
	}
}

// TestTargetConfinement: a target outside the pods dir is refused on publish; its unpublish is
// OK and touches nothing (the path is not this plugin's).
func TestTargetConfinement(t *testing.T) {
	p := startPlugin(t)
	outside := filepath.Join(p.Root, "outside")
	if err := os.MkdirAll(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(outside, "keep"), "x")
	for _, target := range []string{outside, filepath.Join(p.Kubelet, "pods", "..", "..", "outside")} {
		if err := p.Publish("v", target, hostdirData, false); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("publish at %s: %v", target, err)
		}
		if err := p.Unpublish("v", target); err != nil {
			t.Fatalf("unpublish at %s: %v", target, err)
		}
	}
	if got := readFile(t, filepath.Join(outside, "keep")); got != "x" {
		t.Fatal("a refused call touched a directory outside the pods dir")
	}
}

// recordsOnDisk returns the volume ids and targets of the records in the state dir's journal.
func recordsOnDisk(t testing.TB, stateDir string) []string {
	t.Helper()
	recs, err := state.Read(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range recs {
		out = append(out, r.VolumeID+" at "+r.TargetPath)
	}
	return out
}
