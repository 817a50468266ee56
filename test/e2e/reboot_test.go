package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/tracer"
)

// Parameters of the node reboot scenario.
const (
	// rebootPodsEnv sets how many pods the scenario's Deployment runs (default 10), or a
	// comma-separated list of sizes, each rebooted APM_CSI_E2E_REBOOTS times (the Deployment
	// is scaled between them); the recovery times of docs/node-plugin.md were measured with
	// "10,30".
	rebootPodsEnv     = "APM_CSI_E2E_REBOOT_PODS"
	defaultRebootPods = 10
	// rebootsEnv sets how many times the node is rebooted (default 1), for measurements.
	rebootsEnv = "APM_CSI_E2E_REBOOTS"
	// keptLayerGrace is node.writableLayer.keptGrace while the scenario keeps writable layers
	// (only where the state dir enforces project quotas).
	keptLayerGrace = "20s"
	// rebootRecoveryTimeout bounds the wait for every pod to come back after a reboot.
	rebootRecoveryTimeout = 8 * time.Minute
	// writtenFile is what a pod writes into its library volume.
	writtenFile = framework.LibraryMountPath + "/written-by-pod"
)

// envCounts reads a comma-separated list of positive numbers from the environment.
func envCounts(t *testing.T, name string, def int) []int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return []int{def}
	}
	var out []int
	for _, part := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(part))
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want positive numbers, separated by commas", name, v)
		}
		out = append(out, n)
	}
	return out
}

// Scenario: the node reboots with N pods of a Deployment (the demo app, instrumented by the
// webhook, loading dd-trace from its CSI volume), a pod that wrote into its volume, and a pod
// force-deleted while the node is down. Before that, a node plugin restart keeps the written
// file. After the reboot every pod comes back Ready with its library served (the tracer loads
// from the volume and its spans arrive), with exactly one mount per volume and the plugin's
// records matching the pods; the force-deleted pod leaves no mount, record or layer dir. The
// written file is gone with tmpfs writable layers (this node, without project quotas), kept
// where the state dir enforces project quotas (then the scenario turns on kept layers).
func scenarioNodeReboot(t *testing.T, ctx context.Context, e *env) {
	reboots := envCounts(t, rebootsEnv, 1)
	if len(reboots) != 1 {
		t.Fatalf("%s: one number", rebootsEnv)
	}
	runNodeReboot(t, ctx, e, envCounts(t, rebootPodsEnv, defaultRebootPods), reboots[0])
}

// rebootFixture is what the reboot scenario runs and checks.
type rebootFixture struct {
	e       *env
	ns      string
	service string
	pods    int
	keep    bool
	// uids of the Deployment's pods, fixed for the whole scenario.
	uids map[types.UID]bool
	// writer is the pod that writes writtenFile.
	writer *corev1.Pod
}

func runNodeReboot(t *testing.T, ctx context.Context, e *env, sizes []int, reboots int) {
	ns := namespace(t, ctx, e, "e2e-reboot", ssiLabels)
	mech, reason, err := framework.WritableLayerMechanism(e.d.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("writable layers on this node: %s (%s)", mech, reason)
	f := &rebootFixture{e: e, ns: ns, service: "e2e-reboot-app", pods: sizes[0], keep: mech == writablelayer.ProjectQuota}
	if f.keep {
		if err := e.d.SetKeepWritableLayers(ctx, true, keptLayerGrace); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := e.d.SetKeepWritableLayers(context.Background(), false, ""); err != nil {
				t.Errorf("turning kept writable layers off again: %v", err)
			}
		})
		t.Logf("project quotas: the node plugin keeps writable layers (grace %s)", keptLayerGrace)
	}

	start := time.Now()
	f.createDeployment(t, ctx)
	measure(t, fmt.Sprintf("%d pods of the Deployment Ready", f.pods), start)
	f.writer = createReady(t, ctx, e, framework.BusyboxPod(ns, "writer", "true"))
	checkInstrumented(t, e, f.writer, e.jsRef)
	f.checkLibraries(t, ctx, time.Time{})
	f.checkMounts(t, ctx)

	// A node plugin restart (its pod deleted, the DaemonSet creates another) keeps every
	// mount, and with it what the pod wrote.
	execIn(t, ctx, e, f.writer, "sh", "-c", "echo before-plugin-restart > "+writtenFile)
	f.restartNodePlugin(t, ctx)
	if got := strings.TrimSpace(execIn(t, ctx, e, f.writer, "cat", writtenFile)); got != "before-plugin-restart" {
		t.Errorf("after a node plugin restart the pod reads %q from %s, want what it wrote", got, writtenFile)
	}
	f.checkMounts(t, ctx)

	round := 0
	for i, size := range sizes {
		if i > 0 {
			f.scale(t, ctx, size)
		}
		for r := 1; r <= reboots; r++ {
			round++
			t.Logf("reboot %d of %d with %d Deployment pods", r, reboots, f.pods)
			execIn(t, ctx, e, f.writer, "sh", "-c", fmt.Sprintf("echo before-reboot-%d > %s", round, writtenFile))
			var doomed *corev1.Pod
			if round == 1 {
				doomed = createReady(t, ctx, e, framework.BusyboxPod(ns, "deleted-while-down", "true"))
			}
			f.reboot(t, ctx, round, doomed)
			f.checkLibraries(t, ctx, time.Now())
			f.checkWrites(t, ctx, round)
			f.checkMounts(t, ctx)
			if doomed != nil {
				f.checkGone(t, ctx, doomed)
			}
		}
	}
	if err := e.d.WaitReady(ctx); err != nil {
		t.Fatalf("apm-csi is not back after the reboot: %v", err)
	}
}

// createDeployment creates the Deployment of the demo app and waits for its pods.
func (f *rebootFixture) createDeployment(t *testing.T, ctx context.Context) {
	t.Helper()
	tmpl := appPod(f.e, f.ns, "web", f.service)
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: "web"},
		Spec: appsv1.DeploymentSpec{
			Replicas: framework.Ptr(int32(f.pods)),
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "web"}}, Spec: tmpl.Spec},
		},
	}
	if _, err := f.e.cs.AppsV1().Deployments(f.ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.waitPods(t, ctx)
}

// scale sets the Deployment's replicas and waits for its pods.
func (f *rebootFixture) scale(t *testing.T, ctx context.Context, pods int) {
	t.Helper()
	start := time.Now()
	s, err := f.e.cs.AppsV1().Deployments(f.ns).GetScale(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Spec.Replicas = int32(pods)
	if _, err := f.e.cs.AppsV1().Deployments(f.ns).UpdateScale(ctx, "web", s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.pods = pods
	f.waitPods(t, ctx)
	measure(t, fmt.Sprintf("Deployment scaled to %d Ready pods", pods), start)
	f.checkMounts(t, ctx)
}

// waitPods waits until the Deployment has f.pods Ready pods (and no other) and records them.
func (f *rebootFixture) waitPods(t *testing.T, ctx context.Context) {
	t.Helper()
	var ready []corev1.Pod
	if err := framework.Poll(ctx, rebootRecoveryTimeout, fmt.Sprintf("%d Ready pods of the Deployment", f.pods), func() (bool, error) {
		l, err := f.e.cs.CoreV1().Pods(f.ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil || len(l.Items) != f.pods {
			return false, nil
		}
		ready, err = f.readyPods(ctx, time.Time{})
		return err == nil && len(ready) == f.pods, nil
	}); err != nil {
		t.Fatal(err)
	}
	f.uids = map[types.UID]bool{}
	for i := range ready {
		checkInstrumented(t, f.e, &ready[i], f.e.jsRef)
		f.uids[ready[i].UID] = true
	}
}

// readyPods lists the Deployment's pods that are Ready with every container started at or
// after since (a container that ran before a reboot does not count, whatever the API still
// says about it).
func (f *rebootFixture) readyPods(ctx context.Context, since time.Time) ([]corev1.Pod, error) {
	l, err := f.e.cs.CoreV1().Pods(f.ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
	if err != nil {
		return nil, err
	}
	var out []corev1.Pod
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil && framework.PodReady(&p) && startedSince(&p, since) {
			out = append(out, p)
		}
	}
	return out, nil
}

// startedSince reports whether every container of the pod runs and was started at or after
// since (the API's times have a resolution of one second).
func startedSince(p *corev1.Pod, since time.Time) bool {
	if len(p.Status.ContainerStatuses) == 0 {
		return false
	}
	for _, s := range p.Status.ContainerStatuses {
		if s.State.Running == nil || s.State.Running.StartedAt.Time.Before(since.Truncate(time.Second)) {
			return false
		}
	}
	return true
}

// restartNodePlugin deletes the node plugin's pod and waits until the DaemonSet's new pod is
// ready and registered.
func (f *rebootFixture) restartNodePlugin(t *testing.T, ctx context.Context) {
	t.Helper()
	old, err := f.e.d.NodePluginPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := f.e.cs.CoreV1().Pods(old.Namespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := framework.WaitPodGone(ctx, f.e.cs, old.Namespace, old.Name, old.UID, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := framework.Poll(ctx, 3*time.Minute, "the DaemonSet's new node plugin pod to be ready", func() (bool, error) {
		p, err := f.e.d.NodePluginPod(ctx)
		return err == nil && p.UID != old.UID && framework.PodReady(p), nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := f.e.d.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	measure(t, "node plugin pod deleted until its replacement is ready", start)
}

// reboot reboots the node, force-deleting doomed (if any) while it is down, and waits until
// every pod is Ready again, logging the recovery times.
func (f *rebootFixture) reboot(t *testing.T, ctx context.Context, round int, doomed *corev1.Pod) {
	t.Helper()
	loadBefore := loadAverage()
	r, err := framework.SimulateReboot(ctx, f.e.c, f.e.d.StateDir, t.Logf, func() error {
		if doomed == nil {
			return nil
		}
		// kubectl delete --force --grace-period=0: the pod object goes at once, the node
		// learns of it only when its kubelet is back.
		if err := f.e.cs.CoreV1().Pods(f.ns).Delete(ctx, doomed.Name, metav1.DeleteOptions{GracePeriodSeconds: framework.Ptr[int64](0)}); err != nil {
			return fmt.Errorf("force-deleting %s: %w", doomed.Name, err)
		}
		if _, err := f.e.cs.CoreV1().Pods(f.ns).Get(ctx, doomed.Name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			return fmt.Errorf("%s still exists after a forced delete (%v)", doomed.Name, err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("simulated reboot: %v", err)
	}
	t0 := r.KubeletStarted
	var firstReady, allReady, allMounted time.Duration
	var last int
	if err := framework.Poll(ctx, rebootRecoveryTimeout, fmt.Sprintf("the %d Deployment pods Ready again after the reboot", f.pods), func() (bool, error) {
		if allMounted == 0 {
			if all, err := framework.Mounts(); err == nil {
				mounted := 0
				for uid := range f.uids {
					if len(framework.MountsAt(all, framework.CSIMountDir(f.e.c.KubeletDir(), uid, framework.LibraryVolumeName))) > 0 {
						mounted++
					}
				}
				if mounted == len(f.uids) {
					allMounted = time.Since(t0)
				}
			}
		}
		ready, err := f.readyPods(ctx, t0)
		if err != nil {
			return false, nil
		}
		last = len(ready)
		if len(ready) > 0 && firstReady == 0 {
			firstReady = time.Since(t0)
		}
		if len(ready) < f.pods {
			return false, nil
		}
		allReady = time.Since(t0)
		return true, nil
	}); err != nil {
		t.Fatalf("%v (%d of %d Ready)", err, last, f.pods)
	}
	registered := f.pluginRegisteredAfter(t, ctx, t0)
	t.Logf("MEASURE reboot %d, %d pods: first pod Ready %s, all pods Ready %s, node plugin registered %s, every volume mounted again %s after kubelet start; node down %s, %d mounts dropped; load average before %s, after %s",
		round, f.pods, firstReady.Round(100*time.Millisecond), allReady.Round(100*time.Millisecond), registered.Round(100*time.Millisecond), allMounted.Round(100*time.Millisecond),
		t0.Sub(r.Down).Round(100*time.Millisecond), r.Unmounted, loadBefore, loadAverage())

	// The same pods come back: a reboot replaces no pod.
	ready, err := f.readyPods(ctx, t0)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ready {
		if !f.uids[p.UID] {
			t.Errorf("pod %s (%s) is not one of the Deployment's pods from before the reboot", p.Name, p.UID)
		}
	}
	if _, err := framework.WaitPodReady(ctx, f.e.cs, f.ns, f.writer.Name, podTimeout); err != nil {
		t.Fatal(err)
	}
	if err := f.e.d.WaitReady(ctx); err != nil {
		t.Fatalf("apm-csi is not back after the reboot: %v", err)
	}
}

// pluginRegisteredAfter returns how long after t0 the running node plugin logged its
// registration with kubelet.
func (f *rebootFixture) pluginRegisteredAfter(t *testing.T, ctx context.Context, t0 time.Time) time.Duration {
	t.Helper()
	var at time.Time
	var mechanismLine string
	defer func() { t.Logf("node plugin after the reboot: %s", mechanismLine) }()
	if err := framework.Poll(ctx, 2*time.Minute, "the restarted node plugin to log its registration with kubelet", func() (bool, error) {
		p, err := f.e.d.NodePluginPod(ctx)
		if err != nil {
			return false, nil
		}
		for _, line := range strings.Split(f.e.d.Logs(ctx, p.Namespace, p.Name, framework.NodeContainer, 100000, false), "\n") {
			var entry struct {
				Time time.Time `json:"time"`
				Msg  string    `json:"msg"`
			}
			if json.Unmarshal([]byte(line), &entry) != nil || entry.Time.Before(t0) {
				continue
			}
			if entry.Msg == "writable layers of library volumes" && mechanismLine == "" {
				mechanismLine = line
			}
			if entry.Msg == "registered with kubelet" {
				at = entry.Time
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		t.Fatal(err)
	}
	return at.Sub(t0)
}

// checkLibraries checks that every Deployment pod's app loaded dd-trace from its CSI volume
// and, after a reboot (since not zero), that one pod's spans sent after since arrive.
func (f *rebootFixture) checkLibraries(t *testing.T, ctx context.Context, since time.Time) {
	t.Helper()
	pods, err := f.readyPods(ctx, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if len(pods) != f.pods {
		t.Fatalf("%d Ready pods of the Deployment, want %d", len(pods), f.pods)
	}
	wantFrom := framework.LibraryMountPath + "/node_modules/dd-trace"
	for i := range pods {
		var info tracerInfo
		if err := getJSON(ctx, &pods[i], "/tracer", &info); err != nil {
			t.Fatalf("pod %s: %v", pods[i].Name, err)
		}
		if !info.Loaded || info.From != wantFrom || info.Version != tracer.DDTraceVersion {
			t.Errorf("pod %s did not load dd-trace %s from %s: %+v", pods[i].Name, tracer.DDTraceVersion, wantFrom, info)
		}
	}
	execIn(t, ctx, f.e, f.writer, "test", "-f", ddTracePackageJSON)
	if since.IsZero() {
		return
	}
	p := &pods[0]
	for range 3 {
		if err := getJSON(ctx, p, "/", nil); err != nil {
			t.Fatal(err)
		}
	}
	waitCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	if _, err := f.e.intake.WaitForSpans(waitCtx, func(s tracer.Span) bool {
		return s.Service == f.service && s.Meta["span.kind"] == "server" && strings.HasSuffix(s.Meta["http.url"], ":8080/") &&
			s.Start >= since.Add(-time.Second).UnixNano()
	}); err != nil {
		t.Fatalf("spans of %s (pod %s) after the reboot: %v", f.service, p.Name, err)
	}
}

// checkWrites checks what became of the file the writer pod wrote before reboot round: gone
// with tmpfs layers, kept with kept project-quota layers; the library is there either way.
func (f *rebootFixture) checkWrites(t *testing.T, ctx context.Context, round int) {
	t.Helper()
	writer, err := f.e.cs.CoreV1().Pods(f.ns).Get(ctx, f.writer.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	execIn(t, ctx, f.e, writer, "test", "-f", ddTracePackageJSON)
	out, err := framework.Exec(ctx, f.e.c, f.ns, writer.Name, "", "cat", writtenFile)
	if f.keep {
		if want := fmt.Sprintf("before-reboot-%d", round); err != nil || strings.TrimSpace(out) != want {
			t.Errorf("with kept writable layers the pod reads %q (%v) from %s after the reboot, want %q", out, err, writtenFile, want)
		}
		return
	}
	if err == nil {
		t.Errorf("with tmpfs writable layers %s survived the reboot (%q): the node lost its memory, the layer cannot have", writtenFile, out)
	} else {
		t.Logf("tmpfs writable layers: %s is gone after the reboot, the library is there", writtenFile)
	}
}

// checkMounts compares the node's mount table and the node plugin's records with the pods:
// each pod of the scenario has exactly one mount at its volume's target and nothing else of
// apm-csi below its pod dir; every apm-csi mount, overlay, writable layer and record belongs
// to a pod that exists; there is one record per mounted target. Other scenarios' pods may
// still be going away, so it waits (up to two minutes) for the node to settle.
func (f *rebootFixture) checkMounts(t *testing.T, ctx context.Context) {
	t.Helper()
	kubeletDir := f.e.c.KubeletDir()
	podsDir := filepath.Join(kubeletDir, "pods") + "/"
	overlays := filepath.Join(f.e.d.StateDir, "overlays")
	var problems []string
	err := framework.Poll(ctx, 2*time.Minute, "the mounts and records to match the pods", func() (bool, error) {
		problems = nil
		all, err := framework.Mounts()
		if err != nil {
			return false, err
		}
		records, err := state.Read(f.e.d.StateDir)
		if err != nil {
			return false, err
		}
		live, err := f.e.cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, nil
		}
		alive := map[string]bool{}
		var mine []corev1.Pod
		for _, p := range live.Items {
			alive[string(p.UID)] = true
			if p.Namespace == f.ns && p.DeletionTimestamp == nil {
				mine = append(mine, p)
			}
		}
		podOf := func(path string) string {
			uid, _, _ := strings.Cut(strings.TrimPrefix(path, podsDir), "/")
			return uid
		}
		csi := framework.CSIMountsUnder(all, kubeletDir)
		perPod := map[string]int{}
		targets := map[string]int{}
		for _, m := range csi {
			perPod[podOf(m.MountPoint)]++
			targets[m.MountPoint]++
			if !alive[podOf(m.MountPoint)] {
				problems = append(problems, "mount of a pod that does not exist: "+m.MountPoint)
			}
		}
		for _, p := range mine {
			target := framework.CSIMountDir(kubeletDir, p.UID, framework.LibraryVolumeName)
			if n := targets[target]; n != 1 {
				problems = append(problems, fmt.Sprintf("pod %s: %d mounts at %s, want 1", p.Name, n, target))
			}
			if n := perPod[string(p.UID)]; n != 1 {
				problems = append(problems, fmt.Sprintf("pod %s: %d apm-csi mounts below its pod dir, want 1", p.Name, n))
			}
		}
		// Each writable overlay's upper dir is in a layer dir of its own; with tmpfs layers that
		// dir is a tmpfs mount, one per writable overlay and no other.
		layers := map[string]bool{}
		for _, m := range framework.MountsWithOptionUnder(all, f.e.d.StateDir) {
			if targets[m.MountPoint] == 0 {
				problems = append(problems, "overlay outside a pod's volume target: "+m.MountPoint)
			}
			if upper, ok := m.Option("upperdir"); ok {
				layers[filepath.Dir(upper)] = true
			}
		}
		var tmpfsLayers []string
		for _, m := range all {
			if m.FSType == "tmpfs" && strings.HasPrefix(m.MountPoint, overlays+"/") {
				tmpfsLayers = append(tmpfsLayers, m.MountPoint)
				if !layers[m.MountPoint] {
					problems = append(problems, "tmpfs writable layer no overlay uses: "+m.MountPoint)
				}
			}
		}
		if !f.keep {
			for l := range layers {
				if !slices.Contains(tmpfsLayers, l) {
					problems = append(problems, "writable overlay whose layer is not a tmpfs: "+l)
				}
			}
			if len(tmpfsLayers) != len(layers) {
				problems = append(problems, fmt.Sprintf("%d tmpfs layer mounts for %d writable overlays", len(tmpfsLayers), len(layers)))
			}
		}
		// Records: one per mounted target, none for a pod that does not exist, and every
		// layer dir in the state dir is a record's.
		recorded := map[string]int{}
		owned := map[string]bool{}
		for _, r := range records {
			recorded[r.TargetPath]++
			if r.OverlayDir != "" {
				owned[r.OverlayDir] = true
			}
			if !alive[podOf(r.TargetPath)] && !f.keep {
				problems = append(problems, fmt.Sprintf("record of volume %s of a pod that does not exist (%s)", r.VolumeID, r.TargetPath))
			}
		}
		for target, n := range targets {
			if n > 1 {
				problems = append(problems, fmt.Sprintf("%d mounts stacked at %s", n, target))
			}
			if recorded[target] != 1 {
				problems = append(problems, fmt.Sprintf("%d records for the mounted target %s, want 1", recorded[target], target))
			}
		}
		if !f.keep {
			for target := range recorded {
				if targets[target] == 0 {
					problems = append(problems, "record of a target that is not mounted: "+target)
				}
			}
		}
		dirs, err := framework.Entries(overlays)
		if err != nil {
			return false, err
		}
		for _, d := range dirs {
			if !owned[filepath.Join(overlays, d)] {
				problems = append(problems, "layer dir no record owns: "+filepath.Join(overlays, d))
			}
		}
		sort.Strings(problems)
		return len(problems) == 0, nil
	})
	if err != nil {
		t.Fatalf("%v:\n%s", err, strings.Join(problems, "\n"))
	}
	all, _ := framework.Mounts()
	t.Logf("node settled: %d apm-csi mounts below the pods dir, %d overlays on the state dir", len(framework.CSIMountsUnder(all, kubeletDir)), len(framework.MountsWithOptionUnder(all, f.e.d.StateDir)))
}

// checkGone checks that a pod force-deleted while the node was down leaves nothing once the
// kubelet is back: kubelet removes its pod dir, and no mount, record or layer dir of it is
// left (with kept layers: once the grace period has passed).
func (f *rebootFixture) checkGone(t *testing.T, ctx context.Context, p *corev1.Pod) {
	t.Helper()
	podDir := filepath.Join(f.e.c.KubeletDir(), "pods", string(p.UID))
	timeout := 3 * time.Minute
	if f.keep {
		timeout += 3 * time.Minute // the grace period plus the GC interval
	}
	var left []string
	if err := framework.Poll(ctx, timeout, "the force-deleted pod "+p.Name+" to leave nothing on the node", func() (bool, error) {
		left = nil
		if _, err := os.Lstat(podDir); err == nil {
			left = append(left, "pod dir "+podDir)
		}
		all, err := framework.Mounts()
		if err != nil {
			return false, err
		}
		for _, m := range all {
			if strings.HasPrefix(m.MountPoint, podDir+"/") {
				left = append(left, "mount "+m.MountPoint)
			}
		}
		records, err := state.Read(f.e.d.StateDir)
		if err != nil {
			return false, err
		}
		for _, r := range records {
			if strings.HasPrefix(r.TargetPath, podDir+"/") {
				left = append(left, "record of volume "+r.VolumeID)
				if r.OverlayDir != "" {
					if _, err := os.Lstat(r.OverlayDir); err == nil {
						left = append(left, "layer dir "+r.OverlayDir)
					}
				}
			}
		}
		return len(left) == 0, nil
	}); err != nil {
		t.Fatalf("%v; left: %s", err, strings.Join(left, ", "))
	}
	// Layer dirs without a record are caught by checkMounts.
	f.checkMounts(t, ctx)
}

// loadAverage is the 1, 5 and 15 minute load averages of this machine.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	fs := strings.Fields(string(b))
	if len(fs) < 3 {
		return "unknown"
	}
	return strings.Join(fs[:3], " ")
}
