package driver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// fakeStore serves layers from directories it creates, or the error configured per image.
type fakeStore struct {
	root string
	errs map[string]error
	mu   sync.Mutex
	// calls counts Layer calls.
	calls int
	// before, when set, runs first in every LayerFor call; an error it returns is the call's.
	before func(ctx context.Context, image string) error
}

func (s *fakeStore) LayerFor(ctx context.Context, _ string, lib volumeattrs.Library) (library.Layer, error) {
	s.mu.Lock()
	s.calls++
	before := s.before
	s.mu.Unlock()
	if before != nil {
		if err := before(ctx, lib.Image); err != nil {
			return library.Layer{}, err
		}
	}
	if err := s.errs[lib.Image]; err != nil {
		return library.Layer{}, err
	}
	sum := sha256.Sum256([]byte(lib.Image + lib.Source + lib.Target))
	d := "sha256:" + hex.EncodeToString(sum[:])
	dir := filepath.Join(s.root, "layers", hex.EncodeToString(sum[:8]))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return library.Layer{}, err
	}
	return library.Layer{Dir: dir, Digest: d}, nil
}

func (s *fakeStore) GeneratedFiles(files map[string]string) (string, error) {
	h := sha256.New()
	for _, k := range slices.Sorted(maps.Keys(files)) {
		fmt.Fprintf(h, "%s\x00%s\x00", k, files[k])
	}
	dir := filepath.Join(s.root, "generated", hex.EncodeToString(h.Sum(nil))[:16])
	for name, content := range files {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755); err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return "", err
		}
	}
	return dir, nil
}

// counterValue reads a counter without prometheus/testutil, whose diff dependency the module
// does not otherwise need.
func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

type fixture struct {
	d       *Driver
	m       *mounter.Fake
	wl      *writablelayer.Fake
	store   *fakeStore
	kubelet string
	state   string
	host    string
	logs    *bytes.Buffer
}

type fixtureOption func(*Config)

func withoutLibraries() fixtureOption { return func(c *Config) { c.Libraries = nil } }

func newFixture(t *testing.T, opts ...fixtureOption) *fixture {
	t.Helper()
	root := t.TempDir()
	f := &fixture{
		m:       mounter.NewFake(),
		wl:      writablelayer.NewFake(),
		store:   &fakeStore{root: filepath.Join(root, "cache"), errs: map[string]error{}},
		kubelet: filepath.Join(root, "kubelet"),
		state:   filepath.Join(root, "state"),
		host:    filepath.Join(root, "host"),
		logs:    &bytes.Buffer{},
	}
	for _, dir := range []string{"data", "ro-data", "team-a"} {
		if err := os.MkdirAll(filepath.Join(f.host, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(f.host, "apm.socket"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	all := []string{"*"}
	set, err := hostdir.NewSet([]hostdir.Entry{
		{Name: "data", Path: filepath.Join(f.host, "data"), Namespaces: all},
		{Name: "ro-data", Path: filepath.Join(f.host, "ro-data"), ReadOnly: true, Namespaces: all},
		{Name: "apm-socket", Path: filepath.Join(f.host, "apm.socket"), Namespaces: all},
		{Name: "missing", Path: filepath.Join(f.host, "missing"), Namespaces: all},
		{Name: "demo", Path: filepath.Join(f.host, "demo"), Create: true, Namespaces: all},
		// Restricted entries (tenancy_test.go).
		{Name: "team-a", Path: filepath.Join(f.host, "team-a"), Namespaces: []string{"team-a"}},
		{Name: "team-a-writer", Path: filepath.Join(f.host, "team-a"), Namespaces: []string{"team-a"}, ServiceAccounts: []string{"team-a/writer"}},
		{Name: "team-a-socket", Path: filepath.Join(f.host, "apm.socket"), Namespaces: []string{"team-a"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		NodeID:         "node-1",
		KubeletDir:     f.kubelet,
		StateDir:       f.state,
		HostDirs:       set,
		DatadogSockets: map[string]string{volumeattrs.TypeDSDSocket: "dsd-undeclared", volumeattrs.TypeAPMSocketDirectory: "team-a-socket"},
		Mounter:        f.m,
		WritableLayers: f.wl,
		Libraries:      f.store,
		Logger:         slog.New(slog.NewJSONHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	for _, o := range opts {
		o(&cfg)
	}
	f.d, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.d.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	return f
}

// target returns a kubelet-style target path for pod uid.
func (f *fixture) target(uid string) string {
	return filepath.Join(f.kubelet, "pods", uid, "volumes", "kubernetes.io~csi", "vol", "mount")
}

func mountCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

func (f *fixture) publishReq(volumeID, target string, attrs map[string]string) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{
		VolumeId:         volumeID,
		TargetPath:       target,
		VolumeCapability: mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER),
		VolumeContext:    attrs,
	}
}

func hostdirAttrs(name string) map[string]string {
	return map[string]string{"type": "hostdir", "name": name, "csi.storage.k8s.io/pod.name": "app", "csi.storage.k8s.io/pod.namespace": "default", "csi.storage.k8s.io/ephemeral": "true"}
}

func libraryAttrs(images ...string) map[string]string {
	a := map[string]string{"type": "library"}
	for i, img := range images {
		a[volumeattrs.LibraryKey(i, "image")] = img
	}
	return a
}

func wantCode(t *testing.T, err error, code codes.Code, contains ...string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("code = %v (%v), want %v", status.Code(err), err, code)
	}
	for _, c := range contains {
		if !strings.Contains(status.Convert(err).Message(), c) {
			t.Fatalf("message %q does not contain %q", status.Convert(err).Message(), c)
		}
	}
}

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
		}, code: codes.InvalidArgument, contains: []string{"read-only", "ro-data (read-only)"}},
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
	f := newFixture(t)
	target := f.target("pod-a")
	req := f.publishReq("vol-1", target, hostdirAttrs("data"))
	for range 100 {
		if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.m.Mounts(target); n != 1 {
		t.Fatalf("100 publishes stacked %d mounts, want 1", n)
	}

	// Same target, another volume.
	_, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-2", target, hostdirAttrs("data")))
	wantCode(t, err, codes.AlreadyExists, `already holds volume "vol-1"`)

	// Same volume, now asked read-only while it is mounted writable.
	ro := f.publishReq("vol-1", target, hostdirAttrs("data"))
	ro.Readonly = true
	_, err = f.d.NodePublishVolume(context.Background(), ro)
	wantCode(t, err, codes.AlreadyExists, "read-only")

	// A read-only entry served read-only is not a conflict when repeated.
	roTarget := f.target("pod-b")
	for range 2 {
		req := f.publishReq("vol-3", roTarget, hostdirAttrs("ro-data"))
		req.Readonly = true
		if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
			t.Fatal(err)
		}
	}

	// A mount this plugin did not make.
	foreign := f.target("pod-c")
	if err := os.MkdirAll(foreign, 0o755); err != nil {
		t.Fatal(err)
	}
	f.m.Add(mounter.Entry{MountPoint: foreign, FsType: "tmpfs"})
	_, err = f.d.NodePublishVolume(context.Background(), f.publishReq("vol-4", foreign, hostdirAttrs("data")))
	wantCode(t, err, codes.AlreadyExists, "no record")
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
			f.store.errs["r.local/bad:v1"] = tt.err
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

func TestUnpublish(t *testing.T) {
	f := newFixture(t)
	target := f.target("pod-a")
	unpublish := func(volumeID, target string) error {
		_, err := f.d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target})
		return err
	}
	wantCode(t, unpublish("", target), codes.InvalidArgument, "volume_id")
	wantCode(t, unpublish("v", ""), codes.InvalidArgument, "target_path")
	// Paths that are not kubelet CSI targets are not this plugin's to touch: OK, nothing done.
	f.m.Calls = nil
	for _, p := range []string{"/etc/passwd", f.kubelet + "/pods/../plugins/x", f.kubelet + "/pods/u/volumes/kubernetes.io~csi/v/mount/.."} {
		if err := unpublish("v", p); err != nil {
			t.Fatalf("unpublish of %s: %v", p, err)
		}
	}
	if len(f.m.Calls) != 0 {
		t.Fatalf("unpublish of paths that are not targets called the mounter: %q", f.m.Calls)
	}
	if err := unpublish("never", target); err != nil {
		t.Fatalf("unpublish of a never-published target: %v", err)
	}

	if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", target, hostdirAttrs("data"))); err != nil {
		t.Fatal(err)
	}
	// Another volume id at this target: the mount belongs to vol-1 and stays.
	if err := unpublish("vol-other", target); err != nil {
		t.Fatal(err)
	}
	if f.m.Mounts(target) != 1 {
		t.Fatal("unpublish of another volume removed this one's mount")
	}
	for range 2 {
		if err := unpublish("vol-1", target); err != nil {
			t.Fatal(err)
		}
	}
	if f.m.Len() != 0 || len(f.d.Records()) != 0 {
		t.Fatal("unpublish left state")
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatal("target not removed")
	}
	// Data in the host dir is untouched.
	if _, err := os.Stat(filepath.Join(f.host, "data")); err != nil {
		t.Fatal(err)
	}

	// Stacked mounts from an older, non-idempotent publish are all removed.
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		f.m.Add(mounter.Entry{MountPoint: target, FsType: "bind"})
	}
	if err := unpublish("vol-1", target); err != nil {
		t.Fatal(err)
	}
	if f.m.Mounts(target) != 0 {
		t.Fatalf("%d stacked mounts left", f.m.Mounts(target))
	}

	// A target holding data that did not come from the plugin is reported, not deleted.
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "keep"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	wantCode(t, unpublish("vol-1", target), codes.Internal, "non-empty")
	if _, err := os.Stat(filepath.Join(target, "keep")); err != nil {
		t.Fatal("unpublish deleted data")
	}

	f.m.Errors["unmount"] = errors.New("EBUSY")
	if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-2", f.target("pod-b"), hostdirAttrs("data"))); err != nil {
		t.Fatal(err)
	}
	wantCode(t, unpublish("vol-2", f.target("pod-b")), codes.Internal, "EBUSY")
	if len(f.d.Records()) != 1 {
		t.Fatal("the record of a volume that is still mounted was dropped")
	}
}

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

func TestKeyedLocks(t *testing.T) {
	l := keyedLocks{held: map[string]*keyedLock{}}
	unlockA, err := l.lock(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	// Another key does not wait.
	unlockB, err := l.lock(context.Background(), "b")
	if err != nil {
		t.Fatal(err)
	}
	unlockB()
	// The same key waits until its context ends.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := l.lock(ctx, "x", "a"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second lock of a held key: %v", err)
	}
	// "x" was released when "a" could not be taken.
	unlockX, err := l.lock(context.Background(), "x")
	if err != nil {
		t.Fatal(err)
	}
	unlockX()
	got, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		u, _ := l.lock(context.Background(), "a")
		close(got)
		u()
	}()
	select {
	case <-got:
		t.Fatal("lock taken while held")
	case <-time.After(20 * time.Millisecond):
	}
	unlockA()
	<-got
	<-done // the waiter has unlocked too
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.held) != 0 {
		t.Fatalf("lock entries leaked: %v", l.held)
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

func TestLoggingRedactsTokens(t *testing.T) {
	f := newFixture(t)
	sock := filepath.Join(t.TempDir(), "csi.sock")
	lis, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	srv := NewGRPCServer(f.d, slog.New(slog.NewJSONHandler(&logs, nil)))
	go srv.Serve(lis)
	defer srv.Stop()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	attrs := hostdirAttrs("data")
	attrs["csi.storage.k8s.io/serviceAccount.tokens"] = `{"aud":{"token":"eyJhbGciOiJSUzI1NiJ9.SECRET-TOKEN"}}`
	req := f.publishReq("vol-1", f.target("pod-a"), attrs)
	req.Secrets = map[string]string{"password": "SECRET-PASSWORD"}
	if _, err := csi.NewNodeClient(conn).NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	out := logs.String() + f.logs.String()
	if strings.Contains(out, "SECRET") {
		t.Fatalf("a secret reached the logs: %s", out)
	}
	for _, want := range []string{`"volume":"vol-1"`, `"pod":"default/app"`, `"code":"OK"`} {
		if !strings.Contains(logs.String(), want) {
			t.Fatalf("log lacks %s: %s", want, logs.String())
		}
	}
	rec := f.d.Records()[0]
	if _, ok := rec.Attributes["csi.storage.k8s.io/serviceAccount.tokens"]; ok {
		t.Fatal("the state record kept the service account tokens")
	}
	var data []byte
	files, _ := os.ReadDir(f.d.store.Dir())
	for _, e := range files {
		b, _ := os.ReadFile(filepath.Join(f.d.store.Dir(), e.Name()))
		data = append(data, b...)
	}
	if !strings.Contains(string(data), rec.Key()) {
		t.Fatalf("the record is not in the state dir %s", f.d.store.Dir())
	}
	if strings.Contains(string(data), "SECRET") {
		t.Fatal("a secret reached the state dir")
	}
}

func TestListenUnixRemovesStaleSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "sub", "csi.sock")
	l1, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	// A crashed process leaves its socket file behind.
	l1.(*net.UnixListener).SetUnlinkOnClose(false)
	l1.Close()
	l2, err := ListenUnix(sock)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l2.Close()
	notSock := filepath.Join(dir, "file")
	os.WriteFile(notSock, []byte("x"), 0o644)
	if _, err := ListenUnix(notSock); err == nil {
		t.Fatal("a regular file at the endpoint was removed")
	}
}

func TestSocketPath(t *testing.T) {
	for in, want := range map[string]string{"unix:///a/b.sock": "/a/b.sock", "unix:/a/b.sock": "/a/b.sock", "/a/./b.sock": "/a/b.sock"} {
		if got, err := SocketPath(in); err != nil || got != want {
			t.Errorf("SocketPath(%q) = %q, %v", in, got, err)
		}
	}
	for _, bad := range []string{"tcp://1.2.3.4:5", "unix://rel.sock", ""} {
		if _, err := SocketPath(bad); err == nil {
			t.Errorf("SocketPath(%q) accepted", bad)
		}
	}
}

func TestIdentity(t *testing.T) {
	f := newFixture(t)
	info, _ := f.d.GetPluginInfo(context.Background(), &csi.GetPluginInfoRequest{})
	if info.GetName() != "csi.apm-csi.io" || info.GetVendorVersion() == "" {
		t.Fatalf("plugin info %+v", info)
	}
	probe, _ := f.d.Probe(context.Background(), &csi.ProbeRequest{})
	if !probe.GetReady().GetValue() {
		t.Fatal("not ready after reconcile")
	}
	ni, _ := f.d.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	if ni.GetNodeId() != "node-1" {
		t.Fatalf("node id %q", ni.GetNodeId())
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
