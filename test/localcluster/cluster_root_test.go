package localcluster

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/apm-csi/apm-csi/test/testenv"
)

// assertTornDown checks that nothing of the cluster is left: no mounts under the root or the
// kubelet dir, no bridge, no running component, no iptables chain beyond those before.
func assertTornDown(t *testing.T, o Options, chainsBefore []string) {
	t.Helper()
	for _, dir := range []string{o.Root, o.KubeletDir} {
		if left, err := mountsUnder(dir); err != nil || len(left) > 0 {
			t.Errorf("mounts left under %s: %v (%v)", dir, left, err)
		}
	}
	if _, err := net.InterfaceByName(o.BridgeName); err == nil {
		t.Errorf("bridge %s left", o.BridgeName)
	}
	for _, comp := range o.recordedComponents() {
		if rec, err := o.readProcessRecord(comp); err == nil && rec.alive() {
			t.Errorf("%s still running", comp)
		}
	}
	chains, err := managedChains(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(chains, ",") != strings.Join(chainsBefore, ",") {
		t.Errorf("iptables chains after down %v, before up %v", chains, chainsBefore)
	}
}

// TestUpReportsTheFailingComponent runs Up with a kube-apiserver that exits at once: Up must
// fail with the component's name and the tail of its log, and leave nothing behind.
func TestUpReportsTheFailingComponent(t *testing.T) {
	testenv.RequireRoot(t)
	ctx := context.Background()
	real := Options{Logf: t.Logf}
	if err := real.resolveBinaries(ctx); err != nil {
		t.Fatal(err)
	}
	binDir := t.TempDir()
	for _, b := range kubeBinaries {
		if err := os.Symlink(filepath.Join(real.BinDir, b), filepath.Join(binDir, b)); err != nil {
			t.Fatal(err)
		}
	}
	apiserver := filepath.Join(binDir, "kube-apiserver")
	if err := os.Remove(apiserver); err != nil {
		t.Fatal(err)
	}
	script := "#!/bin/sh\necho 'fake kube-apiserver: refusing to start' >&2\nexit 1\n"
	if err := os.WriteFile(apiserver, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}

	opts := Options{BinDir: binDir, KubeProxy: real.KubeProxy, RepoRoot: real.RepoRoot, Logf: t.Logf}
	chainsBefore, err := managedChains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Up(ctx, opts)
	if err == nil {
		_ = c.Down(ctx)
		t.Fatal("Up succeeded with an API server that cannot start")
	}
	for _, want := range []string{"kube-apiserver", "process exited", "fake kube-apiserver: refusing to start"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Up error lacks %q:\n%v", want, err)
		}
	}
	o, _ := opts.complete()
	assertTornDown(t, o, chainsBefore)
	if _, err := os.Stat(o.LogPath(compAPIServer)); err != nil {
		t.Errorf("the failing component's log was not kept: %v", err)
	}
}

// TestUpRefusesARunningClusterAndRecoversACrashedOne: a healthy cluster makes a second Up
// fail with ErrRunning; once components crash, Up cleans the remains and starts afresh.
func TestUpRefusesARunningClusterAndRecoversACrashedOne(t *testing.T) {
	testenv.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	opts := Options{Logf: t.Logf}
	chainsBefore, err := managedChains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Up(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Down(context.Background(), opts) })

	if _, err := Up(ctx, opts); !errors.Is(err, ErrRunning) {
		t.Fatalf("second Up on a healthy cluster: %v, want ErrRunning", err)
	}
	if !c.Healthy(ctx) {
		t.Fatal("the refused second Up disturbed the running cluster")
	}

	// Crash the control plane as a killed test process or a reboot of a component would.
	for _, comp := range []string{compAPIServer, compEtcd} {
		rec, err := c.opts.readProcessRecord(comp)
		if err != nil {
			t.Fatal(err)
		}
		if err := syscall.Kill(rec.PID, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		waitExit(rec, 10*time.Second)
	}
	if c.Healthy(ctx) {
		t.Fatal("cluster still healthy without API server and etcd")
	}
	c2, err := Up(ctx, opts)
	if err != nil {
		t.Fatalf("Up over a crashed run: %v", err)
	}
	cs, err := c2.Clientset()
	if err != nil {
		t.Fatal(err)
	}
	node, err := cs.CoreV1().Nodes().Get(ctx, c2.NodeName(), metav1.GetOptions{})
	if err != nil || !nodeReady(node) {
		t.Fatalf("node after recovery: %v (ready=%v)", err, err == nil && nodeReady(node))
	}
	for _, dir := range []string{c2.KubeletDir(), c2.opts.hostPathRoot()} {
		shared, err := isSharedMount(dir)
		if err != nil || !shared {
			t.Errorf("%s not a shared mount after recovery (%v)", dir, err)
		}
	}
	if err := c2.Down(ctx); err != nil {
		t.Fatal(err)
	}
	assertTornDown(t, c2.opts, chainsBefore)
}
