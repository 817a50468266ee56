package webhook_test

import (
	"context"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/mutation"
)

// TestPodShapes creates pods of unusual shapes in an SSI namespace through a real API server
// and checks what it stored.
func TestPodShapes(t *testing.T) {
	h := startHarness(t)
	h.setDriver(t, true)
	h.namespace(t, "shapes", map[string]string{"apm-csi.io/ssi": "enabled"}, nil)

	assertSkipped := func(t *testing.T, p *corev1.Pod, sent *corev1.Pod, reason string) {
		t.Helper()
		if libraryVolume(p) != nil || len(p.Spec.InitContainers) != len(sent.Spec.InitContainers) {
			t.Errorf("pod %s must not get the libraries: volumes %+v", p.Name, p.Spec.Volumes)
		}
		for i := range sent.Spec.Containers {
			if !equality.Semantic.DeepEqual(p.Spec.Containers[i].Env, sent.Spec.Containers[i].Env) ||
				!equality.Semantic.DeepEqual(p.Spec.Containers[i].VolumeMounts, sent.Spec.Containers[i].VolumeMounts) {
				t.Errorf("container %s changed: env %+v, mounts %+v", p.Spec.Containers[i].Name, p.Spec.Containers[i].Env, p.Spec.Containers[i].VolumeMounts)
			}
		}
		if s := p.Annotations[annotations.InjectionStatus]; !strings.HasPrefix(s, "skipped: ") || !strings.Contains(s, reason) {
			t.Errorf("status = %q, want skipped with %q", s, reason)
		}
	}

	t.Run("Windows by nodeSelector", func(t *testing.T) {
		p := pod("shapes", "win-selector", nil, nil)
		p.Spec.NodeSelector = map[string]string{corev1.LabelOSStable: "windows"}
		assertSkipped(t, h.create(t, p.DeepCopy()), p, "Windows pods cannot load the Linux tracer libraries (nodeSelector kubernetes.io/os: windows)")
	})

	t.Run("Windows by required node affinity", func(t *testing.T) {
		p := pod("shapes", "win-affinity", nil, nil)
		p.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{
			NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchExpressions: []corev1.NodeSelectorRequirement{
				{Key: corev1.LabelOSStable, Operator: corev1.NodeSelectorOpIn, Values: []string{"windows"}}}}}}}}
		assertSkipped(t, h.create(t, p.DeepCopy()), p, "Windows pods cannot load the Linux tracer libraries (required node affinity kubernetes.io/os In [windows])")
	})

	t.Run("Windows pod asking for a manual volume is denied", func(t *testing.T) {
		p := pod("shapes", "win-manual", nil, map[string]string{annotations.VolumePrefix + "tracer": "libraries=java; mountPath=/dd"})
		p.Spec.NodeSelector = map[string]string{corev1.LabelOSStable: "windows"}
		err := h.client.Create(context.Background(), p)
		if err == nil {
			t.Fatal("the pod was created with a volume no Windows node can mount")
		}
		for _, frag := range []string{`admission webhook "ssi-namespaces.pods.apm-csi.io" denied the request`, "annotation apm-csi.io/volume.tracer",
			"the pod runs only on Windows nodes (nodeSelector kubernetes.io/os: windows), where the apm-csi node plugin does not run"} {
			if !strings.Contains(err.Error(), frag) {
				t.Errorf("the client's error lacks %q:\n%v", frag, err)
			}
		}
	})

	t.Run("Linux or Windows by node affinity is instrumented", func(t *testing.T) {
		p := pod("shapes", "either-os", nil, nil)
		req := func(os string) corev1.NodeSelectorTerm {
			return corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{
				{Key: corev1.LabelOSStable, Operator: corev1.NodeSelectorOpIn, Values: []string{os}}}}
		}
		p.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{
			NodeSelectorTerms: []corev1.NodeSelectorTerm{req("linux"), req("windows")}}}}
		assertCSIInjected(t, h.create(t, p))
	})

	t.Run("envFrom ConfigMap: that container is left alone, the others instrumented", func(t *testing.T) {
		p := pod("shapes", "env-from", nil, nil)
		p.Spec.Containers[0].EnvFrom = []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "app-env"}}}}
		p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "worker", Image: "registry.example.com/worker:1"})
		stored := h.create(t, p.DeepCopy())
		if libraryVolume(stored) == nil {
			t.Fatalf("the worker must be instrumented: status %q", stored.Annotations[annotations.InjectionStatus])
		}
		app := stored.Spec.Containers[0]
		if !equality.Semantic.DeepEqual(app.Env, p.Spec.Containers[0].Env) || len(app.VolumeMounts) != 0 {
			t.Errorf("app takes LD_PRELOAD from envFrom and must be left alone: env %+v, mounts %+v", app.Env, app.VolumeMounts)
		}
		want := "container app not instrumented: DD_INJECT_SENDER_TYPE, DD_INJECT_START_TIME may be set by envFrom (configMapRef app-env)"
		if s := stored.Annotations[annotations.InjectionStatus]; !strings.HasPrefix(s, "injected: csi mode, injector layout, containers worker") || !strings.Contains(s, want) {
			t.Errorf("status = %q, want %q", s, want)
		}
	})

	t.Run("envFrom Secret on the only container: skipped", func(t *testing.T) {
		p := pod("shapes", "env-from-secret", nil, nil)
		p.Spec.Containers[0].Env = nil
		p.Spec.Containers[0].EnvFrom = []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "app-secrets"}}}}
		assertSkipped(t, h.create(t, p.DeepCopy()), p,
			"no container to instrument; container app not instrumented: LD_PRELOAD, DD_INJECT_SENDER_TYPE, DD_INJECT_START_TIME may be set by envFrom (secretRef app-secrets)")
	})

	t.Run("mirror pod of a static pod is left alone", func(t *testing.T) {
		p := pod("shapes", "static-web-node1", nil, map[string]string{corev1.MirrorPodAnnotationKey: "3f2a9c0d", "kubernetes.io/config.source": "file"})
		p.Spec.NodeName = "node1"
		before := admissions(t)
		stored := h.create(t, p.DeepCopy())
		if admissions(t) == before {
			t.Fatal("the selectors send this pod to the webhook; it must have been asked")
		}
		assertUnmutated(t, stored)
		for i, c := range stored.Spec.Containers {
			if !equality.Semantic.DeepEqual(c.Env, p.Spec.Containers[i].Env) || len(c.VolumeMounts) != 0 {
				t.Errorf("container %s changed: env %+v, mounts %+v", c.Name, c.Env, c.VolumeMounts)
			}
		}
	})

	t.Run("a user volume with the library volume's name: left as it is, with the reason", func(t *testing.T) {
		p := pod("shapes", "own-volume", nil, nil)
		p.Spec.Volumes = []corev1.Volume{{Name: mutation.VolumeName, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
		p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: mutation.VolumeName, MountPath: "/usr/share/app/lib"}}
		stored := h.create(t, p.DeepCopy())
		want := "skipped: the pod already has a volume named apm-csi-libraries that apm-csi did not add; rename that volume to have the pod instrumented; config " + h.configHash
		if s := stored.Annotations[annotations.InjectionStatus]; s != want {
			t.Errorf("status = %q, want %q", s, want)
		}
		if v := libraryVolume(stored); v == nil || v.EmptyDir == nil || len(stored.Spec.Volumes) != 1 {
			t.Errorf("the user's volume must stay as it is: %+v", stored.Spec.Volumes)
		}
		if app := stored.Spec.Containers[0]; !equality.Semantic.DeepEqual(app.Env, p.Spec.Containers[0].Env) || len(app.VolumeMounts) != 1 {
			t.Errorf("app changed: env %+v, mounts %+v", app.Env, app.VolumeMounts)
		}
		h.eventually(t, "an InjectionSkipped event for pod shapes/own-volume", func() bool {
			var list eventsv1.EventList
			if err := h.client.List(context.Background(), &list, client.InNamespace("shapes")); err != nil {
				return false
			}
			return slices.ContainsFunc(list.Items, func(e eventsv1.Event) bool {
				return e.Regarding.Name == "own-volume" && e.Reason == "InjectionSkipped" && strings.Contains(e.Note, "that apm-csi did not add")
			})
		})
	})
}
