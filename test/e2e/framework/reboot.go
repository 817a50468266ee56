package framework

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/test/localcluster"
)

// Reboot is what SimulateReboot did, with the times a recovery is measured from.
type Reboot struct {
	// Unmounted is how many mounts the reboot dropped (below the kubelet dir, the node
	// plugin's state dir and containerd's state dir).
	Unmounted int
	// Down is when the kubelet was stopped; KubeletStarted when it was started again.
	Down, KubeletStarted time.Time
}

// SimulateReboot does to the node what a reboot does, with the control plane left running:
// the kubelet and containerd stop, every container process and shim is killed, every mount
// below the kubelet dir, the node plugin's state dir (stateDir) and containerd's state dir is
// dropped, deepest first (a busy one detached), and what lives on tmpfs on a real node
// (containerd's and runc's state under /run) is emptied. The kubelet dir and the hostPath root
// stay shared mount points, as "/" is on a booted node; files on disk stay. Then containerd
// and the kubelet start again with their command lines. duringOutage, if not nil, runs while
// the node is down (the API server still answers).
func SimulateReboot(ctx context.Context, c *localcluster.Cluster, stateDir string, logf Logf, duringOutage func() error) (*Reboot, error) {
	r := &Reboot{Down: time.Now()}
	agents, err := c.StopNodeAgents(ctx)
	if err != nil {
		return r, fmt.Errorf("stopping the node: %w", err)
	}
	keep := c.SharedMountPoints()
	for _, dir := range []string{c.KubeletDir(), stateDir, c.ContainerdStateDir(), c.RuncRoot()} {
		n, err := unmountBelow(dir, keep)
		r.Unmounted += n
		if err != nil {
			return r, err
		}
	}
	// /run is a tmpfs: containerd and runc find their state dirs empty after a reboot.
	for _, dir := range []string{c.ContainerdStateDir(), c.RuncRoot()} {
		if err := emptyDir(dir); err != nil {
			return r, err
		}
	}
	if logf != nil {
		logf("reboot: node down, %d mounts dropped", r.Unmounted)
	}
	if duringOutage != nil {
		if err := duringOutage(); err != nil {
			return r, err
		}
	}
	if err := agents.StartContainerd(ctx); err != nil {
		return r, fmt.Errorf("starting containerd: %w", err)
	}
	r.KubeletStarted, err = agents.StartKubelet(ctx)
	if err != nil {
		return r, fmt.Errorf("starting the kubelet: %w", err)
	}
	if logf != nil {
		logf("reboot: containerd and kubelet started again (node down %s)", r.KubeletStarted.Sub(r.Down).Round(100*time.Millisecond))
	}
	return r, nil
}

// unmountBelow unmounts every mount below dir (and dir itself unless it is in keep), deepest
// first, stacked mounts one by one; a mount that is busy is detached, as a reboot drops it
// whoever uses it. It returns how many it unmounted.
func unmountBelow(dir string, keep []string) (int, error) {
	dir = filepath.Clean(dir)
	count := 0
	for pass := 0; pass < 10; pass++ {
		points, err := mountPointsBelow(dir, keep)
		if err != nil {
			return count, err
		}
		if len(points) == 0 {
			return count, nil
		}
		for _, mp := range points {
			err := unix.Unmount(mp, unix.UMOUNT_NOFOLLOW)
			if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				err = unix.Unmount(mp, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
			}
			if err == nil {
				count++
			}
		}
	}
	left, err := mountPointsBelow(dir, keep)
	if err != nil {
		return count, err
	}
	if len(left) > 0 {
		return count, fmt.Errorf("mounts left below %s after the simulated reboot: %s", dir, strings.Join(left, ", "))
	}
	return count, nil
}

// mountPointsBelow lists the mount points at or below dir that are not in keep, deepest first.
func mountPointsBelow(dir string, keep []string) ([]string, error) {
	all, err := Mounts()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, m := range all {
		mp := m.MountPoint
		if (mp == dir || strings.HasPrefix(mp, dir+"/")) && !slices.Contains(keep, mp) {
			out = append(out, mp)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return strings.Count(out[i], "/") > strings.Count(out[j], "/") })
	return out, nil
}

// emptyDir removes what dir holds (nothing may be mounted below it any more).
func emptyDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// SetKeepWritableLayers upgrades the release with the node plugin keeping writable layers
// across reboots or not (chart values node.writableLayer.keep and .keptGrace; grace is
// ignored when keep is false), every other value kept, and waits until the new plugin pod is
// ready and registered.
func (d *Deployment) SetKeepWritableLayers(ctx context.Context, keep bool, grace string) error {
	if !keep {
		grace = ""
	}
	sets := []string{fmt.Sprintf("node.writableLayer.keep=%t", keep), "node.writableLayer.keptGrace=" + grace}
	d.logf("helm upgrade %s --set %s", Release, strings.Join(sets, ","))
	args := []string{"upgrade", Release, filepath.Join(d.Opts.RepoRoot, chartDir), "--namespace", Namespace, "--reuse-values", "--wait", "--timeout", "5m"}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	if out, err := d.Helm(ctx, args...); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	return d.WaitReady(ctx)
}

// WritableLayerMechanism is what the node plugin picks for writable layers in stateDir with
// --writable-layer-mechanism=auto: project-quota where that filesystem enforces project
// quotas (probed as the plugin probes it), tmpfs elsewhere, and why.
func WritableLayerMechanism(stateDir string) (writablelayer.Mechanism, string, error) {
	m, err := writablelayer.New(filepath.Join(stateDir, "overlays"), writablelayer.Auto)
	if err != nil {
		return "", "", err
	}
	// Only the choice is wanted: the plugin removes its released layers itself.
	defer m.Close()
	return m.Mechanism(), m.Reason(), nil
}
