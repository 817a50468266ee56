// Package driver is the CSI node service of apm-csi: Identity (identity.go) and Node (node.go,
// the publish of hostdir, library and preload volumes in publish.go, unpublish.go), the index of
// the per-target records that survive restarts (records.go), and the startup reconcile against
// the mount table (reconcile.go). server.go puts the services on a gRPC server.
package driver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/apm-csi/apm-csi/nodeplugin/fdpath"
	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/keylock"
	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/names"
)

// DefaultPublishDownloadBudget bounds how long NodePublishVolume waits for a library download.
// kubelet's own deadline is about two minutes and cannot be configured; returning a non-final
// code well before it lets kubelet retry while the download goes on in the background.
const DefaultPublishDownloadBudget = 60 * time.Second

// Config is everything the driver needs; main fills it from flags.
type Config struct {
	// DriverName defaults to names.DriverName.
	DriverName string
	NodeID     string
	// KubeletDir is kubelet's root dir; targets must be exactly
	// <KubeletDir>/pods/<pod-uid>/volumes/kubernetes.io~csi/<volume>/mount.
	KubeletDir string
	// StateDir is the host directory for records and overlay upper/work dirs. It must not be
	// on an overlayfs (a container's root filesystem): overlayfs refuses such an upper dir.
	StateDir string
	// HostDirs is the administrator's allowlist; nil means none.
	HostDirs *hostdir.Set
	// DatadogSockets maps Datadog socket volume types to hostdir entry names; missing types
	// get hostdir.DefaultDatadogSockets.
	DatadogSockets map[string]string
	Mounter        mounter.Interface
	// Libraries serves library layers and generated files. Nil: library and preload volumes
	// fail with FailedPrecondition, hostdir volumes work.
	Libraries library.Store
	// PublishDownloadBudget defaults to DefaultPublishDownloadBudget.
	PublishDownloadBudget time.Duration
	// WritableLayers creates the size-limited upper/work dirs of writable library volumes in
	// OverlaysDir(StateDir): writablelayer.New in the binary, writablelayer.Fake in unit tests.
	WritableLayers writablelayer.Interface
	// DefaultWritableLimit is a writable library volume's limit (bytes) when it sets no
	// writableLimit attribute, MaxWritableLimit the most an attribute may ask for. Zero takes
	// writablelayer.DefaultLimit and writablelayer.DefaultMaxLimit.
	DefaultWritableLimit, MaxWritableLimit int64
	// KeepWritableLayers keeps a writable library volume's upper dir when its target is found
	// unmounted (a node reboot) while its pod may still exist, and mounts it again when
	// kubelet publishes the same volume at the same target (see keep.go). It needs
	// ProjectQuota writable layers: a tmpfs one cannot outlive a reboot.
	KeepWritableLayers bool
	// KeptLayerGrace is how long a kept upper dir stays after its pod's dir in kubelet's pods
	// dir is seen gone; zero takes DefaultKeptLayerGrace.
	KeptLayerGrace time.Duration
	// MaxKeptWritableBytes bounds the bytes all kept layers (those whose target is not
	// mounted) take together; above it the oldest are removed. Zero: no bound beyond each
	// layer's own limit.
	MaxKeptWritableBytes int64
	// Now is the clock of the kept layers' grace period; nil takes time.Now.
	Now    func() time.Time
	Logger *slog.Logger
	// Metrics defaults to an unregistered set (for tests).
	Metrics *Metrics
}

// Driver implements csi.IdentityServer and csi.NodeServer.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer

	cfg         Config
	log         *slog.Logger
	mounter     mounter.Interface
	sources     *hostdir.Sources
	store       *state.Store
	podsDir     string
	overlaysDir string
	// emptyDir is an empty directory the plugin owns: the second lower dir of a read-only
	// overlay of a single layer.
	emptyDir string
	// releaseEmpty undoes the empty dir's own mount (Close).
	releaseEmpty func() error
	writable     writablelayer.Interface
	metrics      *Metrics
	// lateClose closes the targets unpublish removes, after it returns.
	lateClose lateCloser
	// locks serialises the calls on one volume and one target: every caller takes
	// "volume/<id>" then "target/<path>", in that order.
	locks keylock.Locks
	ready atomic.Bool
	// verified is closed when Start's background check of the records is done; stopVerify
	// stops it (Close).
	verified   chan struct{}
	stopVerify context.CancelFunc

	mu sync.Mutex
	// byTarget mirrors the records on disk, keyed by target path.
	byTarget map[string]*state.Record
	// inFlight counts, per layer dir and digest, the publishes that hold it before their record
	// exists, so the cache's garbage collector does not remove a layer about to be mounted.
	inFlight map[string]int
	// podGone holds, per record key, when a kept layer's pod dir was first seen gone.
	podGone map[string]time.Time
}

// New validates cfg and opens the state dir. The driver answers Probe with ready=false and
// refuses publishes until Reconcile has run.
func New(cfg Config) (*Driver, error) {
	if err := cfg.withDefaults(); err != nil {
		return nil, err
	}
	// Resolve the allowlist once: the administrator's links are followed now and never
	// again, and entries nested in entries pods can change are refused.
	sources, err := hostdir.Resolve(cfg.HostDirs)
	if err != nil {
		return nil, err
	}
	empty, releaseEmpty, err := prepareEmptyDir(cfg.Mounter, cfg.StateDir)
	if err != nil {
		return nil, err
	}
	store, err := state.Open(cfg.StateDir)
	if err != nil {
		return nil, errors.Join(err, releaseEmpty())
	}
	overlays := OverlaysDir(cfg.StateDir)
	if err := os.MkdirAll(overlays, 0o700); err != nil {
		return nil, errors.Join(fmt.Errorf("state dir: %w", err), store.Close(), releaseEmpty())
	}
	logStartup(cfg, sources)
	return &Driver{
		cfg:          cfg,
		log:          cfg.Logger,
		mounter:      cfg.Mounter,
		sources:      sources,
		store:        store,
		podsDir:      filepath.Join(cfg.KubeletDir, "pods"),
		overlaysDir:  overlays,
		emptyDir:     empty,
		releaseEmpty: releaseEmpty,
		writable:     cfg.WritableLayers,
		metrics:      cfg.Metrics,
		byTarget:     map[string]*state.Record{},
		inFlight:     map[string]int{},
		podGone:      map[string]time.Time{},
		verified:     make(chan struct{}),
	}, nil
}

// withDefaults checks cfg and fills in the defaults of what is left zero.
func (cfg *Config) withDefaults() error {
	if cfg.DriverName == "" {
		cfg.DriverName = names.DriverName
	}
	if cfg.NodeID == "" {
		return errors.New("node id is empty: set --node-id (usually from spec.nodeName)")
	}
	if cfg.Mounter == nil {
		return errors.New("no mounter configured")
	}
	if cfg.WritableLayers == nil {
		return errors.New("no writable layer mechanism configured (writablelayer.New)")
	}
	if cfg.DefaultWritableLimit == 0 {
		cfg.DefaultWritableLimit = writablelayer.DefaultLimit
	}
	if cfg.MaxWritableLimit == 0 {
		cfg.MaxWritableLimit = writablelayer.DefaultMaxLimit
	}
	if cfg.KeepWritableLayers && cfg.WritableLayers.Mechanism() != writablelayer.ProjectQuota {
		return fmt.Errorf("keeping writable layers across node reboots (--keep-writable-layers) needs project-quota writable layers on the state dir's filesystem, not %s: a tmpfs layer does not outlive a reboot; enable project quotas there (see docs/node-plugin.md) or drop --keep-writable-layers", cfg.WritableLayers.Mechanism())
	}
	if cfg.KeptLayerGrace <= 0 {
		cfg.KeptLayerGrace = DefaultKeptLayerGrace
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.DefaultWritableLimit < 0 || cfg.DefaultWritableLimit > cfg.MaxWritableLimit {
		return fmt.Errorf("the default writable layer size %s must be positive and at most the maximum %s (--default-writable-layer, --max-writable-layer)",
			writablelayer.FormatBytes(cfg.DefaultWritableLimit), writablelayer.FormatBytes(cfg.MaxWritableLimit))
	}
	for _, dir := range []*string{&cfg.KubeletDir, &cfg.StateDir} {
		if !filepath.IsAbs(*dir) {
			return fmt.Errorf("%q must be an absolute path", *dir)
		}
		*dir = filepath.Clean(*dir)
	}
	if cfg.HostDirs == nil {
		cfg.HostDirs, _ = hostdir.NewSet(nil)
	}
	sockets := hostdir.DefaultDatadogSockets()
	for typ, entry := range cfg.DatadogSockets {
		sockets[typ] = entry
	}
	cfg.DatadogSockets = sockets
	if cfg.PublishDownloadBudget <= 0 {
		cfg.PublishDownloadBudget = DefaultPublishDownloadBudget
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	return nil
}

// prepareEmptyDir makes <state-dir>/empty, the empty lower dir of read-only library
// overlays, checks that it is an empty directory and gives it a mount of its own. The
// returned func releases that mount.
func prepareEmptyDir(m mounter.Interface, stateDir string) (dir string, release func() error, err error) {
	empty := filepath.Join(stateDir, "empty")
	if err := os.MkdirAll(empty, 0o755); err != nil {
		return "", nil, fmt.Errorf("state dir: %w", err)
	}
	fi, err := os.Lstat(empty)
	if err != nil {
		return "", nil, fmt.Errorf("state dir: %w", err)
	} else if !fi.IsDir() {
		return "", nil, fmt.Errorf("state dir: %s must be a directory (the empty lower dir of read-only library overlays); remove it and start again", empty)
	}
	// Left as it is when it is already (the read-only mount a crash left is).
	if fi.Mode().Perm() != 0o555 {
		if err := os.Chmod(empty, 0o555); err != nil {
			return "", nil, fmt.Errorf("state dir: %w", err)
		}
	}
	names, err := os.ReadDir(empty)
	if err != nil {
		return "", nil, fmt.Errorf("state dir: %w", err)
	}
	if len(names) > 0 {
		return "", nil, fmt.Errorf("state dir: %s is the empty lower dir of read-only library overlays and must stay empty, but holds %d entries; remove them and start again", empty, len(names))
	}
	// The empty dir is a mount of its own: overlayfs clones the mount holding each lower
	// dir and walks that mount's children, and the state dir's mount has every writable
	// layer's tmpfs and often every pod's target below it, so an overlay with the empty dir
	// as a lower would cost time in proportion to the volumes published
	// (mounter.OwnMount). It is an empty read-only tmpfs (mounter.Interface.EmptyMount): a
	// bind mount would itself walk those mounts at every start. Released by Close; a crash
	// leaves it for the next start to reuse.
	releaseEmpty, err := m.EmptyMount(empty)
	if err != nil {
		return "", nil, fmt.Errorf("state dir: the empty lower dir %s: %w", empty, err)
	}
	return empty, releaseEmpty, nil
}

// logStartup logs how host paths are resolved and every hostdir entry, once at start.
func logStartup(cfg Config, sources *hostdir.Sources) {
	if f, ok := cfg.Mounter.(interface{ Features() string }); ok {
		cfg.Logger.Info("host paths", "resolution", fdpath.Mode(), "mounts", f.Features())
	}
	for _, name := range sources.Names() {
		src := sources.Get(name)
		cfg.Logger.Info("hostdir entry", "entry", name, "path", src.Entry.Path, "resolved", src.Resolved, "kind", src.Kind(), "readOnly", src.Entry.ReadOnly, "create", src.Entry.Create)
	}
}

// Close stops the background check of Start, waits for it, releases the state journal and
// the empty dir's own mount. Call it once the gRPC server has stopped; the volumes' mounts
// stay (an overlay keeps its own private copy of the empty dir's mount).
func (d *Driver) Close() error {
	if d.stopVerify != nil {
		d.stopVerify()
		<-d.verified
	}
	d.lateClose.stop()
	return errors.Join(d.store.Close(), d.releaseEmpty())
}

// Name returns the CSI driver name.
func (d *Driver) Name() string { return d.cfg.DriverName }

// Ready reports whether the startup reconcile has completed.
func (d *Driver) Ready() bool { return d.ready.Load() }
