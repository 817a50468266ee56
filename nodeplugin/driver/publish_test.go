package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

func TestPublishValidation(t *testing.T) {
	f := newFixture(t)
	target := f.target("pod-a")
	tests := []struct {
		name     string
		mutate   func(*csi.NodePublishVolumeRequest)
		code     codes.Code
		contains []string
	}{
		{name: "no volume id", mutate: func(r *csi.NodePublishVolumeRequest) { r.VolumeId = "" }, code: codes.InvalidArgument, contains: []string{"volume_id"}},
		{name: "no target", mutate: func(r *csi.NodePublishVolumeRequest) { r.TargetPath = "" }, code: codes.InvalidArgument, contains: []string{"target_path"}},
		{name: "target outside pods", mutate: func(r *csi.NodePublishVolumeRequest) { r.TargetPath = filepath.Join(f.kubelet, "plugins", "x") }, code: codes.InvalidArgument, contains: []string{"not a kubelet CSI volume target", "/pods/<pod-uid>/volumes/kubernetes.io~csi/<volume>/mount"}},
		{name: "target escaping pods", mutate: func(r *csi.NodePublishVolumeRequest) { r.TargetPath = f.kubelet + "/pods/../etc/x" }, code: codes.InvalidArgument, contains: []string{"not a kubelet CSI volume target"}},
		{name: "target with dotdot in the shape", mutate: func(r *csi.NodePublishVolumeRequest) {
			r.TargetPath = f.kubelet + "/pods/pod-a/volumes/kubernetes.io~csi/../mount"
		}, code: codes.InvalidArgument, contains: []string{"<volume>/mount"}},
		{name: "target in another plugin's dir", mutate: func(r *csi.NodePublishVolumeRequest) {
			r.TargetPath = f.kubelet + "/pods/pod-a/volumes/kubernetes.io~empty-dir/vol/mount"
		}, code: codes.InvalidArgument, contains: []string{"<volume>/mount"}},
		{name: "target is the pods dir", mutate: func(r *csi.NodePublishVolumeRequest) { r.TargetPath = f.kubelet + "/pods" }, code: codes.InvalidArgument},
		{name: "relative target", mutate: func(r *csi.NodePublishVolumeRequest) { r.TargetPath = "pods/x" }, code: codes.InvalidArgument},
		{name: "no capability", mutate: func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability = nil }, code: codes.InvalidArgument, contains: []string{"volume_capability"}},
		{name: "block", mutate: func(r *csi.NodePublishVolumeRequest) {
			r.VolumeCapability.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
		}, code: codes.InvalidArgument, contains: []string{"block"}},
		{name: "no type", mutate: func(r *csi.NodePublishVolumeRequest) { delete(r.VolumeContext, "type") }, code: codes.InvalidArgument, contains: []string{`"type" is missing`}},
		{name: "host path as attribute", mutate: func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["path"] = "/etc" }, code: codes.InvalidArgument, contains: []string{`"path"`}},
		{name: "unknown entry", mutate: func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["name"] = "nope" }, code: codes.InvalidArgument, contains: []string{`"nope" is not declared`, "apm-socket, data, demo, missing, ro-data"}},
		{name: "entry with slash", mutate: func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["name"] = "/etc" }, code: codes.InvalidArgument, contains: []string{"not a path", "declared entries: apm-socket (writable)"}},
		{name: "entry dotdot", mutate: func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["name"] = "../data" }, code: codes.InvalidArgument, contains: []string{"declared entries"}},
		{name: "entry NUL", mutate: func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["name"] = "da\x00ta" }, code: codes.InvalidArgument, contains: []string{"declared entries"}},
		{name: "writable request on read-only entry", mutate: func(r *csi.NodePublishVolumeRequest) {
			r.VolumeContext["name"] = "ro-data"
			r.VolumeContext["readOnly"] = "false"
		}, code: codes.InvalidArgument, contains: []string{`hostdir entry "ro-data" is read-only`, "writable entries: apm-socket, data, demo"}},
		{name: "datadog socket mapped to undeclared entry", mutate: func(r *csi.NodePublishVolumeRequest) {
			r.VolumeContext = map[string]string{"type": "DSDSocket"}
		}, code: codes.InvalidArgument, contains: []string{"--datadog-socket-entry", `"dsd-undeclared" is not declared`}},
		{name: "missing host path", mutate: func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["name"] = "missing" }, code: codes.FailedPrecondition, contains: []string{"does not exist", ",create"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := f.publishReq("vol-1", target, hostdirAttrs("data"))
			tt.mutate(req)
			_, err := f.d.NodePublishVolume(context.Background(), req)
			wantCode(t, err, tt.code, tt.contains...)
			if f.m.Len() != 0 {
				t.Fatalf("a refused publish left %d mounts", f.m.Len())
			}
			if len(f.d.Records()) != 0 {
				t.Fatalf("a refused publish left records: %+v", f.d.Records())
			}
			if _, err := os.Stat(target); !os.IsNotExist(err) {
				t.Fatalf("a refused publish left the target behind: %v", err)
			}
		})
	}
}

func TestPublishHostDir(t *testing.T) {
	tests := []struct {
		name       string
		attrs      map[string]string
		readonly   bool
		mode       csi.VolumeCapability_AccessMode_Mode
		wantSource string
		wantRO     bool
		wantFile   bool
	}{
		{name: "writable dir", attrs: hostdirAttrs("data"), wantSource: "data"},
		{name: "read-only attribute", attrs: map[string]string{"type": "hostdir", "name": "data", "readOnly": "true"}, readonly: true, wantSource: "data", wantRO: true},
		{name: "read-only CSI flag", attrs: hostdirAttrs("data"), readonly: true, wantSource: "data", wantRO: true},
		{name: "ReadOnlyMany persistent volume", attrs: map[string]string{"type": "hostdir", "name": "data"}, readonly: true, mode: csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, wantSource: "data", wantRO: true},
		{name: "read-only entry", attrs: hostdirAttrs("ro-data"), readonly: true, wantSource: "ro-data", wantRO: true},
		{name: "socket file", attrs: hostdirAttrs("apm-socket"), wantSource: "apm.socket", wantFile: true},
		{name: "datadog APMSocket", attrs: map[string]string{"type": "APMSocket"}, wantSource: "apm.socket", wantFile: true},
		{name: "created on demand", attrs: hostdirAttrs("demo"), wantSource: "demo"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			target := f.target("pod-a")
			req := f.publishReq("vol-1", target, tt.attrs)
			req.Readonly = tt.readonly
			if tt.mode != 0 {
				req.VolumeCapability = mountCap(tt.mode)
			}
			if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
				t.Fatal(err)
			}
			table, _ := f.m.MountTable()
			if len(table) != 1 {
				t.Fatalf("want one mount, got %+v", table)
			}
			e := table[0]
			if e.MountPoint != target || e.Source != filepath.Join(f.host, tt.wantSource) {
				t.Fatalf("mount %+v, want %s on %s", e, tt.wantSource, target)
			}
			if e.HasMountOption("ro") != tt.wantRO {
				t.Fatalf("read-only = %t, want %t", e.HasMountOption("ro"), tt.wantRO)
			}
			fi, err := os.Stat(target)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().IsRegular() != tt.wantFile {
				t.Fatalf("target is a file: %t, want %t", fi.Mode().IsRegular(), tt.wantFile)
			}
			recs := f.d.Records()
			if len(recs) != 1 || recs[0].ReadOnly != tt.wantRO || recs[0].Kind != "hostdir" {
				t.Fatalf("records = %+v", recs)
			}
			// The record is on disk too, before anything else is written.
			if _, ok, err := f.d.store.Get("vol-1", target); !ok || err != nil {
				t.Fatalf("record not persisted: %v %v", ok, err)
			}
			if got := counterValue(f.d.metrics.operations.WithLabelValues(opPublish, "hostdir", "OK")); got != 1 {
				t.Fatalf("publish OK counter = %v, want 1", got)
			}
		})
	}
}

func TestPublishIdempotency(t *testing.T) {
	// published returns a fixture with vol-1 published writable at the target of pod-a.
	published := func(t *testing.T) (*fixture, string) {
		f := newFixture(t)
		target := f.target("pod-a")
		if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", target, hostdirAttrs("data"))); err != nil {
			t.Fatal(err)
		}
		return f, target
	}

	t.Run("a repeated publish mounts once", func(t *testing.T) {
		f, target := published(t)
		for range 100 {
			if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", target, hostdirAttrs("data"))); err != nil {
				t.Fatal(err)
			}
		}
		if n := f.m.Mounts(target); n != 1 {
			t.Fatalf("101 publishes stacked %d mounts, want 1", n)
		}
	})

	t.Run("a read-only entry published read-only again is no conflict", func(t *testing.T) {
		f := newFixture(t)
		for range 2 {
			req := f.publishReq("vol-3", f.target("pod-b"), hostdirAttrs("ro-data"))
			req.Readonly = true
			if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
				t.Fatal(err)
			}
		}
	})

	for _, tc := range []struct {
		name     string
		req      func(f *fixture, target string) *csi.NodePublishVolumeRequest
		contains string
	}{
		{name: "another volume at a published target is refused", contains: `already holds volume "vol-1"`,
			req: func(f *fixture, target string) *csi.NodePublishVolumeRequest {
				return f.publishReq("vol-2", target, hostdirAttrs("data"))
			}},
		{name: "a read-only request for a volume mounted writable is refused", contains: "read-only",
			req: func(f *fixture, target string) *csi.NodePublishVolumeRequest {
				r := f.publishReq("vol-1", target, hostdirAttrs("data"))
				r.Readonly = true
				return r
			}},
		{name: "a mount the plugin did not make is refused", contains: "no record",
			req: func(f *fixture, _ string) *csi.NodePublishVolumeRequest {
				foreign := f.target("pod-c")
				if err := os.MkdirAll(foreign, 0o755); err != nil {
					t.Fatal(err)
				}
				f.m.Add(mounter.Entry{MountPoint: foreign, FsType: "tmpfs"})
				return f.publishReq("vol-4", foreign, hostdirAttrs("data"))
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, target := published(t)
			req := tc.req(f, target)
			_, err := f.d.NodePublishVolume(context.Background(), req)
			wantCode(t, err, codes.AlreadyExists, tc.contains)
			if n := f.m.Mounts(req.GetTargetPath()); n != 1 {
				t.Fatalf("the refused publish left %d mounts at its target, want the 1 already there", n)
			}
		})
	}
}

func TestPublishAfterLostMount(t *testing.T) {
	f := newFixture(t)
	target := f.target("pod-a")
	req := f.publishReq("vol-1", target, libraryAttrs("r.local/a:v1"))
	if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	upper := f.d.Records()[0].UpperDir
	if err := os.WriteFile(filepath.Join(upper, "stale"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// Someone unmounted it behind the plugin's back; kubelet publishes again.
	if err := f.m.Forget(target); err != nil {
		t.Fatal(err)
	}
	if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if n := f.m.Mounts(target); n != 1 {
		t.Fatalf("mounts = %d, want 1", n)
	}
	if _, err := os.Stat(filepath.Join(upper, "stale")); !os.IsNotExist(err) {
		t.Fatal("the new publish reused the stale upper dir instead of a fresh one")
	}
}

func TestPublishLibrary(t *testing.T) {
	tests := []struct {
		name      string
		attrs     map[string]string
		readonly  bool
		wantType  string // "overlay" or "bind"
		wantLower int
		wantUpper bool
	}{
		{name: "writable one library", attrs: libraryAttrs("r.local/a:v1"), wantType: "overlay", wantLower: 1, wantUpper: true},
		{name: "writable two libraries and preload", attrs: func() map[string]string {
			a := libraryAttrs("r.local/a:v1", "r.local/b:v1")
			a["preload"] = "/opt/x/launcher.so"
			return a
		}(), wantType: "overlay", wantLower: 3, wantUpper: true},
		{name: "read-only one library is an overlay with the empty dir", attrs: libraryAttrs("r.local/a:v1"), readonly: true, wantType: "overlay", wantLower: 2},
		{name: "read-only two libraries", attrs: libraryAttrs("r.local/a:v1", "r.local/b:v1"), readonly: true, wantType: "overlay", wantLower: 2},
		{name: "datadog library", attrs: map[string]string{"type": "DatadogLibrary", volumeattrs.DDKeyPackage: "dd-lib-java-init", volumeattrs.DDKeyVersion: "v1", volumeattrs.DDKeyRegistry: "r.local"}, wantType: "overlay", wantLower: 1, wantUpper: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			target := f.target("pod-a")
			req := f.publishReq("vol-1", target, tt.attrs)
			req.Readonly = tt.readonly
			if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
				t.Fatal(err)
			}
			table, _ := f.m.MountTable()
			if len(table) != 1 || table[0].FsType != tt.wantType {
				t.Fatalf("mounts = %+v, want one %s", table, tt.wantType)
			}
			rec := f.d.Records()[0]
			if tt.wantType == "overlay" {
				lower := table[0].LowerDirs()
				if len(lower) != tt.wantLower {
					t.Fatalf("lower dirs = %q, want %d", lower, tt.wantLower)
				}
				if p := tt.attrs["preload"]; p != "" {
					data, err := os.ReadFile(filepath.Join(lower[0], volumeattrs.PreloadFile))
					if err != nil || string(data) != p+"\n" {
						t.Fatalf("top layer is not the preload file: %q %v", data, err)
					}
				}
				upper, hasUpper := table[0].Option("upperdir")
				if hasUpper != tt.wantUpper {
					t.Fatalf("upper dir present = %t, want %t", hasUpper, tt.wantUpper)
				}
				if hasUpper {
					if upper != rec.UpperDir || filepath.Dir(rec.OverlayDir) != filepath.Join(f.state, "overlays") {
						t.Fatalf("upper %s, record %+v", upper, rec)
					}
					fi, err := os.Stat(upper)
					if err != nil || fi.Mode().Perm() != 0o777 {
						t.Fatalf("upper dir: %v %v", fi, err)
					}
				}
			}
			if !tt.wantUpper && rec.OverlayDir != "" {
				t.Fatalf("read-only volume got overlay dirs: %+v", rec)
			}
			for _, l := range rec.Layers {
				if l.Dir == "" {
					t.Fatalf("record layer without dir: %+v", rec.Layers)
				}
			}

			// Unpublish frees everything.
			if _, err := f.d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: target}); err != nil {
				t.Fatal(err)
			}
			if f.m.Len() != 0 || len(f.d.Records()) != 0 {
				t.Fatalf("after unpublish: %d mounts, records %+v", f.m.Len(), f.d.Records())
			}
			if entries, _ := os.ReadDir(filepath.Join(f.state, "overlays")); len(entries) != 0 {
				t.Fatalf("overlay dirs left: %v", entries)
			}
			if _, err := os.Stat(target); !os.IsNotExist(err) {
				t.Fatal("target left behind")
			}
		})
	}
}

func TestPublishPreload(t *testing.T) {
	f := newFixture(t)
	target := f.target("pod-a")
	req := f.publishReq("vol-1", target, map[string]string{"type": "DatadogInjectorPreload"})
	req.Readonly = true
	if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	table, _ := f.m.MountTable()
	if len(table) != 1 || !table[0].HasMountOption("ro") {
		t.Fatalf("mounts = %+v, want one read-only bind", table)
	}
	data, err := os.ReadFile(table[0].Source)
	if err != nil || !strings.HasSuffix(string(data), "launcher.preload.so\n") {
		t.Fatalf("preload source %s: %q %v", table[0].Source, data, err)
	}
	if fi, err := os.Stat(target); err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("target must be a file: %v %v", fi, err)
	}
	inUse, err := f.d.LibrariesInUse()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := inUse[filepath.Dir(filepath.Dir(table[0].Source))]; !ok {
		t.Fatalf("the generated dir is not reported in use: %v", inUse)
	}
}

func TestPublishLibraryErrors(t *testing.T) {
	tests := []struct {
		name     string
		err      error
		code     codes.Code
		contains string
	}{
		{name: "download in progress", err: fmt.Errorf("pulling: %w", library.ErrDownloadInProgress), code: codes.Unavailable, contains: "still downloading"},
		{name: "registry unavailable", err: fmt.Errorf("dial: %w", library.ErrRegistryUnavailable), code: codes.Unavailable, contains: "cannot be pulled now"},
		{name: "not found", err: fmt.Errorf("manifest unknown: %w", library.ErrImageNotFound), code: codes.NotFound, contains: "does not exist"},
		{name: "rejected", err: fmt.Errorf("setuid file: %w", library.ErrImageRejected), code: codes.FailedPrecondition, contains: "cannot be served"},
		{name: "download slots busy", err: fmt.Errorf("all 3 download slots are busy: %w", library.ErrDownloadSlotsBusy), code: codes.Unavailable, contains: "waits for a download slot"},
		{name: "cache full", err: fmt.Errorf("over the disk budget: %w", library.ErrCacheFull), code: codes.ResourceExhausted, contains: "cannot be stored on this node"},
		{name: "not allowed", err: fmt.Errorf("%w: not in the allowed repositories; add it with --allowed-repository", library.ErrImageNotAllowed), code: codes.PermissionDenied, contains: "--allowed-repository"},
		{name: "budget exceeded", err: context.DeadlineExceeded, code: codes.Unavailable, contains: "publish budget"},
		{name: "other", err: errors.New("disk full"), code: codes.Internal, contains: "disk full"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			f.store.FailWith("r.local/bad:v1", tt.err)
			target := f.target("pod-a")
			_, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", target, libraryAttrs("r.local/good:v1", "r.local/bad:v1")))
			wantCode(t, err, tt.code, tt.contains, "r.local/bad:v1")
			if f.m.Len() != 0 || len(f.d.Records()) != 0 {
				t.Fatal("a failed publish left state behind")
			}
		})
	}
}

func TestPublishWithoutLibraryStore(t *testing.T) {
	f := newFixture(t, withoutLibraries())
	for _, attrs := range []map[string]string{libraryAttrs("r.local/a:v1"), {"type": "preload"}} {
		_, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", f.target("p"), attrs))
		wantCode(t, err, codes.FailedPrecondition, "library cache not configured")
	}
	if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-2", f.target("q"), hostdirAttrs("data"))); err != nil {
		t.Fatalf("hostdir volumes must work without a library cache: %v", err)
	}
}

func TestPublishFailureFreesEverything(t *testing.T) {
	for _, op := range []string{"overlay", "bind"} {
		t.Run(op, func(t *testing.T) {
			f := newFixture(t)
			f.m.Errors[op] = errors.New("EPERM")
			attrs := libraryAttrs("r.local/a:v1")
			if op == "bind" {
				attrs = hostdirAttrs("data")
			}
			target := f.target("pod-a")
			_, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", target, attrs))
			wantCode(t, err, codes.Internal, "EPERM")
			if list, _ := f.d.store.List(); len(list) != 0 {
				t.Fatalf("records left on disk: %+v", list)
			}
			if entries, _ := os.ReadDir(filepath.Join(f.state, "overlays")); len(entries) != 0 {
				t.Fatalf("overlay dirs left: %v", entries)
			}
			if _, err := os.Stat(target); !os.IsNotExist(err) {
				t.Fatal("target left behind")
			}
			if got := counterValue(f.d.metrics.operations.WithLabelValues(opPublish, string(map[string]volumeattrs.Kind{"overlay": volumeattrs.KindLibrary, "bind": volumeattrs.KindHostDir}[op]), "Internal")); got != 1 {
				t.Fatalf("failure counter = %v", got)
			}
		})
	}
}

func TestPublishNotReady(t *testing.T) {
	root := t.TempDir()
	d, err := New(Config{NodeID: "n", KubeletDir: filepath.Join(root, "k"), StateDir: filepath.Join(root, "s"), Mounter: mounter.NewFake(), WritableLayers: writablelayer.NewFake()})
	if err != nil {
		t.Fatal(err)
	}
	req := &csi.NodePublishVolumeRequest{VolumeId: "v", TargetPath: filepath.Join(root, "k", "pods", "u", "volumes", "kubernetes.io~csi", "v", "mount"), VolumeCapability: mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER), VolumeContext: hostdirAttrs("x")}
	_, err = d.NodePublishVolume(context.Background(), req)
	wantCode(t, err, codes.Unavailable, "starting")
	probe, _ := d.Probe(context.Background(), &csi.ProbeRequest{})
	if probe.GetReady().GetValue() {
		t.Fatal("Probe ready before reconcile")
	}
	if _, err := d.LibrariesInUse(); err == nil {
		t.Fatal("LibrariesInUse answered before reconcile")
	}
}

func TestSameVolumeSerialises(t *testing.T) {
	f := newFixture(t)
	target := f.target("pod-a")
	req := f.publishReq("vol-1", target, hostdirAttrs("data"))
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Go(func() {
			_, err := f.d.NodePublishVolume(context.Background(), req)
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := f.m.Mounts(target); n != 1 {
		t.Fatalf("concurrent publishes stacked %d mounts", n)
	}
}
