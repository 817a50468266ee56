// Package nodeplugin holds the root-only integration tests of the node plugin: real bind and
// overlay mounts under a temporary kubelet dir, the gRPC server over a unix socket, restarts,
// the mount-leak test and the publish benchmark.
package nodeplugin

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/apm-csi/apm-csi/nodeplugin/driver"
	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// dirStore stands in for the library cache (nodeplugin/librarycache, tested on its own): it
// serves immutable directories that the test filled, which is all the driver relies on.
type dirStore struct {
	root string
	mu   sync.Mutex
	errs map[string]error
}

// layerDir returns (creating it with one file naming the image) the directory for an image.
func (s *dirStore) layerDir(image string) (string, string, error) {
	sum := sha256.Sum256([]byte(image))
	digest := "sha256:" + hex.EncodeToString(sum[:])
	dir := filepath.Join(s.root, "layers", hex.EncodeToString(sum[:6]))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", err
	}
	name := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(image))
	if err := os.WriteFile(name, []byte(image+"\n"), 0o644); err != nil {
		return "", "", err
	}
	return dir, digest, nil
}

func (s *dirStore) Layer(ctx context.Context, lib volumeattrs.Library) (driver.Layer, error) {
	s.mu.Lock()
	err := s.errs[lib.Image]
	s.mu.Unlock()
	if err != nil {
		return driver.Layer{}, err
	}
	dir, digest, err := s.layerDir(lib.Image)
	return driver.Layer{Dir: dir, Digest: digest}, err
}

func (s *dirStore) GeneratedFiles(files map[string]string) (string, error) {
	h := sha256.New()
	for _, k := range slices.Sorted(maps.Keys(files)) {
		fmt.Fprintf(h, "%s\x00%s\x00", k, files[k])
	}
	dir := filepath.Join(s.root, "generated", hex.EncodeToString(h.Sum(nil))[:12])
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return "", err
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return "", err
		}
	}
	return dir, nil
}

// plugin is a running node plugin over a temporary kubelet dir.
type plugin struct {
	t       testing.TB
	root    string
	kubelet string
	state   string
	host    string
	sock    string
	store   *dirStore
	hosts   *hostdir.Set
	drv     *driver.Driver
	srv     *grpc.Server
	conn    *grpc.ClientConn
	node    csi.NodeClient
	log     *slog.Logger
	mounter *mounter.Linux
}

// startPlugin creates the directories, the allowlist (data: writable dir, shared: read-only
// dir, apm-socket: a unix socket file, demo: created on demand) and starts the server.
func startPlugin(t testing.TB) *plugin {
	t.Helper()
	testenv.RequireRoot(t)
	root := t.TempDir()
	p := &plugin{
		t:       t,
		root:    root,
		kubelet: filepath.Join(root, "kubelet"),
		state:   filepath.Join(root, "state"),
		host:    filepath.Join(root, "host"),
		sock:    filepath.Join(root, "csi.sock"),
		store:   &dirStore{root: filepath.Join(root, "cache"), errs: map[string]error{}},
		log:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		mounter: mounter.New(),
	}
	if testing.Verbose() {
		p.log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	for _, d := range []string{"data", "shared"} {
		if err := os.MkdirAll(filepath.Join(p.host, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { unmountUnder(t, root) })
	var err error
	p.hosts, err = hostdir.NewSet([]hostdir.Entry{
		{Name: "data", Path: filepath.Join(p.host, "data")},
		{Name: "shared", Path: filepath.Join(p.host, "shared"), ReadOnly: true},
		{Name: "apm-socket", Path: filepath.Join(p.host, "apm.socket")},
		{Name: "demo", Path: filepath.Join(p.host, "demo"), Create: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	p.start()
	t.Cleanup(p.stop)
	return p
}

// start runs a new driver over the plugin's state dir, as a restarted process would.
func (p *plugin) start() {
	p.t.Helper()
	d, err := driver.New(driver.Config{
		NodeID:     "node-1",
		KubeletDir: p.kubelet,
		StateDir:   p.state,
		HostDirs:   p.hosts,
		Mounter:    p.mounter,
		Libraries:  p.store,
		Logger:     p.log,
	})
	if err != nil {
		p.t.Fatal(err)
	}
	if err := d.Reconcile(context.Background()); err != nil {
		p.t.Fatal(err)
	}
	lis, err := driver.ListenUnix(p.sock)
	if err != nil {
		p.t.Fatal(err)
	}
	p.drv = d
	p.srv = driver.NewGRPCServer(d, p.log)
	go p.srv.Serve(lis)
	p.conn, err = grpc.NewClient("unix://"+p.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		p.t.Fatal(err)
	}
	p.node = csi.NewNodeClient(p.conn)
}

func (p *plugin) stop() {
	if p.srv == nil {
		return
	}
	p.conn.Close()
	driver.Shutdown(p.srv, 0)
	p.srv = nil
}

func (p *plugin) restart() {
	p.stop()
	p.start()
}

// target returns the path kubelet would pass for a CSI volume of pod uid.
func (p *plugin) target(uid, volume string) string {
	dir := filepath.Join(p.kubelet, "pods", uid, "volumes", "kubernetes.io~csi", volume)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		p.t.Fatal(err)
	}
	return filepath.Join(dir, "mount")
}

func (p *plugin) publish(volumeID, target string, attrs map[string]string, readonly bool) error {
	_, err := p.node.NodePublishVolume(context.Background(), &csi.NodePublishVolumeRequest{
		VolumeId:   volumeID,
		TargetPath: target,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		VolumeContext: attrs,
		Readonly:      readonly,
	})
	return err
}

func (p *plugin) mustPublish(volumeID, target string, attrs map[string]string, readonly bool) {
	p.t.Helper()
	if err := p.publish(volumeID, target, attrs, readonly); err != nil {
		p.t.Fatalf("publish %s at %s: %v", volumeID, target, err)
	}
}

func (p *plugin) unpublish(volumeID, target string) error {
	_, err := p.node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target})
	return err
}

func (p *plugin) mustUnpublish(volumeID, target string) {
	p.t.Helper()
	if err := p.unpublish(volumeID, target); err != nil {
		p.t.Fatalf("unpublish %s at %s: %v", volumeID, target, err)
	}
}

func ephemeral(attrs map[string]string, pod string) map[string]string {
	out := maps.Clone(attrs)
	out["csi.storage.k8s.io/ephemeral"] = "true"
	out["csi.storage.k8s.io/pod.name"] = pod
	out["csi.storage.k8s.io/pod.namespace"] = "default"
	out["csi.storage.k8s.io/pod.uid"] = pod + "-uid"
	return out
}

// mountsUnder returns the mount table lines (minus the mount ids, which change) that mention
// root: mounts on it and overlays whose layers live in it. Other tests of the same machine may
// mount elsewhere at the same time; this is the part of the table this test owns.
func mountsUnder(t testing.TB, root string) []string {
	t.Helper()
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range table {
		line := fmt.Sprintf("%s %s %s %s %s %s", e.MountPoint, e.FsType, e.Source, e.Root, strings.Join(e.MountOptions, ","), strings.Join(e.SuperOptions, ","))
		if strings.Contains(line, root+"/") {
			out = append(out, line)
		}
	}
	return out
}

// countMounts returns how many mounts are stacked on path.
func countMounts(t testing.TB, path string) int {
	t.Helper()
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range table {
		if e.MountPoint == path {
			n++
		}
	}
	return n
}

// unmountUnder detaches any mount a failed test left under root, deepest first, so that the
// temporary directory is deleted without reaching through a mount into a source directory.
func unmountUnder(t testing.TB, root string) {
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Error(err)
		return
	}
	for i := len(table) - 1; i >= 0; i-- {
		if mp := table[i].MountPoint; strings.HasPrefix(mp, root+"/") {
			t.Errorf("mount left behind at %s", mp)
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				t.Errorf("unmount %s: %v", mp, err)
			}
		}
	}
}
