package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/tracer"
	"github.com/apm-csi/apm-csi/webhook/annotations"
)

// In a namespace with SSI on, unmodified pods are admitted with the library volume, read
// dd-trace's files and NODE_OPTIONS from it, and do not see each other's writes; on the node
// they share one cached copy of the library behind private overlay upper dirs, downloaded once.
func scenarioSSI(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-ssi", ssiLabels)
	e.reg.ResetCounts()
	a := createReady(t, ctx, e, framework.BusyboxPod(ns, "pod-a", "echo from-a > /datadog-lib/written-by-a"))
	checkInstrumented(t, e, a, e.jsRef)
	b := createReady(t, ctx, e, framework.BusyboxPod(ns, "pod-b", "echo from-b > /datadog-lib/written-by-b"))
	checkInstrumented(t, e, b, e.jsRef)

	var pkg struct {
		Name, Version string
	}
	if err := json.Unmarshal([]byte(execIn(t, ctx, e, a, "cat", ddTracePackageJSON)), &pkg); err != nil {
		t.Fatal(err)
	}
	if pkg.Name != "dd-trace" || pkg.Version != tracer.DDTraceVersion {
		t.Errorf("%s in the pod: %+v, want dd-trace %s", ddTracePackageJSON, pkg, tracer.DDTraceVersion)
	}
	if env := execIn(t, ctx, e, a, "sh", "-c", "echo $NODE_OPTIONS"); !strings.Contains(env, nodeOptionsRequire) {
		t.Errorf("NODE_OPTIONS in the container: %q", env)
	}

	// Each pod sees its own writes and not the other's.
	for _, c := range []struct {
		self         *corev1.Pod
		mine, theirs string
	}{{a, "a", "b"}, {b, "b", "a"}} {
		got := execIn(t, ctx, e, c.self, "sh", "-c", fmt.Sprintf("cat /datadog-lib/written-by-%s; test -e /datadog-lib/written-by-%s && echo LEAKED || echo absent", c.mine, c.theirs))
		if want := "from-" + c.mine + "\nabsent\n"; got != want {
			t.Errorf("pod-%s sees %q, want %q", c.mine, got, want)
		}
	}

	// On the node: one overlay per pod, the same shared lower dirs (one copy of the library),
	// private upper dirs holding each pod's writes, nothing written into the cache.
	ma, mb := oneMount(t, e, a, framework.LibraryVolumeName), oneMount(t, e, b, framework.LibraryVolumeName)
	for _, m := range []framework.Mount{ma, mb} {
		if m.FSType != "overlay" {
			t.Errorf("%s is %s, want overlay", m.MountPoint, m.FSType)
		}
		checkNoSuidNoDev(t, m)
		for _, l := range m.LowerDirs() {
			if !strings.HasPrefix(l, e.d.StateDir+"/") {
				t.Errorf("lower dir %s is not in the node plugin's state dir %s", l, e.d.StateDir)
			}
			for _, f := range []string{"written-by-a", "written-by-b"} {
				if _, err := os.Stat(filepath.Join(l, f)); err == nil {
					t.Errorf("a pod's write reached the shared library %s", filepath.Join(l, f))
				}
			}
		}
	}
	if !slices.Equal(ma.LowerDirs(), mb.LowerDirs()) || len(ma.LowerDirs()) == 0 {
		t.Errorf("the two pods do not share the cached library: %v vs %v", ma.LowerDirs(), mb.LowerDirs())
	}
	upperA, _ := ma.Option("upperdir")
	upperB, _ := mb.Option("upperdir")
	if upperA == "" || upperA == upperB {
		t.Errorf("upper dirs %q and %q: want one private upper dir per pod", upperA, upperB)
	}
	if data, err := os.ReadFile(filepath.Join(upperA, "written-by-a")); err != nil || string(data) != "from-a\n" {
		t.Errorf("pod-a's write is not in its upper dir %s: %q %v", upperA, data, err)
	}

	// One download for the node, however many pods.
	manifests, maxLayer, err := e.reg.ImageFetches(e.repo, e.jsImage)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("registry: %d manifest GETs by digest, at most %d GETs of any layer for 2 pods", manifests, maxLayer)
	if maxLayer != 1 {
		t.Errorf("a layer of the library image was downloaded %d times for two pods on one node, want once", maxLayer)
	}
}

// The real tracer: the demo app, whose image has no tracer, gets dd-trace through the
// webhook and the CSI volume, and its spans reach the intake. The same image in a namespace
// without SSI runs without a tracer.
func scenarioRealTracer(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-tracer", ssiLabels)
	p := createReady(t, ctx, e, appPod(e, ns, "node-app", "e2e-node-app"))
	checkInstrumented(t, e, p, e.jsRef)
	checkTracesArrive(t, ctx, e, p, "e2e-node-app")

	plainNS := namespace(t, ctx, e, "e2e-plain", nil)
	plain := createReady(t, ctx, e, appPod(e, plainNS, "node-app", "e2e-plain"))
	if v := framework.LibraryVolume(plain); v != nil {
		t.Errorf("a pod outside SSI namespaces got the library volume")
	}
	var info tracerInfo
	if err := getJSON(ctx, plain, "/tracer", &info); err != nil {
		t.Fatal(err)
	}
	if info.Loaded || info.From != "" {
		t.Errorf("the application image alone loads a tracer: %+v", info)
	}
}

// A pod written for Datadog's classic init-container injection (emptyDir +
// datadog-lib-js-init copying the tracer) is rewritten: no init container runs, the same
// image is served by the CSI volume at the same path, and the tracer works.
func scenarioRewrite(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-rewrite", nil)
	p := appPod(e, ns, "classic", "e2e-rewritten")
	p.Labels[annotations.DatadogEnabled] = "true"
	p.Spec.Volumes = []corev1.Volume{{Name: "datadog-auto-instrumentation", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
	p.Spec.InitContainers = []corev1.Container{{
		Name:         "datadog-lib-js-init",
		Image:        e.jsRef,
		Command:      []string{"sh", "copy-lib.sh", framework.LibraryMountPath},
		WorkingDir:   "/datadog-init",
		VolumeMounts: []corev1.VolumeMount{{Name: "datadog-auto-instrumentation", MountPath: framework.LibraryMountPath}},
	}}
	app := &p.Spec.Containers[0]
	app.Env = append(app.Env, corev1.EnvVar{Name: "NODE_OPTIONS", Value: nodeOptionsRequire})
	app.VolumeMounts = append(app.VolumeMounts, corev1.VolumeMount{Name: "datadog-auto-instrumentation", MountPath: framework.LibraryMountPath})

	admitted, err := framework.CreatePod(ctx, e.cs, p)
	if err != nil {
		t.Fatal(err)
	}
	checkInstrumented(t, e, admitted, e.jsRef)
	if slices.ContainsFunc(admitted.Spec.Volumes, func(v corev1.Volume) bool { return v.EmptyDir != nil }) {
		t.Errorf("the emptyDir of the init-container injection is still there: %+v", admitted.Spec.Volumes)
	}
	ready, err := framework.WaitPodReady(ctx, e.cs, ns, p.Name, podTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if len(ready.Status.InitContainerStatuses) != 0 {
		t.Errorf("init containers ran: %+v", ready.Status.InitContainerStatuses)
	}
	checkTracesArrive(t, ctx, e, ready, "e2e-rewritten")
}
