package plugin

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"google.golang.org/grpc"

	"github.com/apm-csi/apm-csi/nodeplugin/driver"
	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
)

// driverNode is the real node: the CSI driver over the library cache, with the cache's
// garbage collection.
type driverNode struct {
	*driver.Driver
	log          *slog.Logger
	cache        *librarycache.Cache
	releaseStore func() error
	writable     *writablelayer.Manager
	gcInterval   time.Duration
	stopGC       context.CancelFunc
	gcDone       chan struct{}
}

// newDriverNode opens the library cache (its store a mount of its own) and the driver with
// its state journal. On error, what was opened is closed again.
func newDriverNode(ctx context.Context, o Options, hostDirs *hostdir.Set) (_ node, err error) {
	log := o.Logger
	o.Cache.Logger = log
	o.Cache.Registerer = o.Metrics
	n := &driverNode{log: log, gcInterval: o.GCInterval}
	defer func() {
		if err != nil {
			n.closeCache()
		}
	}()
	// The store is a mount of its own, so that composing an overlay from its layers costs
	// the same however many volumes are published (mounter.OwnMount). Undone after the cache
	// is closed; a crash leaves it for the next start to reuse.
	if n.releaseStore, err = mounter.OwnMount(o.Cache.StoreDir); err != nil {
		return nil, fmt.Errorf("library cache: %w", err)
	}
	if n.cache, err = librarycache.New(o.Cache); err != nil {
		return nil, fmt.Errorf("library cache: %w", err)
	}
	// Start removes what a crash left in the store and starts prefetching in the background,
	// so the first pod on a new node finds its libraries ready.
	if err := n.cache.Start(ctx); err != nil {
		return nil, fmt.Errorf("library cache: %w", err)
	}

	writable, err := writablelayer.New(driver.OverlaysDir(o.StateDir), o.WritableLayer, writablelayer.WithLogger(log))
	if err != nil {
		return nil, fmt.Errorf("writable layers (--writable-layer-mechanism=%s): %w", o.WritableLayer, err)
	}
	n.writable = writable
	log.Info("writable layers of library volumes", "mechanism", writable.Mechanism(), "reason", writable.Reason(),
		"default", writablelayer.FormatBytes(o.DefaultWritableLayer), "max", writablelayer.FormatBytes(o.MaxWritableLayer))

	n.Driver, err = driver.New(driver.Config{
		DriverName:            o.DriverName,
		NodeID:                o.NodeID,
		KubeletDir:            o.KubeletDir,
		StateDir:              o.StateDir,
		HostDirs:              hostDirs,
		DatadogSockets:        o.DatadogSockets,
		Mounter:               mounter.New(),
		Libraries:             n.cache,
		PublishDownloadBudget: o.PublishDownloadBudget,
		WritableLayers:        writable,
		DefaultWritableLimit:  o.DefaultWritableLayer,
		MaxWritableLimit:      o.MaxWritableLayer,
		KeepWritableLayers:    o.KeepWritableLayers,
		KeptLayerGrace:        o.KeptLayerGrace,
		MaxKeptWritableBytes:  o.MaxKeptWritable,
		Logger:                log,
		Metrics:               driver.NewMetrics(o.Metrics),
	})
	if err != nil {
		return nil, err
	}
	return n, nil
}

func (n *driverNode) NewGRPCServer() *grpc.Server { return driver.NewGRPCServer(n.Driver, n.log) }

// Start runs the driver's start-up reconcile (the check of each record's target against the
// mount table goes on in the background; Close stops and waits for it), then starts the
// library cache's garbage collection.
func (n *driverNode) Start(ctx context.Context) error {
	if err := n.Driver.Start(ctx); err != nil {
		return err
	}
	ctx, n.stopGC = context.WithCancel(ctx)
	n.gcDone = make(chan struct{})
	go func() {
		defer close(n.gcDone)
		n.collectGarbage(ctx)
	}()
	return nil
}

// Close stops garbage collection, closes the driver (its state journal), then the cache, then
// undoes the store's own mount.
func (n *driverNode) Close() error {
	if n.stopGC != nil {
		n.stopGC()
		<-n.gcDone
	}
	err := n.Driver.Close()
	n.closeCache()
	return err
}

// closeCache closes the library cache and undoes the store's own mount, and stops removing
// released writable layers (the next start removes what is left).
func (n *driverNode) closeCache() {
	if n.writable != nil {
		n.writable.Close()
	}
	if n.cache != nil {
		n.cache.Close()
	}
	if n.releaseStore != nil {
		if err := n.releaseStore(); err != nil {
			n.log.Warn("leaving the library store's own mount in place", "err", err)
		}
	}
}

// collectGarbage garbage-collects the library cache once now (what a crash or a reboot left
// behind) and then every interval until ctx ends. The driver's view of what is in use
// (records, publishes in flight, the mount table) guards every removal.
func (n *driverNode) collectGarbage(ctx context.Context) {
	ticker := time.NewTicker(n.gcInterval)
	defer ticker.Stop()
	for {
		if err := n.cache.GC(ctx, n.LibrariesInUse); err != nil && ctx.Err() == nil {
			n.log.Warn("library cache garbage collection failed; nothing was removed, retrying later", "err", err, "retryIn", n.gcInterval)
		}
		// Kept writable layers (--keep-writable-layers) whose pod is gone.
		if _, err := n.CollectKeptLayers(ctx); err != nil && ctx.Err() == nil {
			n.log.Warn("removing kept writable layers of gone pods failed; retrying later", "err", err, "retryIn", n.gcInterval)
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

var _ node = (*driverNode)(nil)
