// Package localcluster runs a real single-node Kubernetes cluster on this machine for the
// end-to-end tests and `make demo`: etcd, containerd and runc from Debian; kube-apiserver,
// kube-controller-manager, kube-scheduler, kube-proxy and kubelet built through the Go
// module proxy; CNI bridge networking on a private range; a loopback OCI registry; the
// project's images imported into containerd. Everything it writes lives under one root
// directory (Options.Root), everything listens on loopback or on the pod bridge it creates,
// and Down stops, unmounts and deletes all of it, restoring the host settings it changed.
//
// See docs/local-cluster.md for the layout, the networking decisions and the CLI.
package localcluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/apm-csi/apm-csi/test/images"
)

// ErrRunning is returned by Up when a healthy cluster already runs under the same root.
var ErrRunning = errors.New("a local cluster is already running under this root")

// Cluster is a running local cluster.
type Cluster struct {
	opts Options
}

// inProcessRegistry is a registry served by this process (Options.RegistryExecutable empty).
type inProcessRegistry struct {
	stop context.CancelFunc
	done chan struct{}
}

// inProcessRegistries are keyed by cluster root, so that any teardown of that root in this
// process (Down of any Cluster value, or Up cleaning a crashed run) stops the registry.
var (
	inProcessRegistriesMu sync.Mutex
	inProcessRegistries   = map[string]inProcessRegistry{}
)

func stopInProcessRegistry(root string) {
	inProcessRegistriesMu.Lock()
	r, ok := inProcessRegistries[root]
	delete(inProcessRegistries, root)
	inProcessRegistriesMu.Unlock()
	if ok {
		r.stop()
		<-r.done
	}
}

// clusterState is run/cluster.json: what Attach and Down need to find a cluster again.
type clusterState struct {
	Options   Options   `json:"options"`
	StartedAt time.Time `json:"startedAt"`
}

// Up starts a cluster and returns once the API server is healthy, the node is Ready,
// kube-proxy has programmed the Service rules and the default ServiceAccount exists. A
// previous run under the same root that is not healthy (half started, crashed, never torn
// down) is cleaned up first; a healthy one makes Up fail with ErrRunning. If Up fails, it tears
// down what it started (unless Options.KeepOnFailure) and the error carries the tail of the
// log of the component that failed; logs stay in <root>/logs.
func Up(ctx context.Context, opts Options) (*Cluster, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("the local cluster needs root (mounts, bridge, iptables)")
	}
	o, err := opts.complete()
	if err != nil {
		return nil, err
	}
	for _, dir := range []string{o.KubeletDir, o.containerdRoot()} {
		if err := checkDiskHeadroom(dir, headroomPercent); err != nil {
			return nil, err
		}
	}
	if prev, err := Attach(o.Root); err == nil {
		prev.opts.Logf = o.Logf
		if prev.Healthy(ctx) {
			return nil, fmt.Errorf("%w (%s); run `localcluster down` first", ErrRunning, o.Root)
		}
		o.logf("up: cleaning up an earlier run that did not finish or was not torn down")
		if err := prev.opts.teardown(ctx, false); err != nil {
			return nil, fmt.Errorf("cleaning up the earlier run under %s: %w", o.Root, err)
		}
	} else if err := o.teardown(ctx, false); err != nil {
		return nil, fmt.Errorf("cleaning up leftovers under %s: %w", o.Root, err)
	}
	if err := o.resolveBinaries(ctx); err != nil {
		return nil, err
	}
	c := &Cluster{opts: o}
	start := time.Now()
	if err := c.start(ctx); err != nil {
		if !o.KeepOnFailure {
			cleanupCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
			defer cancel()
			if derr := c.down(cleanupCtx, false); derr != nil {
				err = errors.Join(err, fmt.Errorf("tearing down after the failure: %w", derr))
			}
		}
		return nil, err
	}
	o.logf("up: cluster ready in %s (kubeconfig %s)", time.Since(start).Round(100*time.Millisecond), o.adminKubeconfig())
	return c, nil
}

// Attach returns the cluster recorded under root by an earlier Up (of this or another
// process, e.g. the CLI), without checking that it runs.
func Attach(root string) (*Cluster, error) {
	o, err := Options{Root: root}.complete()
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(o.stateFile())
	if err != nil {
		return nil, err
	}
	var st clusterState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", o.stateFile(), err)
	}
	return &Cluster{opts: st.Options}, nil
}

func (c *Cluster) start(ctx context.Context) error {
	o := c.opts
	for _, d := range []string{o.Root, o.runDir(), o.logDir(), o.configDir(), o.imagesDir(), o.containerdRoot()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	// Run-scoped state starts empty: teardown removed it, this also covers a first run over
	// a directory someone filled by hand.
	for _, d := range o.runScopedDirs() {
		if err := os.RemoveAll(d); err != nil {
			return err
		}
	}
	if err := o.checkRanges(ctx); err != nil {
		return err
	}
	if err := o.recordHostState(ctx); err != nil {
		return err
	}
	if err := c.saveState(); err != nil {
		return err
	}
	step := newStepTimer(o)
	if err := o.setUpNetwork(ctx); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	if busy := o.loopbackPortsInUse(); len(busy) > 0 {
		return fmt.Errorf("ports already in use: %s (another cluster, envtest or registry?)", strings.Join(busy, ", "))
	}
	if err := o.writePKI(); err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	if err := o.writeCNIConfig(); err != nil {
		return err
	}
	if err := o.writeRegistryHosts(); err != nil {
		return err
	}
	containerdConfig, err := o.writeContainerdConfig()
	if err != nil {
		return err
	}
	kubeletConfig, err := o.writeKubeletConfig()
	if err != nil {
		return err
	}
	if err := makeSharedMount(o.KubeletDir); err != nil {
		return err
	}
	// The hostPath root too: the apm-csi chart mounts its hostdir entries (created below it by
	// the tests) into the node plugin with HostToContainer propagation, which containerd
	// refuses for a path on a private mount, as the VM's root filesystem is. Real nodes
	// (systemd) share "/". Teardown unmounts it with everything else under the root.
	if err := os.MkdirAll(o.hostPathRoot(), 0o755); err != nil {
		return err
	}
	if err := makeSharedMount(o.hostPathRoot()); err != nil {
		return err
	}
	for _, d := range []string{o.etcdDir(), o.containerdState(), o.podLogsDir(), o.cniIPAMDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	step.done("host prepared (bridge, certificates, configs, shared kubelet and hostPath dirs)")

	if _, err := o.startProcess(compEtcd, o.program("etcd"), o.etcdArgs()...); err != nil {
		return err
	}
	// containerd's directory first on its PATH: it finds the shim there (the CRI runtime also
	// names it by path), whatever other containerd the host has installed.
	containerdEnv := append(os.Environ(), "PATH="+o.BinDir+":"+os.Getenv("PATH"))
	if _, err := o.startProcessEnv(compContainerd, o.program("containerd"), containerdEnv, o.containerdArgs(containerdConfig)...); err != nil {
		return err
	}
	if err := c.startRegistry(ctx); err != nil {
		return err
	}

	// Build the images while etcd and containerd start.
	imagesBuilt := make(chan error, 1)
	var tarballs []images.Tarball
	go func() {
		var err error
		tarballs, err = c.buildBaseImages(ctx)
		imagesBuilt <- err
	}()

	if err := o.waitComponent(ctx, compContainerd, func(ctx context.Context) (bool, error) {
		_, err := o.ctr(ctx, "version")
		return err == nil, nil
	}); err != nil {
		return err
	}
	if err := <-imagesBuilt; err != nil {
		return fmt.Errorf("building base images: %w", err)
	}
	for _, tb := range tarballs {
		if err := c.ImportImage(ctx, tb.Path); err != nil {
			return err
		}
	}
	step.done("containerd ready, pause and busybox imported")

	etcdHealth := &http.Client{Timeout: 2 * time.Second}
	if err := o.waitComponent(ctx, compEtcd, func(ctx context.Context) (bool, error) {
		resp, err := etcdHealth.Get(o.etcdURL() + "/health")
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	}); err != nil {
		return err
	}
	// busybox's wget, the in-pod HTTPS client of the tests and the demo, offers only SHA-1
	// ECDSA signatures in TLS 1.2, which Go 1.25+ refuses by default (kube-apiserver 1.37 is
	// built with Go 1.26 defaults); a test cluster accepts them.
	apiServerEnv := append(os.Environ(), "GODEBUG=tlssha1=1")
	if _, err := o.startProcessEnv(compAPIServer, filepath.Join(o.BinDir, "kube-apiserver"), apiServerEnv, o.apiServerArgs()...); err != nil {
		return err
	}
	// The kubelet and kube-proxy retry until the API server answers: start them now.
	if _, err := o.startProcess(compKubelet, filepath.Join(o.BinDir, "kubelet"), o.kubeletArgs(kubeletConfig)...); err != nil {
		return err
	}
	if _, err := o.startProcess(compKubeProxy, o.KubeProxy, o.kubeProxyArgs()...); err != nil {
		return err
	}
	cs, err := c.Clientset()
	if err != nil {
		return err
	}
	if err := o.waitComponent(ctx, compAPIServer, func(ctx context.Context) (bool, error) {
		return apiReady(ctx, cs), nil
	}); err != nil {
		return err
	}
	step.done("etcd and kube-apiserver ready")
	if _, err := o.startProcess(compControllerManager, filepath.Join(o.BinDir, "kube-controller-manager"), o.controllerManagerArgs()...); err != nil {
		return err
	}
	if _, err := o.startProcess(compScheduler, filepath.Join(o.BinDir, "kube-scheduler"), o.schedulerArgs()...); err != nil {
		return err
	}

	if err := o.waitComponent(ctx, compKubelet, func(ctx context.Context) (bool, error) {
		node, err := cs.CoreV1().Nodes().Get(ctx, o.NodeName, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		return nodeReady(node), nil
	}); err != nil {
		return err
	}
	step.done("node Ready")
	proxyHealth := &http.Client{Timeout: 2 * time.Second}
	if err := o.waitComponent(ctx, compKubeProxy, func(ctx context.Context) (bool, error) {
		resp, err := proxyHealth.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", kubeProxyHealthzPort))
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	}); err != nil {
		return err
	}
	if err := moveGuardFirst(ctx); err != nil {
		return err
	}
	if err := o.waitComponent(ctx, compControllerManager, func(ctx context.Context) (bool, error) {
		_, err := cs.CoreV1().ServiceAccounts(metav1.NamespaceDefault).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	}); err != nil {
		return err
	}
	step.done("kube-proxy synced, default ServiceAccount present")
	return nil
}

// stepTimer logs how long each phase of Up took.
type stepTimer struct {
	o    Options
	last time.Time
}

func newStepTimer(o Options) *stepTimer { return &stepTimer{o: o, last: time.Now()} }

func (s *stepTimer) done(what string) {
	now := time.Now()
	s.o.logf("up: %s (%s)", what, now.Sub(s.last).Round(100*time.Millisecond))
	s.last = now
}

// waitComponent polls check until it succeeds, failing early if the component's process
// exits and with the tail of its log after ReadyTimeout.
func (o Options) waitComponent(ctx context.Context, component string, check func(context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, o.ReadyTimeout)
	defer cancel()
	err := poll(ctx, 200*time.Millisecond, func() (bool, error) {
		ok, err := check(ctx)
		if ok || err != nil {
			return ok, err
		}
		if rec, rerr := o.readProcessRecord(component); rerr == nil && !rec.alive() {
			return false, errors.New("process exited")
		}
		return false, nil
	})
	if errors.Is(err, context.DeadlineExceeded) {
		err = fmt.Errorf("not ready within %s", o.ReadyTimeout)
	}
	if err != nil {
		return o.componentError(component, err)
	}
	return nil
}

func apiReady(ctx context.Context, cs kubernetes.Interface) bool {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	return err == nil && strings.TrimSpace(string(body)) == "ok"
}

func nodeReady(node *corev1.Node) bool {
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func (c *Cluster) saveState() error {
	data, err := json.MarshalIndent(clusterState{Options: c.opts, StartedAt: time.Now()}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(c.opts.runDir(), 0o755); err != nil {
		return err
	}
	return os.WriteFile(c.opts.stateFile(), data, 0o644)
}

func (c *Cluster) buildBaseImages(ctx context.Context) ([]images.Tarball, error) {
	moduleDir := c.opts.RepoRoot
	if moduleDir == "" {
		wd, err := os.Getwd()
		if err != nil {
			return nil, err
		}
		if moduleDir, err = FindRepoRoot(wd); err != nil {
			return nil, err
		}
	}
	return images.BuildBase(ctx, moduleDir, c.opts.imagesDir())
}

// startRegistry serves the registry detached (RegistryExecutable) or in this process.
func (c *Cluster) startRegistry(ctx context.Context) error {
	o := c.opts
	if o.RegistryExecutable != "" {
		exe := filepath.Join(o.binDir(), "localcluster")
		if err := copyExecutable(o.RegistryExecutable, exe); err != nil {
			return err
		}
		if _, err := o.startProcess(compRegistry, exe, "serve-registry", "--addr", o.RegistryAddr, "--dir", o.registryDir()); err != nil {
			return err
		}
	} else {
		logFile, err := os.OpenFile(o.LogPath(compRegistry), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(o.registryDir(), 0o755); err != nil {
			logFile.Close()
			return err
		}
		regCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		done := make(chan struct{})
		errc := make(chan error, 1)
		go func() {
			defer close(done)
			defer logFile.Close()
			errc <- ServeRegistry(regCtx, o.RegistryAddr, o.registryDir(), log.New(logFile, "", log.LstdFlags))
		}()
		inProcessRegistriesMu.Lock()
		inProcessRegistries[o.Root] = inProcessRegistry{stop: cancel, done: done}
		inProcessRegistriesMu.Unlock()
		select {
		case err := <-errc:
			cancel()
			if err != nil {
				return fmt.Errorf("registry: %w", err)
			}
		case <-time.After(50 * time.Millisecond):
		}
	}
	waitCtx, cancel := context.WithTimeout(ctx, o.ReadyTimeout)
	defer cancel()
	if err := waitRegistry(waitCtx, o.RegistryAddr); err != nil {
		return o.componentError(compRegistry, err)
	}
	return nil
}

// Down stops the cluster and removes everything it created: it lets the kubelet delete the
// pods first (bounded by Options.DrainTimeout, so CSI volumes get unpublished), then stops
// every component (SIGTERM, then SIGKILL), kills leftover containers, unmounts everything under
// the root and the kubelet dir, deletes the bridge, its veths and the iptables rules, and
// restores the sysctls it changed. Container images stay in containerd's root for the next Up.
func (c *Cluster) Down(ctx context.Context) error { return c.down(ctx, true) }

func (c *Cluster) down(ctx context.Context, drain bool) error {
	start := time.Now()
	err := c.opts.teardown(ctx, drain)
	c.opts.logf("down: done in %s", time.Since(start).Round(100*time.Millisecond))
	return err
}

// Down tears down the cluster recorded under opts.Root (or the leftovers of one).
func Down(ctx context.Context, opts Options) error {
	if os.Geteuid() != 0 {
		return errors.New("tearing down the local cluster needs root")
	}
	o, err := opts.complete()
	if err != nil {
		return err
	}
	if c, err := Attach(o.Root); err == nil {
		c.opts.Logf = o.Logf
		if opts.DrainTimeout != 0 {
			c.opts.DrainTimeout = opts.DrainTimeout
		}
		return c.Down(ctx)
	}
	return o.teardown(ctx, false)
}

// runScopedDirs (and sockets) are removed by Down and recreated empty by Up. The containerd root (image
// content), certificates, configs and logs stay: logs for post-mortems, the rest is rewritten.
func (o Options) runScopedDirs() []string {
	dirs := []string{o.etcdDir(), o.containerdState(), o.runcRoot(), o.path("cni"), o.podLogsDir(), o.registryDir(), o.hostPathRoot(),
		o.containerdSocket(), o.containerdSocket() + ".ttrpc"}
	if strings.HasPrefix(o.KubeletDir, o.Root+"/") {
		// A kubelet dir outside the root is the user's to remove; it is only unmounted.
		dirs = append(dirs, o.KubeletDir)
	}
	return dirs
}

// teardown is Down for a set of options: it works on whatever is left, so it is also how Up
// cleans a half-started run.
func (o Options) teardown(ctx context.Context, drain bool) error {
	var errs []error
	if drain {
		o.drainPods(ctx)
	}
	for _, comp := range stopOrder {
		if comp == compContainerd {
			o.removeContainers(ctx)
		}
		if err := o.stopProcess(comp, stopGrace(comp)); err != nil {
			errs = append(errs, err)
		}
		if comp == compKubeProxy && o.KubeProxy != "" {
			// Removes kube-proxy's iptables rules (removeManagedChains below catches the rest).
			if _, err := run(ctx, o.KubeProxy, "--cleanup"); err != nil {
				o.logf("down: kube-proxy --cleanup: %v", err)
			}
		}
	}
	stopInProcessRegistry(o.Root)
	for _, comp := range o.recordedComponents() { // anything not in stopOrder
		if err := o.stopProcess(comp, 10*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if err := o.killLeftoverContainers(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := unmountAll(o.Root); err != nil {
		errs = append(errs, err)
	}
	if !strings.HasPrefix(o.KubeletDir, o.Root+"/") {
		if err := unmountAll(o.KubeletDir); err != nil {
			errs = append(errs, err)
		}
	}
	st, err := o.readHostState()
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	if err := o.tearDownNetwork(ctx, st); err != nil {
		errs = append(errs, fmt.Errorf("network: %w", err))
	}
	if st != nil {
		for name, value := range st.Sysctls {
			if err := writeSysctl(name, value); err != nil {
				errs = append(errs, fmt.Errorf("restore sysctl %s: %w", name, err))
			}
		}
		errs = append(errs, o.cleanHostPaths(st.AbsentPaths)...)
	}
	// Remove run-scoped state only once nothing is mounted there any more: RemoveAll
	// would otherwise delete through a mount into whatever it shows.
	// The run directory (PID files, host record, bridge marker) goes last and only after a
	// clean teardown: with it, a later Down or Up can finish the job.
	if left, _ := mountsUnder(o.Root); len(left) == 0 {
		for _, d := range o.runScopedDirs() {
			if err := os.RemoveAll(d); err != nil {
				errs = append(errs, err)
			}
		}
		if len(errs) == 0 {
			errs = append(errs, os.RemoveAll(o.runDir()))
		}
	} else {
		errs = append(errs, fmt.Errorf("mounts left under %s: %s", o.Root, strings.Join(left, ", ")))
	}
	return errors.Join(errs...)
}

// stopGrace is how long a component may take to exit after SIGTERM. The API server's
// graceful termination lingers for seconds after it stopped serving; by the time it is
// stopped no client is left, so it gets little.
func stopGrace(component string) time.Duration {
	if component == compAPIServer {
		return 3 * time.Second
	}
	return 10 * time.Second
}

// drainPods deletes every pod through the API and waits (up to DrainTimeout) for the kubelet
// to stop them and clean up their volumes: first the workloads, then the DaemonSet and
// host-network pods (such as the CSI node plugin, which must outlive the pods whose volumes
// it unpublishes). The controller-manager and scheduler are stopped first so nothing is
// recreated. Best effort: whatever is left is stopped forcibly afterwards.
func (o Options) drainPods(ctx context.Context) {
	kubelet, err := o.readProcessRecord(compKubelet)
	if err != nil || !kubelet.alive() {
		return
	}
	c := &Cluster{opts: o}
	cs, err := c.Clientset()
	if err != nil || !apiReady(ctx, cs) {
		return
	}
	_ = o.stopProcess(compControllerManager, 10*time.Second)
	_ = o.stopProcess(compScheduler, 10*time.Second)
	ctx, cancel := context.WithTimeout(ctx, o.DrainTimeout)
	defer cancel()
	pods, err := cs.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil || len(pods.Items) == 0 {
		return
	}
	var workloads, infrastructure []corev1.Pod
	for _, p := range pods.Items {
		if p.Spec.HostNetwork || ownedByDaemonSet(&p) {
			infrastructure = append(infrastructure, p)
		} else {
			workloads = append(workloads, p)
		}
	}
	o.logf("down: deleting %d pods, then %d DaemonSet/host-network pods", len(workloads), len(infrastructure))
	grace := int64(1)
	for _, wave := range [][]corev1.Pod{workloads, infrastructure} {
		for _, p := range wave {
			err := cs.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace})
			if err != nil && !apierrors.IsNotFound(err) {
				o.logf("down: delete pod %s/%s: %v", p.Namespace, p.Name, err)
			}
		}
		err := poll(ctx, 250*time.Millisecond, func() (bool, error) {
			for _, p := range wave {
				got, err := cs.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
				if err == nil && got.UID == p.UID {
					return false, nil
				}
			}
			return true, nil
		})
		if err != nil {
			o.logf("down: pods not gone within %s; stopping them forcibly", o.DrainTimeout)
			return
		}
	}
}

func ownedByDaemonSet(p *corev1.Pod) bool {
	for _, ref := range p.OwnerReferences {
		if ref.Kind == "DaemonSet" {
			return true
		}
	}
	return false
}

// removeContainers kills and deletes every container through containerd while it still runs,
// so shims exit and snapshots are released (the kubelet is stopped by then, nothing restarts
// them). The CRI sandboxes' network namespaces go when their mounts are removed.
func (o Options) removeContainers(ctx context.Context) {
	rec, err := o.readProcessRecord(compContainerd)
	if err != nil || !rec.alive() {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := o.ctr(ctx, "containers", "ls", "-q")
	if err != nil {
		return
	}
	ids := strings.Fields(out)
	if len(ids) == 0 {
		return
	}
	o.logf("down: removing %d containers", len(ids))
	for _, id := range ids {
		_, _ = o.ctr(ctx, "tasks", "rm", "-f", id)
	}
	_, _ = o.ctr(ctx, append([]string{"containers", "rm"}, ids...)...)
}

// killLeftoverContainers is the fallback when containerd was not running: it kills what runc
// still knows under the cluster's runc root, then the shims that served our containerd.
func (o Options) killLeftoverContainers(ctx context.Context) error {
	var errs []error
	nsDirs, _ := filepath.Glob(filepath.Join(o.runcRoot(), "*"))
	for _, nsDir := range nsDirs {
		out, err := runStdout(ctx, o.program("runc"), "--root", nsDir, "list", "-q")
		if err != nil {
			continue
		}
		for _, id := range strings.Fields(out) {
			_, _ = run(ctx, o.program("runc"), "--root", nsDir, "kill", "--all", id, "KILL")
			if _, err := run(ctx, o.program("runc"), "--root", nsDir, "delete", "--force", id); err != nil {
				errs = append(errs, err)
			}
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		cmdline, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if !strings.HasPrefix(filepath.Base(args[0]), "containerd-shim") {
			continue
		}
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "-address" && args[i+1] == o.containerdSocket() {
				var pid int
				if _, err := fmt.Sscanf(filepath.Base(filepath.Dir(p)), "%d", &pid); err == nil {
					o.logf("down: killing leftover shim %d", pid)
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
	}
	return errors.Join(errs...)
}

// cleanHostPaths removes, from the host paths that did not exist before Up, the entries the
// cluster's components left (libcni result cache of our network, kubelet log symlinks into
// the root, empty directories) and then the paths themselves if nothing else is in them.
func (o Options) cleanHostPaths(absent []string) []error {
	var errs []error
	for _, p := range absent {
		_ = filepath.WalkDir(p, func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return nil
			}
			ours := strings.HasPrefix(d.Name(), cniNetworkName+"-") // libcni: <network>-<container>-<ifname>
			if d.Type()&os.ModeSymlink != 0 {
				if target, err := os.Readlink(path); err == nil && strings.HasPrefix(target, o.Root+"/") {
					ours = true
				}
			}
			if d.Type()&os.ModeSocket != 0 {
				// Shim sockets, the kubelet's device-plugin socket: their servers are gone, and
				// Up found the directory absent, so no other program owns them.
				ours = true
			}
			if ours {
				_ = os.Remove(path)
			}
			return nil
		})
		if err := removeEmptyDirs(p); err != nil {
			errs = append(errs, err)
		}
		if _, err := os.Lstat(p); err == nil {
			o.logf("down: %s did not exist before up but holds files not from the cluster; left in place", p)
		}
	}
	return errs
}

// removeEmptyDirs removes dir and its subdirectories bottom-up where they are empty.
func removeEmptyDirs(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeEmptyDirs(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	if entries, err = os.ReadDir(dir); err == nil && len(entries) == 0 {
		return os.Remove(dir)
	}
	return nil
}

// Healthy reports whether every component of the cluster runs and the API server is ready.
func (c *Cluster) Healthy(ctx context.Context) bool {
	for _, comp := range []string{compEtcd, compContainerd, compAPIServer, compControllerManager, compScheduler, compKubeProxy, compKubelet} {
		rec, err := c.opts.readProcessRecord(comp)
		if err != nil || !rec.alive() {
			return false
		}
	}
	cs, err := c.Clientset()
	return err == nil && apiReady(ctx, cs)
}

// ComponentStatus is one line of Status.
type ComponentStatus struct {
	Component string
	PID       int
	Running   bool
	Log       string
}

// Status lists each component's process and whether it runs.
func (c *Cluster) Status() []ComponentStatus {
	var out []ComponentStatus
	for _, comp := range []string{compEtcd, compContainerd, compRegistry, compAPIServer, compControllerManager, compScheduler, compKubeProxy, compKubelet} {
		st := ComponentStatus{Component: comp, Log: c.opts.LogPath(comp)}
		if rec, err := c.opts.readProcessRecord(comp); err == nil {
			st.PID, st.Running = rec.PID, rec.alive()
		}
		out = append(out, st)
	}
	return out
}

// Options returns the cluster's complete options.
func (c *Cluster) Options() Options { return c.opts }

// Root is the directory holding all of the cluster's files.
func (c *Cluster) Root() string { return c.opts.Root }

// Kubeconfig is the path of the admin (system:masters) kubeconfig.
func (c *Cluster) Kubeconfig() string { return c.opts.adminKubeconfig() }

// KubeletDir is the kubelet's --root-dir; deploy the CSI node plugin with --kubelet-dir set to it.
func (c *Cluster) KubeletDir() string { return c.opts.KubeletDir }

// NodeName is the name of the cluster's only node.
func (c *Cluster) NodeName() string { return c.opts.NodeName }

// NodeIP is the node's InternalIP: the pod bridge's address, where the API server listens.
func (c *Cluster) NodeIP() string { return c.opts.nodeIP().String() }

// APIServerURL is the API server's address as the kubeconfig names it.
func (c *Cluster) APIServerURL() string { return c.opts.apiServerURL() }

// RegistryAddr is the loopback host:port of the OCI registry for library images. Only
// host-network pods (the CSI node plugin) and the host reach it.
func (c *Cluster) RegistryAddr() string { return c.opts.RegistryAddr }

// ContainerdAddress is containerd's socket (for ctr --address or crictl --runtime-endpoint).
func (c *Cluster) ContainerdAddress() string { return c.opts.containerdSocket() }

// BinDir holds the binaries the cluster runs: Kubernetes (kubectl among them), etcd and the
// container runtime (containerd, containerd-shim-runc-v2, ctr, runc).
func (c *Cluster) BinDir() string { return c.opts.BinDir }

// LogPath is the log file of a component: etcd, containerd, registry, kube-apiserver,
// kube-controller-manager, kube-scheduler, kube-proxy, kubelet.
func (c *Cluster) LogPath(component string) string { return c.opts.LogPath(component) }

// HostPathDir is a directory under the root for hostPath volumes of workloads deployed on the
// cluster, e.g. the CSI node plugin's cache, upper and work directories. Their parent is a
// shared mount (Up makes it one), so they can be mounted into containers with
// HostToContainer or Bidirectional propagation. Down unmounts whatever is mounted below it
// and deletes it, so nothing of a test outlives the cluster.
func (c *Cluster) HostPathDir(name string) string {
	return filepath.Join(c.opts.hostPathRoot(), name)
}

// RestConfig is a client configuration with admin rights.
func (c *Cluster) RestConfig() (*rest.Config, error) {
	return clientcmd.BuildConfigFromFlags("", c.Kubeconfig())
}

// Clientset is a typed client with admin rights.
func (c *Cluster) Clientset() (*kubernetes.Clientset, error) {
	cfg, err := c.RestConfig()
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

// Kubectl runs the cluster's kubectl with the admin kubeconfig and returns its stdout.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(c.opts.BinDir, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig()}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// Apply applies manifests: a kustomization directory (kubectl apply -k), or a file or a
// directory of files (kubectl apply -f).
func (c *Cluster) Apply(ctx context.Context, path string) (string, error) {
	return c.Kubectl(ctx, "apply", manifestFlag(path), path)
}

// Delete deletes what Apply created from path and waits for the objects to be gone.
func (c *Cluster) Delete(ctx context.Context, path string) (string, error) {
	return c.Kubectl(ctx, "delete", "--ignore-not-found", "--wait=true", manifestFlag(path), path)
}

func manifestFlag(path string) string {
	for _, k := range []string{"kustomization.yaml", "kustomization.yml", "Kustomization"} {
		if _, err := os.Stat(filepath.Join(path, k)); err == nil {
			return "-k"
		}
	}
	return "-f"
}

// ImportImage loads an image tarball (docker-archive, as written by test/images) into
// containerd's k8s.io namespace, where the kubelet finds it, and pins it: an imported image
// cannot be pulled again, so the kubelet's image garbage collection must never remove it
// (containerd's CRI plugin reports images labelled io.cri-containerd.pinned=pinned as pinned,
// and the kubelet skips pinned images). Pods then use the image's reference with
// imagePullPolicy IfNotPresent or Never. Images that pods or image volumes pull from the
// loopback registry (RegistryAddr) are pulled by containerd instead.
func (c *Cluster) ImportImage(ctx context.Context, tarballPath string) error {
	refs, err := tarballRefs(tarballPath)
	if err != nil {
		return fmt.Errorf("import %s: %w", tarballPath, err)
	}
	out, err := c.opts.ctr(ctx, "images", "import", tarballPath)
	if err != nil {
		return fmt.Errorf("import %s: %w", tarballPath, err)
	}
	for _, ref := range refs {
		if _, err := c.opts.ctr(ctx, "images", "label", ref, pinnedLabel+"=pinned"); err != nil {
			return fmt.Errorf("pin %s imported from %s: %w", ref, tarballPath, err)
		}
	}
	c.opts.logf("image: %s (pinned: %s)", strings.TrimSpace(out), strings.Join(refs, ", "))
	return nil
}

// pinnedLabel is the containerd image label its CRI plugin reports as a pinned image.
const pinnedLabel = "io.cri-containerd.pinned"

// PinnedImages lists the references of the images in containerd's CRI namespace that carry
// the pinned label.
func (c *Cluster) PinnedImages(ctx context.Context) ([]string, error) {
	out, err := c.opts.ctr(ctx, "images", "ls", "-q", `labels."`+pinnedLabel+`"==pinned`)
	if err != nil {
		return nil, err
	}
	return strings.Fields(out), nil
}

// tarballRefs returns the references an image tarball is tagged with (its manifest's
// RepoTags), the names `ctr images import` gives the images.
func tarballRefs(path string) ([]string, error) {
	m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(path) })
	if err != nil {
		return nil, fmt.Errorf("read the image tarball's manifest: %w", err)
	}
	var refs []string
	for _, d := range m {
		refs = append(refs, d.RepoTags...)
	}
	if len(refs) == 0 {
		return nil, errors.New("the image tarball names no image (no RepoTags); build it with a reference")
	}
	return refs, nil
}

// ctr runs containerd's CLI against the cluster's containerd, in the CRI namespace.
func (o Options) ctr(ctx context.Context, args ...string) (string, error) {
	// stdout only: containerd's client prints warnings (cgroup v1 deprecation) on stderr.
	return runStdout(ctx, o.program("ctr"), append([]string{"--address", o.containerdSocket(), "--namespace", "k8s.io"}, args...)...)
}

// CreateNamespace creates a namespace and waits until its default ServiceAccount exists
// (pods are refused before that).
func (c *Cluster) CreateNamespace(ctx context.Context, name string) error {
	cs, err := c.Clientset()
	if err != nil {
		return err
	}
	_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	waitCtx, cancel := context.WithTimeout(ctx, c.opts.ReadyTimeout)
	defer cancel()
	return poll(waitCtx, 100*time.Millisecond, func() (bool, error) {
		_, err := cs.CoreV1().ServiceAccounts(name).Get(waitCtx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
}
