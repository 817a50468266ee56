// Package nodeplugintest is the harness the node plugin's root-only test suites share: the
// CSI driver served over a real unix socket in a temporary kubelet dir (started, stopped and
// restarted as apm-csi-node would be), kubelet-like publish and unpublish calls, reads of the
// mount table, what a volume shows, and library images pushed to the test registry.
//
// The library store is the caller's choice (Config.Libraries): test/integration/nodeplugin
// serves fake directories, test/integration/library the real library cache. Assertions stay
// in the suites; this package only sets up, calls and reads.
package nodeplugintest

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/apm-csi/apm-csi/nodeplugin/driver"
	"github.com/apm-csi/apm-csi/nodeplugin/grpcserver"
	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// Config is what differs between the suites' plugins. Start reads it, so a field set between
// New and Start (one naming a directory under Root, say) takes effect, and so does a change
// before a restart.
type Config struct {
	// NodeID is what NodeGetInfo reports; empty means "node-1".
	NodeID string
	// HostDirs is the administrator's hostdir allowlist; nil declares none.
	HostDirs *hostdir.Set
	// Libraries opens the driver's library store. Start calls it every time, so that a store
	// living as long as the process (the real library cache, which locks its directory) is
	// opened afresh by each restart; Stop calls the close function it returns (nil: nothing
	// to close). A fake that outlives restarts returns itself each time. Nil: no store, and
	// library volumes fail.
	Libraries func() (store library.Store, closeStore func() error, err error)
	// PublishDownloadBudget is the driver's; zero takes the driver's default.
	PublishDownloadBudget time.Duration
	// DrainTimeout is how long Stop lets in-flight calls finish before cancelling them, as
	// apm-csi-node's drain timeout on SIGTERM; zero cancels them at once.
	DrainTimeout time.Duration
	// WritableLayer is the --writable-layer-mechanism; empty means auto, as in apm-csi-node.
	WritableLayer writablelayer.Mechanism
	// DefaultWritableLimit and MaxWritableLimit are the --default-writable-layer and
	// --max-writable-layer sizes (bytes); zero takes the driver's defaults.
	DefaultWritableLimit, MaxWritableLimit int64
	// KeepWritableLayers, KeptLayerGrace and MaxKeptWritableBytes are
	// --keep-writable-layers, --kept-writable-layer-grace and --max-kept-writable-bytes; Now
	// the driver's clock (nil: time.Now).
	KeepWritableLayers   bool
	KeptLayerGrace       time.Duration
	MaxKeptWritableBytes int64
	Now                  func() time.Time
	// WritableLayers replaces the writable layer mechanism New would choose (Writable is
	// then nil): writablelayer.Fake with Mech set stands in for project quotas on a kernel
	// without them, the overlays staying real.
	WritableLayers writablelayer.Interface
}

// Plugin is a node plugin over a temporary directory: the driver, its gRPC server on a unix
// socket, and a client connected to it as kubelet is.
type Plugin struct {
	// T is the test or benchmark the plugin belongs to; the helpers fail it.
	T      testing.TB
	Config Config
	// Root is the temporary directory holding everything below; cleanup checks that no mount
	// is left under it.
	Root string
	// Kubelet is kubelet's root dir (pods' volume targets lie in Kubelet/pods), State the
	// driver's state dir (records, overlay upper/work dirs), Sock the CSI socket.
	Kubelet, State, Sock string
	// Log receives the driver's and the server's logs. New makes it silent, or, with -v,
	// printing warnings to stderr; a test may replace it before Start.
	Log *slog.Logger

	// Driver and Node are those of the running plugin, replaced by each Start; Writable is
	// the driver's writable layer mechanism, chosen by each Start as apm-csi-node does
	// (nil when Config.WritableLayers replaces it).
	Driver   *driver.Driver
	Node     csi.NodeClient
	Writable *writablelayer.Manager

	srv            *grpc.Server
	served         chan error // what srv.Serve returned
	conn           *grpc.ClientConn
	closeLibraries func() error
}

// New lays out a plugin in a fresh temporary directory without starting it, so that a test
// can prepare what the plugin finds there (host directories, say) and fill in p.Config
// before Start. It skips the test unless it runs as root (it fails instead under CI). At
// cleanup the plugin is stopped and the test fails if any mount is left under Root (which is
// then detached, so that the directory can be removed).
func New(t testing.TB, cfg Config) *Plugin {
	t.Helper()
	testenv.RequireRoot(t)
	root := t.TempDir()
	if cfg.NodeID == "" {
		cfg.NodeID = "node-1"
	}
	p := &Plugin{
		T:       t,
		Config:  cfg,
		Root:    root,
		Kubelet: filepath.Join(root, "kubelet"),
		State:   filepath.Join(root, "state"),
		Sock:    filepath.Join(root, "csi.sock"),
		Log:     slog.New(slog.DiscardHandler),
	}
	if testing.Verbose() {
		p.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	// Registered before Stop, so it runs after it: the leak check sees the final state.
	t.Cleanup(func() { UnmountUnder(t, root) })
	t.Cleanup(p.Stop)
	return p
}

// Start runs a new plugin over the directories, as a new apm-csi-node process does and in
// its order: library store, driver, gRPC server, then the reconcile of what an earlier
// process left mounted; it returns once that reconcile is complete, its background check of
// the records' targets included.
func (p *Plugin) Start() {
	p.T.Helper()
	p.StartReady()
	<-p.Driver.Verified()
}

// StartReady is Start returning as soon as the driver is ready (as apm-csi-node answers
// Probe ready and registers with kubelet), while the records' targets may still be being
// checked in the background (driver.Start; <-p.Driver.Verified() waits for it).
func (p *Plugin) StartReady() {
	p.T.Helper()
	var libraries library.Store
	if p.Config.Libraries != nil {
		store, closeStore, err := p.Config.Libraries()
		if err != nil {
			p.T.Fatal(err)
		}
		libraries, p.closeLibraries = store, closeStore
	}
	writable := p.Config.WritableLayers
	if writable == nil {
		manager, err := writablelayer.New(driver.OverlaysDir(p.State), p.Config.WritableLayer, writablelayer.WithLogger(p.Log))
		if err != nil {
			p.T.Fatal(err)
		}
		p.Writable, writable = manager, manager
	}
	d, err := driver.New(driver.Config{
		NodeID:                p.Config.NodeID,
		KubeletDir:            p.Kubelet,
		StateDir:              p.State,
		HostDirs:              p.Config.HostDirs,
		Mounter:               mounter.New(),
		Libraries:             libraries,
		PublishDownloadBudget: p.Config.PublishDownloadBudget,
		WritableLayers:        writable,
		DefaultWritableLimit:  p.Config.DefaultWritableLimit,
		MaxWritableLimit:      p.Config.MaxWritableLimit,
		KeepWritableLayers:    p.Config.KeepWritableLayers,
		KeptLayerGrace:        p.Config.KeptLayerGrace,
		MaxKeptWritableBytes:  p.Config.MaxKeptWritableBytes,
		Now:                   p.Config.Now,
		Logger:                p.Log,
	})
	if err != nil {
		p.T.Fatal(err)
	}
	lis, err := grpcserver.ListenUnix(p.Sock)
	if err != nil {
		p.T.Fatal(err)
	}
	p.Driver = d
	p.srv = driver.NewGRPCServer(d, p.Log)
	p.served = make(chan error, 1)
	go func(srv *grpc.Server, served chan<- error) { served <- srv.Serve(lis) }(p.srv, p.served)
	if err := d.Start(context.Background()); err != nil {
		p.T.Fatal(err)
	}
	p.conn, err = grpc.NewClient("unix://"+p.Sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		p.T.Fatal(err)
	}
	p.Node = csi.NewNodeClient(p.conn)
}

// Stop shuts the plugin down as SIGTERM does: the server drains, then the library store is
// closed. Mounts stay, as they do when a DaemonSet pod is replaced. Stopping a stopped plugin
// does nothing.
func (p *Plugin) Stop() {
	if p.srv != nil {
		if p.conn != nil {
			p.conn.Close()
		}
		grpcserver.Shutdown(p.srv, p.Config.DrainTimeout)
		if err := <-p.served; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			p.T.Errorf("the plugin's gRPC server: %v", err)
		}
		p.srv, p.served, p.conn = nil, nil, nil
		if err := p.Driver.Close(); err != nil {
			p.T.Errorf("closing the driver: %v", err)
		}
		if p.Writable != nil {
			// Released layers are removed in the background: waiting for that here makes
			// every test that stops the plugin check that they are.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if err := p.Writable.Flush(ctx); err != nil {
				p.T.Errorf("removing released writable layers: %v", err)
			}
			cancel()
			p.Writable.Close()
			p.Writable = nil
		}
	}
	if p.closeLibraries != nil {
		if err := p.closeLibraries(); err != nil {
			p.T.Errorf("closing the library store: %v", err)
		}
		p.closeLibraries = nil
	}
}

// Restart stops the plugin and starts a new one over the same directories.
func (p *Plugin) Restart() {
	p.T.Helper()
	p.Stop()
	p.Start()
}

// Target returns the path kubelet would pass for CSI volume `volume` of pod uid, creating its
// parent as kubelet does (the driver creates the target itself).
func (p *Plugin) Target(uid, volume string) string {
	p.T.Helper()
	dir := filepath.Join(p.Kubelet, "pods", uid, "volumes", "kubernetes.io~csi", volume)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		p.T.Fatal(err)
	}
	return filepath.Join(dir, "mount")
}

// Publish calls NodePublishVolume for a mount volume, as kubelet does for an inline or a
// single-node volume, with a kubelet-like deadline.
func (p *Plugin) Publish(volumeID, target string, attrs map[string]string, readonly bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, err := p.Node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
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

// MustPublish is Publish, failing the test on an error.
func (p *Plugin) MustPublish(volumeID, target string, attrs map[string]string, readonly bool) {
	p.T.Helper()
	if err := p.Publish(volumeID, target, attrs, readonly); err != nil {
		p.T.Fatalf("publish %s at %s: %v", volumeID, target, err)
	}
}

// Unpublish calls NodeUnpublishVolume with a kubelet-like deadline.
func (p *Plugin) Unpublish(volumeID, target string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := p.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target})
	return err
}

// MustUnpublish is Unpublish, failing the test on an error.
func (p *Plugin) MustUnpublish(volumeID, target string) {
	p.T.Helper()
	if err := p.Unpublish(volumeID, target); err != nil {
		p.T.Fatalf("unpublish %s at %s: %v", volumeID, target, err)
	}
}

// Ephemeral returns attrs plus what kubelet adds to an inline volume's attributes
// (podInfoOnMount) for pod, in namespace default with uid pod+"-uid".
func Ephemeral(attrs map[string]string, pod string) map[string]string {
	out := maps.Clone(attrs)
	out["csi.storage.k8s.io/ephemeral"] = "true"
	out["csi.storage.k8s.io/pod.name"] = pod
	out["csi.storage.k8s.io/pod.namespace"] = "default"
	out["csi.storage.k8s.io/pod.uid"] = pod + "-uid"
	return out
}

// EmptyDir is the plugin's empty lower dir (<state>/empty), a mount of its own while the
// plugin runs.
func (p *Plugin) EmptyDir() string { return filepath.Join(p.State, "empty") }

// MountsLeft is MountsUnder(Root) without the plugin's own mount of its empty dir: what a
// volume left behind.
func (p *Plugin) MountsLeft() []string {
	p.T.Helper()
	var out []string
	for _, m := range MountsUnder(p.T, p.Root) {
		if !strings.HasPrefix(m, p.EmptyDir()+" ") {
			out = append(out, m)
		}
	}
	return out
}
