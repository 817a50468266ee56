package plugin

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/registration"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// events is the ordered list of what happened in a run: sockets listening and closing,
// reconcile steps, CSI calls, the node closing.
type events struct {
	mu      sync.Mutex
	list    []string
	changed chan struct{}
}

func newEvents() *events { return &events{changed: make(chan struct{})} }

func (e *events) add(ev string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.list = append(e.list, ev)
	close(e.changed)
	e.changed = make(chan struct{})
}

func (e *events) snapshot() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.list)
}

// waitFor waits until ev happened; it fails the test if Run returns first.
func (e *events) waitFor(t *testing.T, r *running, ev string) {
	t.Helper()
	for {
		e.mu.Lock()
		found, ch := slices.Contains(e.list, ev), e.changed
		e.mu.Unlock()
		if found {
			return
		}
		select {
		case <-ch:
		case <-r.done:
			t.Fatalf("Run returned %v before %q; events: %q", r.err, ev, e.snapshot())
		}
	}
}

// inOrder fails unless every one of want happened, in this order.
func (e *events) inOrder(t *testing.T, want ...string) {
	t.Helper()
	got := e.snapshot()
	last := -1
	for _, w := range want {
		i := slices.Index(got, w)
		if i < 0 || i < last {
			t.Fatalf("want %q in this order; events: %q", want, got)
		}
		last = i
	}
}

// fakeNode stands for the CSI driver: its reconcile and NodePublishVolume run what the test
// says and record what happened.
type fakeNode struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer
	ev *events
	// reconcile runs during Start.
	reconcile func(ctx context.Context) error
	// publish runs during NodePublishVolume.
	publish func()
	mu      sync.Mutex
	ready   bool
}

func (f *fakeNode) NewGRPCServer() *grpc.Server {
	s := grpc.NewServer()
	csi.RegisterIdentityServer(s, f)
	csi.RegisterNodeServer(s, f)
	return s
}

func (f *fakeNode) Start(ctx context.Context) error {
	f.ev.add("reconcile started")
	if f.reconcile != nil {
		if err := f.reconcile(ctx); err != nil {
			return err
		}
	}
	f.mu.Lock()
	f.ready = true
	f.mu.Unlock()
	f.ev.add("reconcile done")
	return nil
}

func (f *fakeNode) Ready() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ready
}

func (f *fakeNode) Close() error {
	f.ev.add("node closed")
	return nil
}

func (f *fakeNode) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(f.Ready())}, nil
}

func (f *fakeNode) NodePublishVolume(context.Context, *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	f.ev.add("publish started")
	if f.publish != nil {
		f.publish()
	}
	f.ev.add("publish done")
	return &csi.NodePublishVolumeResponse{}, nil
}

// recordingListener records when its server closes it.
type recordingListener struct {
	net.Listener
	name string
	ev   *events
	// acceptErr, if set, is what Accept returns: a server whose listener broke.
	acceptErr error
}

func (l *recordingListener) Accept() (net.Conn, error) {
	if l.acceptErr != nil {
		return nil, l.acceptErr
	}
	return l.Listener.Accept()
}

func (l *recordingListener) Close() error {
	l.ev.add("closed " + l.name)
	return l.Listener.Close()
}

// harness runs Run with a fake node and real servers on a temporary kubelet dir.
type harness struct {
	opts      Options
	ev        *events
	node      *fakeNode
	csiSocket string
	regSocket string
	mu        sync.Mutex
	addrs     map[string]string // server name -> address it listens on
	// broken names the server whose listener fails at Accept; failListen the one that
	// cannot listen.
	broken, failListen string
}

var errBroken = errors.New("listener broke")

func newHarness(t *testing.T) *harness {
	// A short directory: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "plugin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	h := &harness{ev: newEvents(), addrs: map[string]string{}}
	h.node = &fakeNode{ev: h.ev}
	h.csiSocket = filepath.Join(dir, "plugins", "t.io", "csi.sock")
	h.regSocket = registration.SocketPath(dir, "t.io")
	h.opts = Options{
		Endpoint:            "unix://" + h.csiSocket,
		NodeID:              "n1",
		DriverName:          "t.io",
		KubeletDir:          dir,
		StateDir:            filepath.Join(dir, "state"),
		KubeletRegistration: true,
		HealthAddr:          "127.0.0.1:0",
		MetricsAddr:         "127.0.0.2:0",
		DrainTimeout:        time.Minute,
		GCInterval:          time.Minute,
		Logger:              slog.New(slog.NewTextHandler(io.Discard, nil)),
		Metrics:             prometheus.NewRegistry(),
		newNode: func(context.Context, Options, *hostdir.Set) (node, error) {
			return h.node, nil
		},
	}
	names := map[string]string{h.csiSocket: "csi", h.regSocket: "registration", h.opts.HealthAddr: "health", h.opts.MetricsAddr: "metrics"}
	h.opts.listen = func(network, address string) (net.Listener, error) {
		name := names[address]
		if name == h.failListen {
			return nil, errors.New("address in use")
		}
		l, err := listen(network, address)
		if err != nil {
			return nil, err
		}
		h.mu.Lock()
		h.addrs[name] = l.Addr().String()
		h.mu.Unlock()
		h.ev.add("listening " + name)
		rl := &recordingListener{Listener: l, name: name, ev: h.ev}
		if name == h.broken {
			rl.acceptErr = errBroken
		}
		return rl, nil
	}
	return h
}

func (h *harness) addr(name string) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.addrs[name]
}

type running struct {
	cancel context.CancelFunc
	done   chan struct{}
	err    error
}

func (h *harness) start(t *testing.T) *running {
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		r.err = Run(ctx, h.opts)
	}()
	t.Cleanup(func() { cancel(); <-r.done })
	return r
}

// wait returns Run's error.
func (r *running) wait() error {
	<-r.done
	return r.err
}

func dial(t *testing.T, socket string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// httpStatus is the status of GET url, or 0 if there was no answer.
func httpStatus(url string) int {
	resp, err := http.Get(url)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// noSocket fails if a socket is at path.
func noSocket(t *testing.T, path string) {
	t.Helper()
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&fs.ModeSocket != 0 {
		t.Errorf("socket %s left behind", path)
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Error(err)
	}
}

func TestRegistersWithKubeletOnlyAfterReconcile(t *testing.T) {
	h := newHarness(t)
	// While reconciling, the CSI socket answers Probe, /healthz is healthy, /readyz is not
	// ready and kubelet's registration socket does not exist.
	var during struct {
		probe          error
		healthz, ready int
		regErr         error
	}
	conn := dial(t, h.csiSocket)
	h.node.reconcile = func(ctx context.Context) error {
		_, during.probe = csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{})
		during.healthz = httpStatus("http://" + h.addr("health") + "/healthz")
		during.ready = httpStatus("http://" + h.addr("health") + "/readyz")
		_, during.regErr = os.Lstat(h.regSocket)
		return nil
	}
	r := h.start(t)
	h.ev.waitFor(t, r, "listening registration")

	if during.probe != nil || during.healthz != http.StatusOK || during.ready != http.StatusServiceUnavailable || !errors.Is(during.regErr, fs.ErrNotExist) {
		t.Fatalf("during the reconcile: Probe %v, /healthz %d, /readyz %d, registration socket %v; want nil, 200, 503, not there",
			during.probe, during.healthz, during.ready, during.regErr)
	}
	h.ev.inOrder(t, "listening csi", "reconcile started", "reconcile done", "listening registration")
	info, err := registerapi.NewRegistrationClient(dial(t, h.regSocket)).GetInfo(context.Background(), &registerapi.InfoRequest{})
	if err != nil || info.Name != "t.io" || info.Endpoint != h.csiSocket {
		t.Fatalf("registration GetInfo = %+v, %v; want t.io at %s", info, err, h.csiSocket)
	}
	if got := httpStatus("http://" + h.addr("health") + "/readyz"); got != http.StatusOK {
		t.Fatalf("/readyz after the reconcile = %d, want 200", got)
	}
	if got := httpStatus("http://" + h.addr("metrics") + "/metrics"); got != http.StatusOK {
		t.Fatalf("/metrics = %d, want 200", got)
	}

	r.cancel()
	if err := r.wait(); err != nil {
		t.Fatalf("Run after cancel = %v, want nil", err)
	}
	noSocket(t, h.csiSocket)
	noSocket(t, h.regSocket)
	h.ev.inOrder(t, "closed registration", "closed csi", "node closed")
}

func TestShutdownUnregistersThenDrainsInFlightCall(t *testing.T) {
	h := newHarness(t)
	entered, release := make(chan struct{}), make(chan struct{})
	h.node.publish = func() {
		close(entered)
		<-release
	}
	r := h.start(t)
	var once sync.Once
	releaseCall := func() { once.Do(func() { close(release) }) }
	defer releaseCall() // also when the test fails early, so that Run can return
	h.ev.waitFor(t, r, "listening registration")

	called := make(chan error, 1)
	conn := dial(t, h.csiSocket)
	go func() {
		_, err := csi.NewNodeClient(conn).NodePublishVolume(context.Background(), &csi.NodePublishVolumeRequest{VolumeId: "v"})
		called <- err
	}()
	<-entered
	r.cancel()
	// The CSI socket stops taking new calls only once kubelet can no longer reach the
	// registration socket; the call in flight goes on.
	h.ev.waitFor(t, r, "closed csi")
	noSocket(t, h.regSocket)
	h.ev.inOrder(t, "closed registration", "closed csi")
	select {
	case <-r.done:
		t.Fatalf("Run returned (%v) while a CSI call was in flight", r.err)
	default:
	}

	releaseCall()
	if err := <-called; err != nil {
		t.Fatalf("the in-flight NodePublishVolume failed at shutdown: %v", err)
	}
	if err := r.wait(); err != nil {
		t.Fatalf("Run after cancel = %v, want nil", err)
	}
	// The driver (its state journal) closes after the call finished.
	h.ev.inOrder(t, "publish started", "closed registration", "closed csi", "publish done", "node closed")
	noSocket(t, h.csiSocket)
}

func TestRunReturnsTheErrorOfAnyServer(t *testing.T) {
	for _, server := range []struct{ listener, name string }{
		{"csi", "CSI server"},
		{"registration", "kubelet registration server"},
		{"health", "health server"},
		{"metrics", "metrics server"},
	} {
		t.Run(server.listener, func(t *testing.T) {
			h := newHarness(t)
			h.broken = server.listener
			err := h.start(t).wait()
			if !errors.Is(err, errBroken) || !strings.HasPrefix(err.Error(), server.name+": ") {
				t.Fatalf("Run = %v, want the %s's error", err, server.name)
			}
			noSocket(t, h.csiSocket)
			noSocket(t, h.regSocket)
			h.ev.inOrder(t, "reconcile done", "node closed")
		})
	}
}

func TestFailedStartLeavesNoSocket(t *testing.T) {
	for _, tc := range []struct {
		name    string
		setup   func(t *testing.T, h *harness)
		wantErr string
	}{
		{
			name: "the driver cannot be built",
			setup: func(_ *testing.T, h *harness) {
				h.opts.newNode = func(context.Context, Options, *hostdir.Set) (node, error) {
					return nil, errors.New("state dir unreadable")
				}
			},
			wantErr: "state dir unreadable",
		},
		{
			name: "the reconcile fails",
			setup: func(_ *testing.T, h *harness) {
				h.node.reconcile = func(context.Context) error { return errors.New("journal corrupt") }
			},
			wantErr: "startup reconcile: journal corrupt",
		},
		{
			name:    "the health address is taken",
			setup:   func(_ *testing.T, h *harness) { h.failListen = "health" },
			wantErr: "health server: address in use",
		},
		{
			name:    "the metrics address is taken",
			setup:   func(_ *testing.T, h *harness) { h.failListen = "metrics" },
			wantErr: "metrics server: address in use",
		},
		{
			name: "a file is where the registration socket goes",
			setup: func(t *testing.T, h *harness) {
				if err := os.MkdirAll(filepath.Dir(h.regSocket), 0o750); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(h.regSocket, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: "kubelet registration socket: ",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			tc.setup(t, h)
			err := h.start(t).wait()
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Run = %v, want an error containing %q", err, tc.wantErr)
			}
			noSocket(t, h.csiSocket)
			noSocket(t, h.regSocket)
			if slices.Contains(h.ev.snapshot(), "reconcile started") {
				h.ev.inOrder(t, "reconcile started", "node closed")
			}
		})
	}
}

func TestInvalidOptionsAreRefusedBeforeAnySocket(t *testing.T) {
	for _, tc := range []struct {
		name    string
		setup   func(o *Options)
		wantErr string
	}{
		{"relative endpoint", func(o *Options) { o.Endpoint = "csi.sock" }, "want unix:///absolute/path.sock"},
		{"hostdir entry declared twice", func(o *Options) {
			o.HostDirs = []hostdir.Entry{{Name: "a", Path: "/srv/a", Namespaces: []string{"*"}}, {Name: "a", Path: "/srv/b", Namespaces: []string{"*"}}}
		}, `hostdir "a" is declared twice`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			tc.setup(&h.opts)
			err := h.start(t).wait()
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Run = %v, want an error containing %q", err, tc.wantErr)
			}
			if got := h.ev.snapshot(); len(got) != 0 {
				t.Fatalf("Run started %q before refusing its options", got)
			}
		})
	}
}

// TestRunServesTheDriver runs the real driver and library cache (the store's own mount needs
// root): the node id is served, the store is a mount while the plugin runs and is released
// after it stops.
func TestRunServesTheDriver(t *testing.T) {
	testenv.RequireRoot(t)
	h := newHarness(t)
	h.opts.newNode = nil
	h.opts.Cache.StoreDir = filepath.Join(h.opts.StateDir, "store")
	r := h.start(t)
	h.ev.waitFor(t, r, "listening registration")

	if !isMountPoint(t, h.opts.Cache.StoreDir) {
		t.Fatalf("the library store %s is not a mount of its own while the plugin runs", h.opts.Cache.StoreDir)
	}
	info, err := csi.NewNodeClient(dial(t, h.csiSocket)).NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	if err != nil || info.NodeId != "n1" {
		t.Fatalf("NodeGetInfo = %v, %v; want node n1", info, err)
	}
	if got := httpStatus("http://" + h.addr("health") + "/readyz"); got != http.StatusOK {
		t.Fatalf("/readyz = %d, want 200", got)
	}
	r.cancel()
	if err := r.wait(); err != nil {
		t.Fatalf("Run after cancel = %v, want nil", err)
	}
	noSocket(t, h.csiSocket)
	noSocket(t, h.regSocket)
	if isMountPoint(t, h.opts.Cache.StoreDir) {
		t.Fatalf("the library store's own mount is left after the plugin stopped")
	}
}

// isMountPoint reports whether dir is a mount point in this mount namespace.
func isMountPoint(t *testing.T, dir string) bool {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}
