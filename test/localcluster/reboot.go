package localcluster

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// NodeAgents is the node's kubelet and containerd as they were started, so that a test can
// stop them (with every container) and start them again with the same command lines, as a
// node reboot does. The control plane (etcd, API server, controller-manager, scheduler) and
// kube-proxy are left alone: they stand for the rest of the cluster.
type NodeAgents struct {
	c          *Cluster
	kubelet    *processRecord
	containerd *processRecord
}

// StopNodeAgents stops the kubelet, then containerd, then kills what still runs of the
// containers (runc kill and delete under the cluster's runc root) and their shims: after it
// no pod process is left, as after a power cut. Mounts are left as they are; the caller
// drops what a reboot drops (see ContainerdStateDir, RuncRoot).
func (c *Cluster) StopNodeAgents(ctx context.Context) (*NodeAgents, error) {
	o := c.opts
	n := &NodeAgents{c: c}
	var err error
	if n.kubelet, err = o.readProcessRecord(compKubelet); err != nil {
		return nil, fmt.Errorf("no kubelet recorded under %s: %w", o.Root, err)
	}
	if n.containerd, err = o.readProcessRecord(compContainerd); err != nil {
		return nil, fmt.Errorf("no containerd recorded under %s: %w", o.Root, err)
	}
	if len(n.kubelet.Args) == 0 || len(n.containerd.Args) == 0 {
		return nil, errors.New("the recorded kubelet or containerd command line is empty")
	}
	if err := o.stopProcess(compKubelet, stopGrace(compKubelet)); err != nil {
		return nil, err
	}
	if err := o.stopProcess(compContainerd, stopGrace(compContainerd)); err != nil {
		return nil, err
	}
	if err := o.killLeftoverContainers(ctx); err != nil {
		return nil, fmt.Errorf("killing the containers: %w", err)
	}
	return n, nil
}

// StartContainerd starts containerd again with its recorded command line and waits until it
// answers.
func (n *NodeAgents) StartContainerd(ctx context.Context) error {
	o := n.c.opts
	_ = os.Rename(o.LogPath(compContainerd), o.LogPath(compContainerd+".previous"))
	env := append(os.Environ(), "PATH="+o.BinDir+":"+os.Getenv("PATH"))
	if _, err := o.startProcessEnv(compContainerd, n.containerd.Args[0], env, n.containerd.Args[1:]...); err != nil {
		return err
	}
	return o.waitComponent(ctx, compContainerd, func(ctx context.Context) (bool, error) {
		_, err := o.ctr(ctx, "version")
		return err == nil, nil
	})
}

// StartKubelet starts the kubelet again with its recorded command line and returns when it
// was started; it then waits until its health endpoint answers.
func (n *NodeAgents) StartKubelet(ctx context.Context) (time.Time, error) {
	o := n.c.opts
	_ = os.Rename(o.LogPath(compKubelet), o.LogPath(compKubelet+".previous"))
	started := time.Now()
	if _, err := o.startProcess(compKubelet, n.kubelet.Args[0], n.kubelet.Args[1:]...); err != nil {
		return started, err
	}
	client := &http.Client{Timeout: 2 * time.Second}
	return started, o.waitComponent(ctx, compKubelet, func(ctx context.Context) (bool, error) {
		resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", kubeletHealthzPort))
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
}

// ContainerdStateDir is containerd's state dir (/run/containerd on a real node: a tmpfs a
// reboot empties). The task root filesystems and the sandboxes' network namespaces are
// mounted below it.
func (c *Cluster) ContainerdStateDir() string { return c.opts.containerdState() }

// RuncRoot is runc's state dir (/run/runc on a real node).
func (c *Cluster) RuncRoot() string { return c.opts.runcRoot() }

// SharedMountPoints are the directories Up bind-mounts onto themselves with shared
// propagation (the kubelet dir, the hostPath root): they stand for the node's root filesystem,
// which systemd makes shared at every boot, so a simulated reboot keeps them.
func (c *Cluster) SharedMountPoints() []string {
	return []string{filepath.Clean(c.opts.KubeletDir), filepath.Clean(c.opts.hostPathRoot())}
}
