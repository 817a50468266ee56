package e2e

import (
	"context"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/tracer"
	"github.com/apm-csi/apm-csi/webhook/annotations"
)

// An invalid manual volume annotation is refused at kubectl apply, with the
// message the webhook's parser gives; the same pod with a valid annotation is admitted.
func scenarioInvalidAnnotation(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-manual", nil)
	key := annotations.VolumePrefix + "tracer"
	bad := "libraries=js; mountPath=opt/tracer"
	_, parseErr := annotations.ParseVolume(key, bad)
	if parseErr == nil {
		t.Fatalf("%s: %q is valid; the scenario needs an invalid value", key, bad)
	}
	pod := func(name, value string) *corev1.Pod {
		p := framework.BusyboxPod(ns, name, "true")
		p.TypeMeta = metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"}
		p.Labels[annotations.Volumes] = annotations.VolumesEnabled
		p.Annotations = map[string]string{key: value}
		return p
	}
	out, err := e.c.Kubectl(ctx, "apply", "-f", writeManifest(t, pod("bad-annotation", bad)))
	if err == nil {
		t.Fatalf("kubectl apply accepted the pod: %s", out)
	}
	for _, want := range []string{"denied the request", parseErr.Error()} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("kubectl apply failed without %q:\n%v", want, err)
		}
	}
	t.Logf("kubectl apply: %v", err)
	if _, err := e.cs.CoreV1().Pods(ns).Get(ctx, "bad-annotation", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the refused pod exists: %v", err)
	}

	// The valid form, read-only: one library, so the node plugin serves it as a read-only bind
	// mount of the cached library rather than an overlay.
	if out, err := e.c.Kubectl(ctx, "apply", "-f", writeManifest(t, pod("good-annotation", "libraries=js; mountPath=/opt/tracer; readOnly=true"))); err != nil {
		t.Fatalf("a valid annotation was refused: %v\n%s", err, out)
	}
	good, err := framework.WaitPodReady(ctx, e.cs, ns, "good-annotation", podTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if got := execIn(t, ctx, e, good, "cat", "/opt/tracer/node_modules/dd-trace/package.json"); !strings.Contains(got, `"dd-trace"`) {
		t.Errorf("the manual library volume does not serve dd-trace: %q", got)
	}
	m := oneMount(t, e, good, "tracer")
	if !m.ReadOnly() {
		t.Errorf("the read-only library volume is mounted read-write on the node: %+v", m)
	}
	checkNoSuidNoDev(t, m)
	if out, err := framework.Exec(ctx, e.c, ns, good.Name, "", "touch", "/opt/tracer/x"); err == nil {
		t.Errorf("a pod wrote into its read-only library volume: %q", out)
	}
}

// In a namespace enforcing Pod Security "restricted" the instrumented pod is
// admitted and runs (an inline CSI volume is allowed there); a hostPath volume is not.
func scenarioRestricted(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-restricted", map[string]string{
		framework.SSILabel:                           "enabled",
		"pod-security.kubernetes.io/enforce":         "restricted",
		"pod-security.kubernetes.io/enforce-version": "latest",
	})
	p := appPod(e, ns, "restricted-app", "e2e-restricted")
	framework.RestrictedSecurity(p, tracer.AppUID)
	admitted, err := framework.CreatePod(ctx, e.cs, p)
	if err != nil {
		t.Fatalf("the instrumented pod was refused under restricted: %v", err)
	}
	checkInstrumented(t, e, admitted, e.jsRef)
	ready, err := framework.WaitPodReady(ctx, e.cs, ns, p.Name, podTimeout)
	if err != nil {
		t.Fatal(err)
	}
	checkTracesArrive(t, ctx, e, ready, "e2e-restricted")

	hp := framework.BusyboxPod(ns, "with-hostpath", "true")
	framework.RestrictedSecurity(hp, tracer.AppUID)
	hp.Spec.Volumes = []corev1.Volume{{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: e.dataDir}}}}
	hp.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "host", MountPath: "/host"}}
	_, err = framework.CreatePod(ctx, e.cs, hp)
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "hostPath") {
		t.Errorf("a hostPath pod under restricted: %v, want Forbidden for hostPath (Pod Security is not enforced?)", err)
	}
}
