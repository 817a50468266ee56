package localcluster

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/test/images"
)

// Component names: the keys of PID files and log files.
const (
	compEtcd              = "etcd"
	compContainerd        = "containerd"
	compRegistry          = "registry"
	compAPIServer         = "kube-apiserver"
	compControllerManager = "kube-controller-manager"
	compScheduler         = "kube-scheduler"
	compKubeProxy         = "kube-proxy"
	compKubelet           = "kubelet"
)

// stopOrder is the order Down stops components in: first what creates or restarts pods,
// then the control plane, then storage; containerd last but one so the kubelet cannot ask it
// for anything, the registry last (nothing depends on it).
var stopOrder = []string{compKubelet, compControllerManager, compScheduler, compKubeProxy, compAPIServer, compEtcd, compContainerd, compRegistry}

func (o Options) pki(name string) string { return filepath.Join(o.pkiDir(), name) }

func (o Options) kubeconfig(identity string) string {
	return filepath.Join(o.kubeconfigDir(), identity+".conf")
}

func (o Options) etcdURL() string { return fmt.Sprintf("http://127.0.0.1:%d", o.EtcdPort) }

func (o Options) etcdArgs() []string {
	peer := fmt.Sprintf("http://127.0.0.1:%d", o.EtcdPort+1)
	return []string{
		"--name=localcluster",
		"--data-dir=" + o.etcdDir(),
		"--listen-client-urls=" + o.etcdURL(),
		"--advertise-client-urls=" + o.etcdURL(),
		"--listen-peer-urls=" + peer,
		"--initial-advertise-peer-urls=" + peer,
		"--initial-cluster=localcluster=" + peer,
		"--initial-cluster-state=new",
	}
}

// writeContainerdConfig writes a containerd 2 config that keeps everything under Root: its own root, state, socket, runc root, CNI config and network namespaces. The CRI
// plugin runs the shim and runc from BinDir by absolute path, so a containerd installed on the
// host is never used. restrict_oom_score_adj is needed on these VMs: they refuse negative
// oom_score_adj and every sandbox then fails in runc ("can't get final child's PID from pipe").
// Images are pulled through the hosts directory that writeRegistryHosts fills: the loopback
// registry is a plain-HTTP host there, as a registry mirror on a real node would be.
// Config version 3 is read by every containerd 2.x (CONTAINERD_VERSION may go down to 2.2, the
// oldest that mounts image volumes with subPath); 2.3 and newer migrate it in memory to their
// version 4 at start, which only moves the socket addresses into server plugins.
func (o Options) writeContainerdConfig() (string, error) {
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) } // TOML basic strings accept JSON escapes
	cfg := fmt.Sprintf(`version = 3
root = %s
state = %s

[grpc]
  address = %s

[plugins."io.containerd.internal.v1.opt"]
  path = %s

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = %s
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = %s

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = %s
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      runtime_path = %s
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = %s
        Root = %s
        SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
`, q(o.containerdRoot()), q(o.containerdState()), q(o.containerdSocket()), q(o.path("containerd", "opt")),
		q(images.PauseRef), q(o.registryHostsDir()), q(o.cniConfDir()),
		q(o.program("containerd-shim-runc-v2")), q(o.program("runc")), q(o.runcRoot()))
	path := filepath.Join(o.configDir(), "containerd.toml")
	return path, os.WriteFile(path, []byte(cfg), 0o644)
}

// writeRegistryHosts configures the loopback registry as a plain-HTTP registry host of
// containerd (<registryHostsDir>/<host:port>/hosts.toml): pods whose images (or image volumes)
// name RegistryAddr are pulled from it by containerd itself, like on a real node.
func (o Options) writeRegistryHosts() error {
	dir := filepath.Join(o.registryHostsDir(), o.RegistryAddr)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	hosts := fmt.Sprintf(`server = "http://%[1]s"

[host."http://%[1]s"]
  capabilities = ["pull", "resolve"]
`, o.RegistryAddr)
	return os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(hosts), 0o644)
}

// writeCNIConfig writes the bridge + host-local + loopback network. The bridge is the one
// setUpNetwork created (isGateway: the plugin finds the gateway address already there);
// ipMasq is off because pod traffic never leaves the machine; hairpin lets a pod reach itself
// through its own Service.
func (o Options) writeCNIConfig() error {
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       cniNetworkName,
		"plugins": []any{
			map[string]any{
				"type":        "bridge",
				"bridge":      o.BridgeName,
				"isGateway":   true,
				"ipMasq":      false,
				"hairpinMode": true,
				"ipam": map[string]any{
					"type":    "host-local",
					"dataDir": o.cniIPAMDir(),
					"ranges":  [][]map[string]string{{{"subnet": o.PodCIDR, "gateway": o.nodeIP().String()}}},
					"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				},
			},
			map[string]any{"type": "loopback"},
		},
	}
	data, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.cniConfDir(), 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(o.cniConfDir(), "10-"+cniNetworkName+".conflist"), data, 0o644)
}

func (o Options) containerdArgs(config string) []string {
	return []string{"--config", config, "--log-level", "info"}
}

func (o Options) apiServerArgs() []string {
	return []string{
		"--etcd-servers=" + o.etcdURL(),
		"--bind-address=" + o.nodeIP().String(),
		"--advertise-address=" + o.nodeIP().String(),
		fmt.Sprintf("--secure-port=%d", o.APIServerPort),
		"--tls-cert-file=" + o.pki("apiserver.crt"),
		"--tls-private-key-file=" + o.pki("apiserver.key"),
		"--client-ca-file=" + o.pki("ca.crt"),
		"--service-account-key-file=" + o.pki("sa.pub"),
		"--service-account-signing-key-file=" + o.pki("sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=" + o.ServiceCIDR,
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--kubelet-client-certificate=" + o.pki("apiserver-kubelet-client.crt"),
		"--kubelet-client-key=" + o.pki("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority=" + o.pki("ca.crt"),
		"--kubelet-preferred-address-types=InternalIP",
		"--profiling=false",
		"--v=1",
	}
}

func (o Options) controllerManagerArgs() []string {
	kc := o.kubeconfig("controller-manager")
	return []string{
		"--kubeconfig=" + kc,
		"--authentication-kubeconfig=" + kc,
		"--authorization-kubeconfig=" + kc,
		"--bind-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", controllerManagerPort),
		"--leader-elect=false",
		"--use-service-account-credentials=true",
		"--service-account-private-key-file=" + o.pki("sa.key"),
		"--root-ca-file=" + o.pki("ca.crt"),
		"--cluster-signing-cert-file=" + o.pki("ca.crt"),
		"--cluster-signing-key-file=" + o.pki("ca.key"),
		"--service-cluster-ip-range=" + o.ServiceCIDR,
		"--cluster-cidr=" + o.PodCIDR,
		"--allocate-node-cidrs=false",
		"--profiling=false",
		"--v=1",
	}
}

func (o Options) schedulerArgs() []string {
	kc := o.kubeconfig("scheduler")
	return []string{
		"--kubeconfig=" + kc,
		"--authentication-kubeconfig=" + kc,
		"--authorization-kubeconfig=" + kc,
		"--bind-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", schedulerPort),
		"--leader-elect=false",
		"--profiling=false",
		"--v=1",
	}
}

// kubeProxyArgs runs kube-proxy in iptables mode without touching host-wide conntrack settings
// (max and timeouts left as they are) and with NodePorts only on the node IP, never on the
// host's other addresses.
func (o Options) kubeProxyArgs() []string {
	return []string{
		"--kubeconfig=" + o.kubeconfig("kube-proxy"),
		"--proxy-mode=iptables",
		"--hostname-override=" + o.NodeName,
		"--bind-address=" + o.nodeIP().String(),
		"--cluster-cidr=" + o.PodCIDR,
		"--nodeport-addresses=" + o.nodeIP().String() + "/32",
		"--iptables-localhost-nodeports=false",
		fmt.Sprintf("--healthz-bind-address=127.0.0.1:%d", kubeProxyHealthzPort),
		fmt.Sprintf("--metrics-bind-address=127.0.0.1:%d", kubeProxyMetricsPort),
		"--conntrack-max-per-core=0",
		"--conntrack-tcp-timeout-established=0",
		"--conntrack-tcp-timeout-close-wait=0",
		"--iptables-sync-period=10s",
		"--v=1",
	}
}

func (o Options) kubeletArgs(config string) []string {
	return []string{
		"--config=" + config,
		"--kubeconfig=" + o.kubeconfig("kubelet"),
		"--root-dir=" + o.KubeletDir,
		"--cert-dir=" + filepath.Join(o.KubeletDir, "pki"),
		"--hostname-override=" + o.NodeName,
		"--node-ip=" + o.nodeIP().String(),
		"--v=1",
	}
}

// writeKubeletConfig writes the KubeletConfiguration (kubelet.config.k8s.io/v1beta1) these
// VMs need (cgroup v1, cgroupfs, no QoS cgroups, swap tolerated) with authentication by
// client certificate or token webhook and webhook authorization against the API server,
// serving on the node IP. It is written as a plain document: the typed struct would pull
// k8s.io/component-base into the project's module for one file.
func (o Options) writeKubeletConfig() (string, error) {
	cfg := map[string]any{
		"apiVersion": "kubelet.config.k8s.io/v1beta1",
		"kind":       "KubeletConfiguration",
		"address":    o.nodeIP().String(),
		"port":       kubeletPort,
		// The read-only port serves without authentication: off.
		"readOnlyPort":       0,
		"healthzBindAddress": "127.0.0.1",
		"healthzPort":        kubeletHealthzPort,
		"tlsCertFile":        o.pki("kubelet.crt"),
		"tlsPrivateKeyFile":  o.pki("kubelet.key"),
		"authentication": map[string]any{
			"x509":      map[string]any{"clientCAFile": o.pki("ca.crt")},
			"webhook":   map[string]any{"enabled": true},
			"anonymous": map[string]any{"enabled": false},
		},
		"authorization":            map[string]any{"mode": "Webhook"},
		"cgroupDriver":             "cgroupfs",
		"cgroupsPerQOS":            false,
		"enforceNodeAllocatable":   []string{},
		"failSwapOn":               false,
		"failCgroupV1":             false,
		"containerRuntimeEndpoint": "unix://" + o.containerdSocket(),
		"podLogsDir":               o.podLogsDir(),
		"clusterDomain":            "cluster.local",
		// No cluster DNS exists, and pods must not query the host's resolvers (they are off
		// this machine): pods get no nameserver at all.
		"resolvConf": "",
		// Disk pressure as on a real node: the kubelet's own defaults. Image GC starts at 85%
		// and frees down to 80%; it deletes only unused images that are not pinned, i.e. the
		// ones pods pulled from the loopback registry, which can be pulled again. Every image
		// the node cannot pull (pause, busybox, the project images: imported with
		// ImportImage) is pinned, and pause is also containerd's pinned sandbox image, so GC
		// never leaves the node unable to start a pod. Pods are evicted below 10% free disk
		// (15% for images), the node is tainted DiskPressure and recovers on its own once
		// space is freed: after evictionPressureTransitionPeriod, shortened from 5m so that
		// a test does not wait five minutes after freeing the disk.
		"evictionHard": map[string]string{
			"memory.available": "100Mi", "nodefs.available": "10%", "nodefs.inodesFree": "5%", "imagefs.available": fmt.Sprintf("%d%%", imagefsEvictionPercent),
		},
		"evictionPressureTransitionPeriod": "30s",
		"imageGCHighThresholdPercent":      85,
		"imageGCLowThresholdPercent":       80,
		"serializeImagePulls":              false,
		"nodeStatusReportFrequency":        "10s",
		"syncFrequency":                    "10s",
		"fileCheckFrequency":               "10s",
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return "", err
	}
	path := filepath.Join(o.configDir(), "kubelet.yaml")
	return path, os.WriteFile(path, out, 0o644)
}

// loopbackPortsInUse returns the component ports on 127.0.0.1 that something else holds.
func (o Options) loopbackPortsInUse() []string {
	addrs := []string{
		fmt.Sprintf("127.0.0.1:%d", o.EtcdPort),
		fmt.Sprintf("127.0.0.1:%d", o.EtcdPort+1),
		fmt.Sprintf("127.0.0.1:%d", kubeletHealthzPort),
		fmt.Sprintf("127.0.0.1:%d", controllerManagerPort),
		fmt.Sprintf("127.0.0.1:%d", schedulerPort),
		fmt.Sprintf("127.0.0.1:%d", kubeProxyHealthzPort),
		fmt.Sprintf("127.0.0.1:%d", kubeProxyMetricsPort),
		o.RegistryAddr,
		net.JoinHostPort(o.nodeIP().String(), fmt.Sprint(o.APIServerPort)),
		net.JoinHostPort(o.nodeIP().String(), fmt.Sprint(kubeletPort)),
	}
	var busy []string
	for _, a := range addrs {
		l, err := net.Listen("tcp", a)
		if err != nil {
			busy = append(busy, a)
			continue
		}
		l.Close()
	}
	return busy
}
