package driver

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/library/librarytest"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

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
	store   *librarytest.Store
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
		store:   librarytest.New(filepath.Join(root, "cache")),
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
