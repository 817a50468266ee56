package localcluster

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Sysctls that the cluster's components change on the host: Up records their values before
// anything starts and Down puts them back, so the machine ends as it was found.
//   - ip_forward, bridge-nf-call-iptables: set by Up, needed for ClusterIP traffic between
//     pods on the bridge (kube-proxy DNATs, the reply must pass netfilter to be un-NATed);
//   - vm/kernel settings: the kubelet's "kernel tunables" (protectKernelDefaults=false);
//   - route_localnet: kube-proxy's localhost NodePorts (disabled, recorded in case).
var managedSysctls = []string{
	"net/ipv4/ip_forward",
	"net/bridge/bridge-nf-call-iptables",
	"net/ipv4/conf/all/route_localnet",
	"vm/overcommit_memory",
	"vm/panic_on_oom",
	"kernel/panic",
	"kernel/panic_on_oops",
	"kernel/keys/root_maxkeys",
	"kernel/keys/root_maxbytes",
}

// Host paths outside Root that containerd, the CNI plugins or the kubelet create whatever they
// are told (hard-coded locations). Up records which ones did not exist; Down removes those
// again once only the cluster's own entries are left in them.
var hostPathsCreatedByComponents = []string{
	"/var/lib/cni",        // libcni's result cache (containerd 1.6 does not let us move it)
	"/var/log/containers", // the kubelet's container log symlinks (a constant in the kubelet)
	"/var/log/pods",
	"/run/containerd", // containerd-shim-runc-v2 sockets under /run/containerd/s
	"/var/run/netns",
	"/opt/containerd",
	"/etc/cni",
	"/var/lib/kubelet", // the kubelet's device-plugin socket path is a constant, not under --root-dir
}

// hostState is what Up recorded about the host before changing it (run/host.json).
type hostState struct {
	Sysctls map[string]string `json:"sysctls"`
	// AbsentPaths did not exist before Up.
	AbsentPaths []string `json:"absentPaths"`
	// ChainsBefore are the iptables chains named KUBE-* or APMCSI-* that existed before Up
	// (family/table/chain), which Down must leave alone.
	ChainsBefore []string `json:"chainsBefore"`
}

// recordHostState saves the host's state unless a record of an unfinished earlier run exists:
// that record holds the values from before the earlier run, the ones to restore.
func (o Options) recordHostState(ctx context.Context) error {
	if _, err := os.Stat(o.hostStateFile()); err == nil {
		return nil
	}
	st := hostState{Sysctls: map[string]string{}}
	for _, s := range managedSysctls {
		v, err := os.ReadFile(filepath.Join("/proc/sys", s))
		if err != nil {
			continue // e.g. br_netfilter not loaded: nothing to restore
		}
		st.Sysctls[s] = strings.TrimSpace(string(v))
	}
	for _, p := range hostPathsCreatedByComponents {
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			st.AbsentPaths = append(st.AbsentPaths, p)
		}
	}
	chains, err := managedChains(ctx)
	if err != nil {
		return err
	}
	st.ChainsBefore = chains
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(o.hostStateFile(), data, 0o644)
}

func (o Options) readHostState() (*hostState, error) {
	data, err := os.ReadFile(o.hostStateFile())
	if err != nil {
		return nil, err
	}
	var st hostState
	return &st, json.Unmarshal(data, &st)
}

func writeSysctl(name, value string) error {
	return os.WriteFile(filepath.Join("/proc/sys", name), []byte(value), 0o644)
}

// runStdout is run returning stdout alone (warnings on stderr stay out of parsed output).
func runStdout(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return string(out), nil
}

func run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// checkRanges refuses pod or service ranges that overlap a route or an address the host
// already has (other than our own bridge's), so the cluster cannot capture or leak traffic.
func (o Options) checkRanges(ctx context.Context) error {
	out, err := run(ctx, "ip", "-j", "-4", "route", "show", "table", "all")
	if err != nil {
		return err
	}
	var routes []struct {
		Dst string `json:"dst"`
		Dev string `json:"dev"`
	}
	if err := json.Unmarshal([]byte(out), &routes); err != nil {
		return fmt.Errorf("parse ip route output: %w", err)
	}
	ranges := []netip.Prefix{netip.MustParsePrefix(o.PodCIDR), netip.MustParsePrefix(o.ServiceCIDR)}
	for _, r := range routes {
		if r.Dev == o.BridgeName || r.Dst == "default" || r.Dst == "" {
			continue
		}
		dst, err := netip.ParsePrefix(r.Dst)
		if err != nil {
			addr, aerr := netip.ParseAddr(r.Dst)
			if aerr != nil {
				continue
			}
			dst = netip.PrefixFrom(addr, 32)
		}
		for _, want := range ranges {
			if dst.Overlaps(want) {
				return fmt.Errorf("range %s overlaps the host's route %s dev %s; choose another with Options.PodCIDR/ServiceCIDR", want, r.Dst, r.Dev)
			}
		}
	}
	return nil
}

// setUpNetwork creates the pod bridge with the node IP, routes the service range onto it,
// enables forwarding and bridge netfilter, and installs the guard rules.
//
// The bridge exists before the CNI plugin runs so that the API server and the kubelet can
// listen on the node IP from the start; the CNI bridge plugin adopts it (same name, same
// gateway address). Routing the service range onto the bridge means that a ClusterIP
// connection made before kube-proxy has programmed its DNAT rules goes nowhere, instead of
// following the default route off the machine.
func (o Options) setUpNetwork(ctx context.Context) error {
	prefix := netip.MustParsePrefix(o.PodCIDR)
	addr := netip.PrefixFrom(o.nodeIP(), prefix.Bits()).String()
	// Up tore down its own earlier bridge before getting here: one that exists now belongs to
	// something else (another root's cluster), and deleting it on Down would break that.
	if _, err := run(ctx, "ip", "link", "show", "dev", o.BridgeName); err == nil {
		return fmt.Errorf("interface %s already exists (a cluster under another root?); choose Options.BridgeName", o.BridgeName)
	}
	if _, err := run(ctx, "ip", "link", "add", "name", o.BridgeName, "type", "bridge"); err != nil {
		return err
	}
	if err := os.WriteFile(o.bridgeMarker(), []byte(o.BridgeName+"\n"), 0o644); err != nil {
		return err
	}
	if _, err := run(ctx, "ip", "addr", "replace", addr, "dev", o.BridgeName); err != nil {
		return err
	}
	if _, err := run(ctx, "ip", "link", "set", "dev", o.BridgeName, "up"); err != nil {
		return err
	}
	if _, err := run(ctx, "ip", "route", "replace", o.ServiceCIDR, "dev", o.BridgeName, "src", o.nodeIP().String()); err != nil {
		return err
	}
	if _, err := os.Stat("/proc/sys/net/bridge/bridge-nf-call-iptables"); err != nil {
		// Loading br_netfilter is the one host change we cannot undo cleanly; ask for it.
		return errors.New("the br_netfilter kernel module is not loaded (modprobe br_netfilter)")
	}
	for _, s := range []string{"net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"} {
		if err := writeSysctl(s, "1"); err != nil {
			return err
		}
	}
	return o.installGuard(ctx)
}

// guardChain holds the rules that keep pod traffic on this machine: forwarding is on (pods
// reach ClusterIPs through the host), so without them a pod could route to any address
// through the host's default route, and the host's other networks could reach the pods.
const guardChain = "APMCSI-LOCALCLUSTER"

func (o Options) installGuard(ctx context.Context) error {
	_, _ = run(ctx, "iptables", "-w", "-N", guardChain)
	if _, err := run(ctx, "iptables", "-w", "-F", guardChain); err != nil {
		return err
	}
	rules := [][]string{
		{"-A", guardChain, "-i", o.BridgeName, "!", "-o", o.BridgeName, "-j", "DROP"},
		{"-A", guardChain, "!", "-i", o.BridgeName, "-o", o.BridgeName, "-j", "DROP"},
	}
	for _, r := range rules {
		if _, err := run(ctx, "iptables", append([]string{"-w"}, r...)...); err != nil {
			return err
		}
	}
	return moveGuardFirst(ctx)
}

// moveGuardFirst (re)inserts the jump to the guard chain as FORWARD's first rule. kube-proxy
// inserts its own jumps at the top when it starts, and one of them accepts marked traffic:
// Up calls this again once kube-proxy has synced so the guard is evaluated before anything.
func moveGuardFirst(ctx context.Context) error {
	for {
		if _, err := run(ctx, "iptables", "-w", "-D", "FORWARD", "-j", guardChain); err != nil {
			break
		}
	}
	_, err := run(ctx, "iptables", "-w", "-I", "FORWARD", "1", "-j", guardChain)
	return err
}

var iptablesFamilies = []struct{ name, save, restore string }{
	{"ipv4", "iptables-save", "iptables-restore"},
	{"ipv6", "ip6tables-save", "ip6tables-restore"},
}

var iptablesTables = []string{"filter", "nat", "mangle"}

func isManagedChain(name string) bool {
	return strings.HasPrefix(name, "KUBE-") || strings.HasPrefix(name, "APMCSI-")
}

// managedChains lists existing KUBE-* and APMCSI-* chains as family/table/chain.
func managedChains(ctx context.Context) ([]string, error) {
	var out []string
	for _, fam := range iptablesFamilies {
		for _, table := range iptablesTables {
			dump, err := run(ctx, fam.save, "-t", table)
			if err != nil {
				return nil, err
			}
			for _, line := range strings.Split(dump, "\n") {
				if strings.HasPrefix(line, ":") {
					chain := strings.Fields(line[1:])[0]
					if isManagedChain(chain) {
						out = append(out, fam.name+"/"+table+"/"+chain)
					}
				}
			}
		}
	}
	return out, nil
}

// removeManagedChains deletes the KUBE-* and APMCSI-* chains that did not exist before Up
// (kube-proxy's rules, the kubelet's canary chains, our guard) and every rule that jumps to
// them, through iptables-restore --noflush so each table changes in one transaction.
func removeManagedChains(ctx context.Context, keep []string) error {
	kept := map[string]bool{}
	for _, k := range keep {
		kept[k] = true
	}
	var errs []error
	for _, fam := range iptablesFamilies {
		for _, table := range iptablesTables {
			dump, err := run(ctx, fam.save, "-t", table)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			script := chainRemovalScript(table, dump, func(chain string) bool {
				return isManagedChain(chain) && !kept[fam.name+"/"+table+"/"+chain]
			})
			if script == "" {
				continue
			}
			cmd := exec.CommandContext(ctx, fam.restore, "-w", "--noflush")
			cmd.Stdin = strings.NewReader(script)
			if out, err := cmd.CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("%s (%s %s): %w: %s", fam.restore, fam.name, table, err, bytes.TrimSpace(out)))
			}
		}
	}
	return errors.Join(errs...)
}

// chainRemovalScript turns one table's iptables-save dump into an iptables-restore --noflush
// script that deletes the chains selected by remove: first every rule elsewhere that jumps to
// one of them (kept exactly as iptables-save quoted it), then their rules (a chain line
// flushes the chain in --noflush mode), then the chains. It is empty when nothing is selected.
func chainRemovalScript(table, dump string, remove func(chain string) bool) string {
	removed := map[string]bool{}
	var chains []string
	for _, line := range strings.Split(dump, "\n") {
		if strings.HasPrefix(line, ":") {
			chain := strings.Fields(line[1:])[0]
			if remove(chain) {
				removed[chain] = true
				chains = append(chains, chain)
			}
		}
	}
	if len(chains) == 0 {
		return ""
	}
	var script strings.Builder
	fmt.Fprintf(&script, "*%s\n", table)
	sc := bufio.NewScanner(strings.NewReader(dump))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "-A" || removed[fields[1]] {
			continue
		}
		for i := 2; i+1 < len(fields); i++ {
			if (fields[i] == "-j" || fields[i] == "-g") && removed[fields[i+1]] {
				fmt.Fprintf(&script, "-D %s\n", strings.TrimPrefix(sc.Text(), "-A "))
				break
			}
		}
	}
	for _, chain := range chains {
		fmt.Fprintf(&script, ":%s - [0:0]\n", chain)
	}
	for _, chain := range chains {
		fmt.Fprintf(&script, "-X %s\n", chain)
	}
	script.WriteString("COMMIT\n")
	return script.String()
}

// tearDownNetwork deletes the veths left on the bridge, the bridge itself (its address and
// the service route go with it) and the iptables chains the cluster created.
//
// Chains are only removed when st (the record Up made before changing the host) exists:
// without it there is no telling ours from someone else's.
func (o Options) tearDownNetwork(ctx context.Context, st *hostState) error {
	var errs []error
	if _, err := os.Stat(o.bridgeMarker()); err == nil {
		errs = append(errs, o.deleteBridge(ctx))
	}
	if st != nil {
		if err := removeManagedChains(ctx, st.ChainsBefore); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// bridgeMarker records that this root's Up created the bridge, so Down never deletes an
// interface of the same name that something else made.
func (o Options) bridgeMarker() string { return filepath.Join(o.runDir(), "bridge-created") }

func (o Options) deleteBridge(ctx context.Context) error {
	var errs []error
	if out, err := run(ctx, "ip", "-j", "link", "show", "master", o.BridgeName); err == nil {
		var links []struct {
			Name string `json:"ifname"`
		}
		if json.Unmarshal([]byte(out), &links) == nil {
			for _, l := range links {
				if _, err := run(ctx, "ip", "link", "del", "dev", l.Name); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	if _, err := run(ctx, "ip", "link", "show", "dev", o.BridgeName); err == nil {
		if _, err := run(ctx, "ip", "link", "del", "dev", o.BridgeName); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		errs = append(errs, os.Remove(o.bridgeMarker()))
	}
	return errors.Join(errs...)
}
