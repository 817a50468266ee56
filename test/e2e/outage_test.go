package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/webhook/annotations"
)

// stopWebhook scales the webhook to zero replicas and returns the function that scales it
// back to one and waits until it serves; if the test ends before that, a cleanup brings it back.
func stopWebhook(t *testing.T, ctx context.Context, e *env) (restart func()) {
	t.Helper()
	restored := false
	t.Cleanup(func() {
		if !restored {
			_ = e.d.ScaleWebhook(context.Background(), 1)
			_ = e.d.WaitWebhookServing(context.Background())
		}
	})
	if err := e.d.ScaleWebhook(ctx, 0); err != nil {
		t.Fatal(err)
	}
	return func() {
		t.Helper()
		if err := e.d.ScaleWebhook(ctx, 1); err != nil {
			t.Fatal(err)
		}
		if err := e.d.WaitWebhookServing(ctx); err != nil {
			t.Fatal(err)
		}
		restored = true
	}
}

// With the webhook scaled to zero, pods are created (failurePolicy Ignore)
// without instrumentation; once it is back, new pods and re-created ones are instrumented.
func scenarioWebhookDown(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-webhook-down", ssiLabels)
	restartWebhook := stopWebhook(t, ctx, e)
	spec := func(name string) *corev1.Pod { return framework.BusyboxPod(ns, name, "true") }
	down := createReady(t, ctx, e, spec("created-while-down"))
	if framework.LibraryVolume(down) != nil || down.Annotations[annotations.InjectionStatus] != "" {
		t.Errorf("a pod created while the webhook was down was mutated: %+v", down.Spec.Volumes)
	}

	restartWebhook()
	after := createReady(t, ctx, e, spec("created-after"))
	checkInstrumented(t, e, after, e.jsRef)
	execIn(t, ctx, e, after, "test", "-f", ddTracePackageJSON)

	if err := framework.DeletePod(ctx, e.cs, ns, down.Name); err != nil {
		t.Fatal(err)
	}
	again := createReady(t, ctx, e, spec("created-while-down"))
	checkInstrumented(t, e, again, e.jsRef)
	execIn(t, ctx, e, again, "test", "-f", ddTracePackageJSON)
}

// With the library registry stopped, a pod using the cached library starts; a pod
// needing an uncached version waits (kubelet retries the non-final Unavailable) and starts
// once the registry is back.
func scenarioRegistryDown(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-registry", ssiLabels)
	createReady(t, ctx, e, framework.BusyboxPod(ns, "before-outage", "true"))
	if err := e.reg.Stop(); err != nil {
		t.Fatal(err)
	}
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			_ = e.reg.Start()
		}
	})

	cached := createReady(t, ctx, e, framework.BusyboxPod(ns, "during-outage", "true"))
	checkInstrumented(t, e, cached, e.jsRef)
	execIn(t, ctx, e, cached, "test", "-f", ddTracePackageJSON)

	u := framework.BusyboxPod(ns, "uncached", "true")
	u.Annotations = map[string]string{annotations.DatadogVersion("js"): uncachedTag}
	admitted, err := framework.CreatePod(ctx, e.cs, u)
	if err != nil {
		t.Fatal(err)
	}
	uncachedRef := e.reg.Repo(e.repo) + ":" + uncachedTag
	checkInstrumented(t, e, admitted, uncachedRef)
	failed := waitFailedMount(t, ctx, e, ns, u.Name, "the failed mount of the uncached library")
	t.Logf("while the registry is down: %s", failed)
	if !strings.Contains(failed, "Unavailable") {
		t.Errorf("the failed mount is not reported as Unavailable (which kubelet retries): %s", failed)
	}
	if p, err := e.cs.CoreV1().Pods(ns).Get(ctx, u.Name, metav1.GetOptions{}); err != nil || framework.PodReady(p) {
		t.Fatalf("the pod needing an uncached library is Ready while the registry is down (%v)", err)
	}

	if err := e.reg.Start(); err != nil {
		t.Fatal(err)
	}
	restarted = true
	ready, err := framework.WaitPodReady(ctx, e.cs, ns, u.Name, 4*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(execIn(t, ctx, e, ready, "cat", framework.LibraryMountPath+"/version")); got != uncachedTag {
		t.Errorf("the uncached library's version file reads %q, want %s", got, uncachedTag)
	}
}

// csiCall is one "csi call" log record of the node plugin.
type csiCall struct {
	Time   time.Time `json:"time"`
	Msg    string    `json:"msg"`
	Method string    `json:"method"`
	Code   string    `json:"code"`
	Target string    `json:"targetPath"`
}

// publishCalls returns the NodePublishVolume calls the node plugin logged since a time.
func publishCalls(ctx context.Context, e *env, since time.Time) ([]csiCall, error) {
	p, err := e.d.NodePluginPod(ctx)
	if err != nil {
		return nil, err
	}
	st := metav1.NewTime(since.Add(-time.Second))
	rc, err := e.cs.CoreV1().Pods(p.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: framework.NodeContainer, SinceTime: &st}).Stream(ctx)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	var out []csiCall
	sc := bufio.NewScanner(rc)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var c csiCall
		if json.Unmarshal(sc.Bytes(), &c) == nil && c.Msg == "csi call" && strings.HasSuffix(c.Method, "/NodePublishVolume") && !c.Time.Before(since) {
			out = append(out, c)
		}
	}
	return out, sc.Err()
}

// Kubelet restarts with instrumented pods running; it reconstructs their volumes
// and publishes them again, and each pod still has exactly one mount per volume.
func scenarioKubeletRestart(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-kubelet", ssiLabels)
	var pods []*corev1.Pod
	for _, name := range []string{"running-1", "running-2"} {
		pods = append(pods, createReady(t, ctx, e, framework.BusyboxPod(ns, name, "true")))
	}
	// Two apm-csi volumes in one pod: the library overlay and a hostdir bind mount.
	pods = append(pods, createReady(t, ctx, e, hostDirPod(ns, "two-volumes")))
	type target struct {
		pod    *corev1.Pod
		volume string
		dir    string
	}
	var targets []target
	for _, p := range pods {
		vols, err := framework.CSIVolumes(ctx, e.cs, p)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range vols {
			oneMount(t, e, p, v)
			targets = append(targets, target{p, v, framework.CSIMountDir(e.c.KubeletDir(), p.UID, v)})
		}
	}
	if len(targets) != 4 {
		t.Fatalf("%d apm-csi volumes in the pods, want 4", len(targets))
	}

	restart := time.Now()
	if err := e.c.RestartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("kubelet restarted in %s", time.Since(restart).Round(100*time.Millisecond))
	// kubelet reconstructs the mounted volumes and calls NodePublishVolume on each again:
	// that repeated publish is what must not mount a second time.
	var calls []csiCall
	if err := framework.Poll(ctx, 3*time.Minute, "kubelet to publish every volume again after its restart", func() (bool, error) {
		var err error
		if calls, err = publishCalls(ctx, e, restart); err != nil {
			return false, nil
		}
		for _, tg := range targets {
			if !slices.ContainsFunc(calls, func(c csiCall) bool { return c.Target == tg.dir && c.Code == "OK" }) {
				return false, nil
			}
		}
		return true, nil
	}); err != nil {
		t.Fatalf("%v (publish calls seen: %+v)", err, calls)
	}
	after := createReady(t, ctx, e, framework.BusyboxPod(ns, "after-restart", "true"))
	checkInstrumented(t, e, after, e.jsRef)
	for _, tg := range targets {
		oneMount(t, e, tg.pod, tg.volume)
		p, err := e.cs.CoreV1().Pods(ns).Get(ctx, tg.pod.Name, metav1.GetOptions{})
		if err != nil || !framework.PodReady(p) || p.UID != tg.pod.UID {
			t.Errorf("pod %s is no longer the same Ready pod after the kubelet restart (%v)", tg.pod.Name, err)
		}
	}
	execIn(t, ctx, e, pods[0], "test", "-f", ddTracePackageJSON)
	execIn(t, ctx, e, pods[2], "test", "-d", "/data")
}
