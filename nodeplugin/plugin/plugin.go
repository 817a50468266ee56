// Package plugin runs the apm-csi node plugin: it builds the library cache and the CSI driver
// from parsed options, serves the CSI socket, registers with kubelet once the start-up
// reconcile is done, serves metrics and health checks, and on shutdown unregisters before it
// drains in-flight calls.
package plugin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/apm-csi/apm-csi/nodeplugin/grpcserver"
	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/nodeplugin/registration"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/version"
)

// Options is what the node plugin runs with: the parsed flags and configuration file.
type Options struct {
	// Endpoint is the CSI socket, unix:///path.sock.
	Endpoint   string
	NodeID     string
	DriverName string
	StateDir   string
	KubeletDir string
	// HostDirs is the host directory allowlist (--hostdir and the config file).
	HostDirs []hostdir.Entry
	// DatadogSockets maps a Datadog socket volume type to a HostDirs entry.
	DatadogSockets map[string]string
	// MetricsAddr and HealthAddr are TCP addresses; empty disables the server.
	MetricsAddr           string
	HealthAddr            string
	PublishDownloadBudget time.Duration
	// KubeletRegistration serves kubelet's plugin registration socket.
	KubeletRegistration bool
	// DrainTimeout bounds how long in-flight CSI calls may run on shutdown.
	DrainTimeout time.Duration
	// Cache configures the library cache; Logger and Registerer are filled by Run.
	Cache librarycache.Config
	// GCInterval is how often the library cache is garbage-collected; zero is one minute.
	GCInterval time.Duration
	// Writable layers of library volumes.
	WritableLayer        writablelayer.Mechanism
	DefaultWritableLayer int64
	MaxWritableLayer     int64
	// KeepWritableLayers keeps writable layers across node reboots (driver.Config).
	KeepWritableLayers bool
	KeptLayerGrace     time.Duration
	MaxKeptWritable    int64

	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Metrics receives the driver's and the cache's metrics and is served on MetricsAddr.
	// Default: controller-runtime's registry.
	Metrics ctrlmetrics.RegistererGatherer

	// Seams for the lifecycle tests; nil means the real parts.
	newNode func(ctx context.Context, o Options, hostDirs *hostdir.Set) (node, error)
	listen  func(network, address string) (net.Listener, error)
}

// node is the CSI driver together with what shares its lifetime: the library cache and its
// garbage collection.
type node interface {
	// NewGRPCServer returns the server of the CSI Identity and Node services.
	NewGRPCServer() *grpc.Server
	// Start runs the start-up reconcile and starts the background work.
	Start(ctx context.Context) error
	// Ready reports whether the start-up reconcile has completed.
	Ready() bool
	// Close stops the background work and closes the state journal and the cache.
	Close() error
}

// Run runs the node plugin until ctx is cancelled or a server fails, and returns that
// server's error. The order is what kubelet relies on:
//
//   - start: the state journal, library cache and driver are opened, the CSI socket serves
//     (Probe answers not ready), the start-up reconcile runs, and only then is the kubelet
//     registration socket served, with metrics and health alongside;
//   - stop: the registration socket goes first (kubelet sends no new volumes), then in-flight
//     CSI calls drain (up to DrainTimeout), then the servers stop and the driver is closed.
//
// A failing start-up step stops what was started and leaves no socket behind.
func Run(ctx context.Context, o Options) error {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Metrics == nil {
		o.Metrics = ctrlmetrics.Registry
	}
	if o.newNode == nil {
		o.newNode = newDriverNode
	}
	if o.listen == nil {
		o.listen = listen
	}
	if o.GCInterval <= 0 {
		o.GCInterval = time.Minute
	}
	log := o.Logger
	hostDirs, err := hostdir.NewSet(o.HostDirs)
	if err != nil {
		return err
	}
	csiSocket, err := grpcserver.SocketPath(o.Endpoint)
	if err != nil {
		return err
	}
	n, err := o.newNode(ctx, o, hostDirs)
	if err != nil {
		return err
	}
	log.Info("starting", "version", version.Version, "driver", o.DriverName, "node", o.NodeID, "endpoint", o.Endpoint,
		"kubeletDir", o.KubeletDir, "stateDir", o.StateDir, "hostdirs", hostDirs.Names(), "libraryCache", o.Cache.StoreDir, "prefetch", o.Cache.Prefetch)
	for _, e := range o.HostDirs {
		log.Info("hostdir entry", "entry", e.Name, "readOnly", e.ReadOnly, "allowed", e.Tenancy().Describe())
		if e.NamespaceSelector != "" {
			log.Info("hostdir entry has a namespace selector: the webhook evaluates it at admission, this plugin enforces the namespace names and service accounts only", "entry", e.Name)
		}
	}
	for typ, entry := range o.DatadogSockets {
		if _, err := hostDirs.Lookup(entry); err != nil {
			log.Warn("a Datadog socket type maps to an undeclared hostdir entry; its volumes will be refused", "type", typ, "entry", entry)
		}
	}

	s := &servers{o: &o, log: log, errs: make(chan error, 4)}
	err = s.serve(ctx, n, csiSocket)
	s.stop()
	if cerr := n.Close(); cerr != nil {
		log.Warn("closing the state journal", "err", cerr)
	}
	log.Info("stopped")
	return err
}

// servers are the node plugin's servers; stop stops those that were started.
type servers struct {
	o    *Options
	log  *slog.Logger
	errs chan error
	wg   sync.WaitGroup

	csi          *grpc.Server
	registration *grpc.Server
	http         []*http.Server
	healthConn   *grpc.ClientConn
}

// serve starts the servers in order and waits for ctx or a server error.
func (s *servers) serve(ctx context.Context, n node, csiSocket string) error {
	lis, err := s.o.listen("unix", csiSocket)
	if err != nil {
		return fmt.Errorf("CSI endpoint: %w", err)
	}
	s.csi = n.NewGRPCServer()
	s.goServe("CSI server", func() error { return s.csi.Serve(lis) })

	if s.o.HealthAddr != "" {
		h, err := s.newHealthServer(csiSocket, n)
		if err != nil {
			return err
		}
		if err := s.serveHTTP("health server", h); err != nil {
			return err
		}
	}
	if s.o.MetricsAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(s.o.Metrics, promhttp.HandlerOpts{}))
		if err := s.serveHTTP("metrics server", &http.Server{Addr: s.o.MetricsAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}); err != nil {
			return err
		}
	}

	// Serve Probe (not ready) while reconciling, and only register with kubelet once ready.
	if err := n.Start(ctx); err != nil {
		return fmt.Errorf("startup reconcile: %w", err)
	}
	if ctx.Err() != nil {
		return nil
	}

	if s.o.KubeletRegistration {
		regSocket := registration.SocketPath(s.o.KubeletDir, s.o.DriverName)
		regLis, err := s.o.listen("unix", regSocket)
		if err != nil {
			return fmt.Errorf("kubelet registration socket: %w", err)
		}
		s.registration = registration.NewGRPCServer(registration.New(s.o.DriverName, csiSocket, s.log))
		s.goServe("kubelet registration server", func() error { return s.registration.Serve(regLis) })
		s.log.Info("serving kubelet plugin registration", "socket", regSocket)
	}

	select {
	case <-ctx.Done():
		s.log.Info("signal received: draining in-flight calls", "timeout", s.o.DrainTimeout)
		return nil
	case err := <-s.errs:
		s.log.Error("a server stopped", "err", err)
		return err
	}
}

// goServe runs serve until it returns; an error other than a stop is reported on s.errs.
func (s *servers) goServe(name string, serve func() error) {
	s.wg.Go(func() {
		err := serve()
		if err != nil && !errors.Is(err, grpc.ErrServerStopped) && !errors.Is(err, http.ErrServerClosed) {
			s.errs <- fmt.Errorf("%s: %w", name, err)
		}
	})
}

func (s *servers) serveHTTP(name string, h *http.Server) error {
	l, err := s.o.listen("tcp", h.Addr)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	s.http = append(s.http, h)
	s.goServe(name, func() error { return h.Serve(l) })
	return nil
}

// stop unregisters from kubelet, then drains in-flight CSI calls, then stops the HTTP
// servers, and waits until every server has returned (so its socket is gone).
func (s *servers) stop() {
	if s.registration != nil {
		// Unregister first: kubelet stops sending new volumes here.
		s.registration.Stop()
	}
	if s.csi != nil {
		grpcserver.Shutdown(s.csi, s.o.DrainTimeout)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, h := range s.http {
		if err := h.Shutdown(ctx); err != nil {
			s.log.Warn("stopping an HTTP server", "addr", h.Addr, "err", err)
		}
	}
	if s.healthConn != nil {
		s.healthConn.Close()
	}
	s.wg.Wait()
}

// newHealthServer serves /healthz, which calls Probe over the CSI socket exactly as kubelet's
// livenessprobe sidecar would (so a wedged gRPC server fails it), and /readyz, which is ready
// once the startup reconcile has completed.
func (s *servers) newHealthServer(csiSocket string, n node) (*http.Server, error) {
	conn, err := grpc.NewClient("unix://"+csiSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	s.healthConn = conn
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
		if !n.Ready() {
			http.Error(w, "reconciling state with the mount table", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return &http.Server{Addr: s.o.HealthAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}, nil
}

// listen listens on a unix socket (removing a stale one, grpcserver.ListenUnix) or a TCP address.
func listen(network, address string) (net.Listener, error) {
	if network == "unix" {
		return grpcserver.ListenUnix(address)
	}
	return net.Listen(network, address)
}
