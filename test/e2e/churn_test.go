package e2e

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/test/e2e/framework"
)

// killNodePlugin SIGKILLs the node plugin's container through containerd (kubelet restarts it)
// and returns the container's restart count before.
func killNodePlugin(t *testing.T, ctx context.Context, e *env) int32 {
	t.Helper()
	p, err := e.d.NodePluginPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range p.Status.ContainerStatuses {
		if s.Name != framework.NodeContainer {
			continue
		}
		id, ok := strings.CutPrefix(s.ContainerID, "containerd://")
		if !ok {
			t.Fatalf("node plugin container id %q", s.ContainerID)
		}
		cmd := exec.CommandContext(ctx, filepath.Join(e.c.BinDir(), "ctr"), "--address", e.c.ContainerdAddress(), "--namespace", "k8s.io", "tasks", "kill", "--signal", "SIGKILL", id)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("ctr tasks kill: %v\n%s", err, out)
		}
		return s.RestartCount
	}
	t.Fatalf("no %s container in %s", framework.NodeContainer, p.Name)
	return 0
}

// Pods are created and deleted while the node plugin is SIGKILLed (kubelet
// restarts its container) and then its pod force-deleted (the DaemonSet creates another).
// Every pod ends as asked (Ready, or gone), and once every pod is deleted no mount, upper dir,
// volume record or unreferenced library is left on the node.
func scenarioChurn(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-churn", ssiLabels)
	type churned struct {
		name string
		uid  types.UID
		keep bool
	}
	var all []churned
	create := func(from, to int) {
		for i := from; i < to; i++ {
			name := fmt.Sprintf("churn-%02d", i)
			p, err := framework.CreatePod(ctx, e.cs, framework.BusyboxPod(ns, name, "true"))
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, churned{name: name, uid: p.UID, keep: i%2 == 0})
		}
	}
	deleteOdd := func() {
		for _, c := range all {
			if !c.keep {
				err := e.cs.CoreV1().Pods(ns).Delete(ctx, c.name, metav1.DeleteOptions{GracePeriodSeconds: framework.Ptr[int64](1)})
				if err != nil && !apierrors.IsNotFound(err) {
					t.Fatal(err)
				}
			}
		}
	}

	create(0, 4)
	// Kill the plugin once the first volume is mounted, so that it lands among publishes.
	if err := framework.Poll(ctx, podTimeout, "a first churn pod's volume to be mounted", func() (bool, error) {
		mounts, err := framework.Mounts()
		return err == nil && len(framework.CSIMountsUnder(mounts, e.c.KubeletDir())) > 0, nil
	}); err != nil {
		t.Fatal(err)
	}
	old, err := e.d.NodePluginPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	restarts := killNodePlugin(t, ctx, e)
	deleteOdd()
	create(4, 8)
	if err := framework.Poll(ctx, 2*time.Minute, "kubelet to restart the killed node plugin container", func() (bool, error) {
		p, err := e.cs.CoreV1().Pods(old.Namespace).Get(ctx, old.Name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		for _, s := range p.Status.ContainerStatuses {
			if s.Name == framework.NodeContainer && s.RestartCount > restarts {
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		t.Fatal(err)
	}
	// Now the pod: force-deleted, the DaemonSet creates another while its containers stop.
	if err := e.cs.CoreV1().Pods(old.Namespace).Delete(ctx, old.Name, metav1.DeleteOptions{GracePeriodSeconds: framework.Ptr[int64](0)}); err != nil {
		t.Fatal(err)
	}
	deleteOdd()
	create(8, 12)
	deleteOdd()

	for _, c := range all {
		if c.keep {
			p, err := framework.WaitPodReady(ctx, e.cs, ns, c.name, 4*time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			checkInstrumented(t, e, p, e.jsRef)
			oneMount(t, e, p, framework.LibraryVolumeName)
			execIn(t, ctx, e, p, "test", "-f", ddTracePackageJSON)
		} else if err := framework.WaitPodGone(ctx, e.cs, ns, c.name, c.uid, 4*time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.d.WaitReady(ctx); err != nil {
		t.Fatalf("the node plugin did not come back: %v", err)
	}
	if p, err := e.d.NodePluginPod(ctx); err != nil || p.UID == old.UID {
		t.Errorf("the DaemonSet did not replace the deleted node plugin pod (%v)", err)
	}

	// Delete every pod: this scenario's, and (by deleting their namespaces) every other
	// scenario's that is still terminating.
	for _, c := range all {
		if c.keep {
			if err := framework.DeletePod(ctx, e.cs, ns, c.name); err != nil {
				t.Fatal(err)
			}
		}
	}
	nss, err := e.cs.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nss.Items {
		if strings.HasPrefix(n.Name, "e2e-") {
			if err := framework.DeleteNamespace(ctx, e.cs, n.Name); err != nil {
				t.Fatal(err)
			}
		}
	}
	pods, err := e.cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range pods.Items {
		if vols, _ := framework.CSIVolumes(ctx, e.cs, &pods.Items[i]); len(vols) > 0 {
			t.Fatalf("pod %s/%s still uses apm-csi volumes %v", pods.Items[i].Namespace, pods.Items[i].Name, vols)
		}
	}

	checkNoLeftovers(t, ctx, e)
}

// libraryGCTimeout bounds the wait for the library cache's GC to remove unused libraries:
// the grace period plus the GC interval, with margin.
const libraryGCTimeout = 4 * time.Minute

// checkNoLeftovers checks the node once no pod uses an apm-csi volume: no apm-csi mount below
// kubelet's pods dir, no overlay using the plugin's state, no per-volume upper/work dir (in
// the overlays dir or set aside for removal) or record, and (once the GC grace period has passed) no library in the cache.
func checkNoLeftovers(t *testing.T, ctx context.Context, e *env) {
	t.Helper()
	overlays := filepath.Join(e.d.StateDir, "overlays")
	var last string
	if err := framework.Poll(ctx, 2*time.Minute, "volumes to be unpublished and cleaned up", func() (bool, error) {
		all, err := framework.Mounts()
		if err != nil {
			return false, err
		}
		var left []string
		for _, m := range framework.CSIMountsUnder(all, e.c.KubeletDir()) {
			left = append(left, "mount "+m.MountPoint)
		}
		for _, m := range framework.MountsWithOptionUnder(all, e.d.StateDir) {
			left = append(left, "overlay "+m.MountPoint)
		}
		// Released layers are set aside in <overlays>-removing/{a,b} and removed in the
		// background: they must be gone too.
		for _, dir := range []string{overlays, overlays + "-removing/a", overlays + "-removing/b"} {
			names, err := framework.Entries(dir)
			if err != nil {
				return false, err
			}
			for _, n := range names {
				left = append(left, filepath.Join(dir, n))
			}
		}
		records, err := state.Read(e.d.StateDir)
		if err != nil {
			return false, err
		}
		for _, r := range records {
			left = append(left, "record of "+r.VolumeID+" at "+r.TargetPath)
		}
		last = strings.Join(left, "\n")
		return len(left) == 0, nil
	}); err != nil {
		t.Fatalf("%v; left:\n%s", err, last)
	}

	store := filepath.Join(e.d.StateDir, "store")
	if err := framework.Poll(ctx, libraryGCTimeout, "the library cache to drop every unused library", func() (bool, error) {
		var left []string
		for _, kind := range []string{"images", "views", "generated"} {
			names, err := framework.Entries(filepath.Join(store, kind))
			if err != nil {
				return false, err
			}
			for _, n := range names {
				left = append(left, kind+"/"+n)
			}
		}
		last = strings.Join(left, " ")
		return len(left) == 0, nil
	}); err != nil {
		t.Fatalf("%v; left in %s: %s", err, store, last)
	}
}
