package driver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
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
