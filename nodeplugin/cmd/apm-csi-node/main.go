// Command apm-csi-node is the apm-csi CSI node plugin: one container per node that serves the
// CSI Identity and Node services, registers itself with kubelet and answers its own health
// checks, so neither node-driver-registrar nor livenessprobe sidecars are needed.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/apm-csi/apm-csi/nodeplugin/driver"
	"github.com/apm-csi/apm-csi/nodeplugin/grpcserver"
	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/registration"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/version"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "apm-csi-node:", err)
		os.Exit(1)
	}
}

func run() error {
	o, err := parseFlags(os.Args[1:], os.Getenv, os.Stderr)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: o.logLevel}))
	slog.SetDefault(log)
	// mount-utils logs through klog; send it to the same JSON stream.
	klog.SetSlogLogger(log)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	hostDirs, err := hostdir.NewSet(o.hostDirs)
	if err != nil {
		return err
	}
	o.cache.Logger = log
	o.cache.Registerer = ctrlmetrics.Registry
	// The store is a mount of its own, so that composing an overlay from its layers costs
	// the same however many volumes are published (mounter.OwnMount). Undone after the cache
	// is closed; a crash leaves it for the next start to reuse.
	releaseStore, err := mounter.OwnMount(o.cache.StoreDir)
	if err != nil {
		return fmt.Errorf("library cache: %w", err)
	}
	defer func() {
		if err := releaseStore(); err != nil {
			log.Warn("leaving the library store's own mount in place", "error", err)
		}
	}()
	cache, err := librarycache.New(o.cache)
	if err != nil {
		return fmt.Errorf("library cache: %w", err)
	}
	defer cache.Close()
	// Start removes what a crash left in the store and starts prefetching in the background,
	// so the first pod on a new node finds its libraries ready.
	if err := cache.Start(ctx); err != nil {
		return fmt.Errorf("library cache: %w", err)
	}
	var libraries driver.LibraryStore = cache

	writable, err := writablelayer.New(driver.OverlaysDir(o.stateDir), o.writableLayer)
	if err != nil {
		return fmt.Errorf("writable layers (--writable-layer-mechanism=%s): %w", o.writableLayer, err)
	}
	log.Info("writable layers of library volumes", "mechanism", writable.Mechanism(), "reason", writable.Reason(),
		"default", writablelayer.FormatBytes(o.defaultWritableLayer), "max", writablelayer.FormatBytes(o.maxWritableLayer))

	d, err := driver.New(driver.Config{
		DriverName:            o.driverName,
		NodeID:                o.nodeID,
		KubeletDir:            o.kubeletDir,
		StateDir:              o.stateDir,
		HostDirs:              hostDirs,
		DatadogSockets:        o.datadogSockets,
		Mounter:               mounter.New(),
		Libraries:             libraries,
		PublishDownloadBudget: o.publishDownloadBudget,
		WritableLayers:        writable,
		DefaultWritableLimit:  o.defaultWritableLayer,
		MaxWritableLimit:      o.maxWritableLayer,
		KeepWritableLayers:    o.keepWritableLayers,
		KeptLayerGrace:        o.keptLayerGrace,
		MaxKeptWritableBytes:  o.maxKeptWritable,
		Logger:                log,
		Metrics:               driver.NewMetrics(ctrlmetrics.Registry),
	})
	if err != nil {
		return err
	}
	log.Info("starting", "version", version.Version, "driver", o.driverName, "node", o.nodeID, "endpoint", o.endpoint,
		"kubeletDir", o.kubeletDir, "stateDir", o.stateDir, "hostdirs", hostDirs.Names(), "libraryCache", cache.Dir(), "prefetch", o.cache.Prefetch)
	for _, e := range o.hostDirs {
		log.Info("hostdir entry", "entry", e.Name, "readOnly", e.ReadOnly, "allowed", e.Tenancy().Describe())
		if e.NamespaceSelector != "" {
			log.Info("hostdir entry has a namespace selector: the webhook evaluates it at admission, this plugin enforces the namespace names and service accounts only", "entry", e.Name)
		}
	}
	for typ, entry := range o.datadogSockets {
		if _, err := hostDirs.Lookup(entry); err != nil {
			log.Warn("a Datadog socket type maps to an undeclared hostdir entry; its volumes will be refused", "type", typ, "entry", entry)
		}
	}

	csiSocket, err := grpcserver.SocketPath(o.endpoint)
	if err != nil {
		return err
	}
	lis, err := grpcserver.ListenUnix(csiSocket)
	if err != nil {
		return fmt.Errorf("CSI endpoint: %w", err)
	}
	csiServer := driver.NewGRPCServer(d, log)
	serveErr := make(chan error, 3)
	go func() { serveErr <- csiServer.Serve(lis) }()

	var httpServers []*http.Server
	if o.healthAddr != "" {
		h, err := newHealthServer(o.healthAddr, csiSocket, d)
		if err != nil {
			return err
		}
		httpServers = append(httpServers, h)
	}
	if o.metricsAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(ctrlmetrics.Registry, promhttp.HandlerOpts{}))
		httpServers = append(httpServers, &http.Server{Addr: o.metricsAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second})
	}
	for _, s := range httpServers {
		l, err := net.Listen("tcp", s.Addr)
		if err != nil {
			return err
		}
		go func() {
			if err := s.Serve(l); !errors.Is(err, http.ErrServerClosed) {
				serveErr <- err
			}
		}()
	}

	// Serve Probe (not ready) while reconciling, and only register with kubelet once ready.
	// The check of each record's target against the mount table goes on in the background
	// (driver.Start); d.Close stops and waits for it.
	if err := d.Start(ctx); err != nil {
		return fmt.Errorf("startup reconcile: %w", err)
	}

	// Garbage-collect the library cache once now (what a crash or a reboot left behind) and
	// then periodically. The driver's view of what is in use (records, publishes in flight,
	// the mount table) guards every removal.
	go collectGarbage(ctx, log, cache, d, o.gcInterval)

	var regServer *grpc.Server
	if o.kubeletRegistration {
		regSocket := registration.SocketPath(o.kubeletDir, o.driverName)
		regLis, err := grpcserver.ListenUnix(regSocket)
		if err != nil {
			return fmt.Errorf("kubelet registration socket: %w", err)
		}
		regServer = registration.NewGRPCServer(registration.New(o.driverName, csiSocket, log))
		go func() { serveErr <- regServer.Serve(regLis) }()
		log.Info("serving kubelet plugin registration", "socket", regSocket)
	}

	select {
	case <-ctx.Done():
		log.Info("signal received: draining in-flight calls", "timeout", o.drainTimeout)
	case err := <-serveErr:
		log.Error("a server stopped", "error", err)
	}
	if regServer != nil {
		// Unregister first: kubelet stops sending new volumes here.
		regServer.Stop()
	}
	grpcserver.Shutdown(csiServer, o.drainTimeout)
	if err := d.Close(); err != nil {
		log.Warn("closing the state journal", "error", err)
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, s := range httpServers {
		s.Shutdown(shutdownCtx)
	}
	log.Info("stopped")
	return nil
}

// newHealthServer serves /healthz, which calls Probe over the CSI socket exactly as kubelet's
// livenessprobe sidecar would (so a wedged gRPC server fails it), and /readyz, which is ready
// once the startup reconcile has completed.
func newHealthServer(addr, csiSocket string, d *driver.Driver) (*http.Server, error) {
	conn, err := grpc.NewClient("unix://"+csiSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	identity := csi.NewIdentityClient(conn)
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		defer cancel()
		if _, err := identity.Probe(ctx, &csi.ProbeRequest{}); err != nil {
			http.Error(w, "CSI Probe failed: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if !d.Ready() {
			http.Error(w, "reconciling state with the mount table", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}, nil
}

// collectGarbage runs the library cache's GC at start and every interval until ctx ends.
func collectGarbage(ctx context.Context, log *slog.Logger, cache *librarycache.Cache, d *driver.Driver, interval time.Duration) {
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		if err := cache.GC(ctx, d.LibrariesInUse); err != nil && ctx.Err() == nil {
			log.Warn("library cache garbage collection failed; nothing was removed, retrying later", "error", err, "retryIn", interval)
		}
		// Kept writable layers (--keep-writable-layers) whose pod is gone.
		if _, err := d.CollectKeptLayers(ctx); err != nil && ctx.Err() == nil {
			log.Warn("removing kept writable layers of gone pods failed; retrying later", "error", err, "retryIn", interval)
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}
