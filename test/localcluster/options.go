package localcluster

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"time"
)

// Defaults of Options. The pod and service ranges are those of kubeadm and kind; Up refuses to
// start when either overlaps a route the host already has.
const (
	DefaultRoot          = "/var/lib/apm-csi-localcluster"
	DefaultNodeName      = "apm-csi-local"
	DefaultPodCIDR       = "10.244.0.0/16"
	DefaultServiceCIDR   = "10.96.0.0/16"
	DefaultBridge        = "apmcsi0"
	DefaultAPIServerPort = 6443
	DefaultEtcdPort      = 12379
	DefaultRegistryAddr  = "127.0.0.1:5000"
	DefaultReadyTimeout  = 2 * time.Minute
	DefaultDrainTimeout  = 30 * time.Second
)

// Fixed loopback ports of the components that serve health or metrics. They never leave
// loopback, so they only need to be free on 127.0.0.1.
const (
	kubeletHealthzPort    = 10248
	kubeletPort           = 10250
	controllerManagerPort = 10257
	schedulerPort         = 10259
	kubeProxyHealthzPort  = 10256
	kubeProxyMetricsPort  = 10249
)

// Options configure a local cluster. The zero value is a valid configuration: every field
// has a default.
type Options struct {
	// Root is the one directory that holds everything the cluster writes: certificates,
	// kubeconfigs, etcd data, containerd's root/state/socket, the kubelet root (by default),
	// logs and PID files.
	Root string `json:"root"`
	// KubeletDir is the kubelet --root-dir (default <Root>/kubelet). The CSI node plugin must
	// be deployed with its --kubelet-dir set to this.
	KubeletDir string `json:"kubeletDir"`
	// ContainerdRoot is containerd's root: image content and snapshots, the kubelet's image
	// filesystem (default <Root>/containerd/root-v2). A test can put it, with KubeletDir, on
	// a small filesystem of its own to fill it.
	ContainerdRoot string `json:"containerdRoot,omitempty"`
	// NodeName is the name the kubelet registers.
	NodeName string `json:"nodeName"`
	// PodCIDR is the private range of the pod bridge; its first address is the bridge's and
	// the node's IP, where the API server and the kubelet listen.
	PodCIDR string `json:"podCIDR"`
	// ServiceCIDR is the range of ClusterIPs; its first address is the kubernetes Service.
	ServiceCIDR string `json:"serviceCIDR"`
	// BridgeName is the Linux bridge the pods attach to (at most 15 characters).
	BridgeName string `json:"bridgeName"`
	// APIServerPort is the API server's secure port on the node IP.
	APIServerPort int `json:"apiServerPort"`
	// EtcdPort is etcd's client port on 127.0.0.1; EtcdPort+1 is its peer port.
	EtcdPort int `json:"etcdPort"`
	// RegistryAddr is the loopback address of the OCI registry for library images.
	RegistryAddr string `json:"registryAddr"`

	// RepoRoot is the apm-csi checkout whose hack/install-deps.sh provides the binaries
	// (default: found by walking up from the working directory).
	RepoRoot string `json:"repoRoot"`
	// BinDir holds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl
	// (default: the directory hack/install-deps.sh prints, after it installs what is missing).
	BinDir string `json:"binDir"`
	// KubeProxy is the kube-proxy binary (default: built once through the Go module proxy and
	// cached next to BinDir, see EnsureKubeProxy).
	KubeProxy string `json:"kubeProxy"`

	// RegistryExecutable, when set, is a program that serves the registry when run as
	// `<exe> serve-registry --addr ADDR --dir DIR` (the localcluster CLI). Up copies it under
	// Root and runs it detached, so the registry outlives the calling process. When empty the
	// registry is served inside the calling process and stops when it exits or calls Down.
	RegistryExecutable string `json:"registryExecutable,omitempty"`

	// ReadyTimeout bounds each readiness wait of Up (API server healthy, node Ready, ...).
	ReadyTimeout time.Duration `json:"readyTimeout"`
	// DrainTimeout bounds how long Down lets the kubelet delete pods (and so unpublish CSI
	// volumes) before it stops everything forcibly.
	DrainTimeout time.Duration `json:"drainTimeout"`
	// KeepOnFailure leaves the processes of a failed Up running for inspection.
	KeepOnFailure bool `json:"-"`
	// Logf receives progress messages; nil discards them.
	Logf func(format string, args ...any) `json:"-"`
}

// complete fills in defaults and validates.
func (o Options) complete() (Options, error) {
	if o.Root == "" {
		o.Root = DefaultRoot
	}
	root, err := filepath.Abs(o.Root)
	if err != nil {
		return o, err
	}
	o.Root = filepath.Clean(root)
	if o.Root == "/" {
		return o, errors.New("root must not be /")
	}
	if o.KubeletDir == "" {
		o.KubeletDir = filepath.Join(o.Root, "kubelet")
	}
	if o.KubeletDir, err = filepath.Abs(o.KubeletDir); err != nil {
		return o, err
	}
	if o.ContainerdRoot != "" {
		if o.ContainerdRoot, err = filepath.Abs(o.ContainerdRoot); err != nil {
			return o, err
		}
	}
	if o.NodeName == "" {
		o.NodeName = DefaultNodeName
	}
	if o.PodCIDR == "" {
		o.PodCIDR = DefaultPodCIDR
	}
	if o.ServiceCIDR == "" {
		o.ServiceCIDR = DefaultServiceCIDR
	}
	if o.BridgeName == "" {
		o.BridgeName = DefaultBridge
	}
	if len(o.BridgeName) > 15 {
		return o, fmt.Errorf("bridge name %q is longer than 15 characters", o.BridgeName)
	}
	if o.APIServerPort == 0 {
		o.APIServerPort = DefaultAPIServerPort
	}
	if o.EtcdPort == 0 {
		o.EtcdPort = DefaultEtcdPort
	}
	if o.RegistryAddr == "" {
		o.RegistryAddr = DefaultRegistryAddr
	}
	if host, _, err := net.SplitHostPort(o.RegistryAddr); err != nil || !isLoopback(host) {
		return o, fmt.Errorf("registry address %q must be a loopback host:port", o.RegistryAddr)
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = DefaultReadyTimeout
	}
	if o.DrainTimeout == 0 {
		o.DrainTimeout = DefaultDrainTimeout
	}
	pods, err := netip.ParsePrefix(o.PodCIDR)
	if err != nil || !pods.Addr().Is4() || pods.Bits() > 24 || !pods.Addr().IsPrivate() {
		return o, fmt.Errorf("pod CIDR %q must be a private IPv4 range of /24 or larger", o.PodCIDR)
	}
	services, err := netip.ParsePrefix(o.ServiceCIDR)
	if err != nil || !services.Addr().Is4() || services.Bits() > 24 || !services.Addr().IsPrivate() {
		return o, fmt.Errorf("service CIDR %q must be a private IPv4 range of /24 or larger", o.ServiceCIDR)
	}
	if pods.Overlaps(services) {
		return o, fmt.Errorf("pod CIDR %s overlaps service CIDR %s", pods, services)
	}
	o.PodCIDR, o.ServiceCIDR = pods.Masked().String(), services.Masked().String()
	return o, nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

func (o Options) logf(format string, args ...any) {
	if o.Logf != nil {
		o.Logf(format, args...)
	}
}

// firstHost is the first usable address of a range: the bridge/node IP of the pod range and
// the kubernetes Service IP of the service range.
func firstHost(cidr string) netip.Addr {
	return netip.MustParsePrefix(cidr).Masked().Addr().Next()
}

// nodeIP is the bridge's address: the node's InternalIP, where the API server and kubelet
// listen and where pods reach the host.
func (o Options) nodeIP() netip.Addr { return firstHost(o.PodCIDR) }

// apiServerServiceIP is the ClusterIP of the default/kubernetes Service.
func (o Options) apiServerServiceIP() netip.Addr { return firstHost(o.ServiceCIDR) }

func (o Options) apiServerURL() string {
	return fmt.Sprintf("https://%s", net.JoinHostPort(o.nodeIP().String(), fmt.Sprint(o.APIServerPort)))
}

// Paths under Root.
func (o Options) path(elem ...string) string {
	return filepath.Join(append([]string{o.Root}, elem...)...)
}

func (o Options) pkiDir() string           { return o.path("pki") }
func (o Options) kubeconfigDir() string    { return o.path("kubeconfig") }
func (o Options) adminKubeconfig() string  { return o.path("kubeconfig", "admin.conf") }
func (o Options) logDir() string           { return o.path("logs") }
func (o Options) runDir() string           { return o.path("run") }
func (o Options) stateFile() string        { return o.path("run", "cluster.json") }
func (o Options) hostStateFile() string    { return o.path("run", "host.json") }
func (o Options) etcdDir() string          { return o.path("etcd") }
func (o Options) registryHostsDir() string { return o.path("config", "registry-hosts") }

// containerdRoot (image content and snapshots, kept across runs) is apart from "root", where
// containerd 1.x of older checkouts kept it: containerd 2 migrates a root's metadata in a way
// containerd 1.x cannot read back.
func (o Options) containerdRoot() string {
	if o.ContainerdRoot != "" {
		return o.ContainerdRoot
	}
	return o.path("containerd", "root-v2")
}
func (o Options) containerdState() string  { return o.path("containerd", "state") }
func (o Options) containerdSocket() string { return o.path("containerd", "containerd.sock") }
func (o Options) runcRoot() string         { return o.path("runc") }
func (o Options) cniConfDir() string       { return o.path("cni", "net.d") }
func (o Options) cniIPAMDir() string       { return o.path("cni", "ipam") }
func (o Options) podLogsDir() string       { return o.path("pod-logs") }
func (o Options) configDir() string        { return o.path("config") }
func (o Options) imagesDir() string        { return o.path("images") }
func (o Options) registryDir() string      { return o.path("registry") }
func (o Options) binDir() string           { return o.path("bin") }
func (o Options) hostPathRoot() string     { return o.path("hostpath") }

// cniNetworkName names the CNI network (and so its cache entries on the host).
const cniNetworkName = "apm-csi-localcluster"
