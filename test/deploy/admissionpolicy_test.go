package deploy

import (
	"context"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/apm-csi/apm-csi/shared/names"
)

// The admission guard shipped with the manifests (ValidatingAdmissionPolicies on inline
// volumes of the driver), enforced by a real kube-apiserver: pods are created for real (CEL
// policies are evaluated by the API server's admission chain) and the refused ones must fail
// with the policy's message.

const hostdirNamespace = "hostdir-ok"

// policyObjects renders the chart with hostdir volumes allowed in hostdirNamespace and returns
// its admission policies and bindings.
func policyObjects(t *testing.T) []*unstructured.Unstructured {
	t.Helper()
	v := Variant{Name: "helm-policy", Helm: true, Namespace: names.SystemNamespace}
	out, err := run(t, helm(t), helmTemplateArgs(v, "--set", "admissionPolicy.hostdirNamespaces={"+hostdirNamespace+"}")...)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Decode(out)
	if err != nil {
		t.Fatal(err)
	}
	var policies []*unstructured.Unstructured
	for _, o := range objs {
		if strings.HasPrefix(o.GetKind(), "ValidatingAdmissionPolicy") {
			policies = append(policies, o)
		}
	}
	if len(policies) != 4 {
		t.Fatalf("the chart renders %d admission policy objects, want 2 policies and 2 bindings", len(policies))
	}
	return policies
}

func csiPod(ns, name, driver string, attrs map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{Name: "app", Image: "registry.example.com/app:1",
				VolumeMounts: []corev1.VolumeMount{{Name: "vol", MountPath: "/vol"}}}},
			Volumes: []corev1.Volume{{Name: "vol", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{Driver: driver, VolumeAttributes: attrs}}}},
		},
	}
}

// TestAdmissionPolicyOnAPIServer runs the chart's admission policy on a kube-apiserver of the
// newest and of the oldest supported Kubernetes version.
func TestAdmissionPolicyOnAPIServer(t *testing.T) {
	for _, api := range kubeAPIs(t) {
		t.Run("v"+api.Version, func(t *testing.T) { testAdmissionPolicyOnAPIServer(t, api) })
	}
}

func testAdmissionPolicyOnAPIServer(t *testing.T, api kubeAPI) {
	objs := policyObjects(t)
	c, w := apiServer(t, api)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for _, ns := range []string{hostdirNamespace, "plain"} {
		if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, o := range objs {
		if err := c.Create(ctx, o.DeepCopy(), client.FieldValidation("Strict")); err != nil {
			t.Fatalf("create %s: %v", describe(o), err)
		}
	}
	// The API server compiles the policies; type errors in CEL come back as warnings or in
	// the policy's status.
	for _, msg := range w.take() {
		t.Errorf("API server warning on the policies: %s", msg)
	}

	driver := names.DriverName
	n := 0
	create := func(p *corev1.Pod) error {
		n++
		p.Name = fmt.Sprintf("%s-%d", p.Name, n)
		return c.Create(ctx, p)
	}
	// The policies take effect once the API server's policy informers have them: wait until a
	// pod the policy must refuse is refused.
	var last error
	if err := wait.PollUntilContextTimeout(t.Context(), 200*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		last = create(csiPod("plain", "probe", driver, map[string]string{"type": "no-such-type"}))
		return last != nil && strings.Contains(last.Error(), "ValidatingAdmissionPolicy"), nil
	}); err != nil {
		t.Fatalf("the admission policies never took effect (last create: %v)", last)
	}
	for _, msg := range w.take() {
		t.Logf("warning while waiting: %s", msg)
	}

	webhookLibrary := map[string]string{"type": "library", "library.0.image": "gcr.io/datadoghq/apm-inject:0.52.0",
		"library.0.source": "/opt/datadog-packages/datadog-apm-inject", "library.0.target": "opt/datadog-packages/datadog-apm-inject",
		"library.15.image": "gcr.io/datadoghq/dd-lib-python-init:v3", "library.15.target": "opt/datadog/apm/library/python",
		"preload": "/opt/datadog-packages/datadog-apm-inject/stable/inject/launcher.preload.so", "readOnly": "true"}
	allowed := []struct {
		name string
		pod  *corev1.Pod
	}{
		{"library volume as the webhook writes it", csiPod("plain", "library", driver, webhookLibrary)},
		{"preload volume", csiPod("plain", "preload", driver, map[string]string{"type": "preload"})},
		{"Datadog library volume", csiPod("plain", "dd-library", "k8s.csi.datadoghq.com", map[string]string{"type": "DatadogLibrary",
			"dd.csi.datadog.com/library.package": "dd-lib-python-init", "dd.csi.datadog.com/library.registry": "gcr.io/datadoghq", "dd.csi.datadog.com/library.version": "v3"})},
		{"Datadog socket type in any namespace", csiPod("plain", "apm-socket", driver, map[string]string{"type": "APMSocket"})},
		{"hostdir in a listed namespace", csiPod(hostdirNamespace, "hostdir", driver, map[string]string{"type": "hostdir", "name": "data", "readOnly": "true"})},
		{"another driver's volume is not ours to check", csiPod("plain", "other-driver", "other.csi.example.com", map[string]string{"anything": "goes"})},
	}
	for _, a := range allowed {
		t.Run("allowed/"+a.name, func(t *testing.T) {
			if err := create(a.pod); err != nil {
				t.Fatalf("refused: %v", err)
			}
		})
	}

	refused := []struct {
		name  string
		pod   *corev1.Pod
		frags []string
	}{
		{"hostdir outside the listed namespaces", csiPod("plain", "hostdir", driver, map[string]string{"type": "hostdir", "name": "team-a"}),
			[]string{"apm-csi: host directory volume vol (type hostdir, entry team-a) is not allowed in namespace plain",
				"ValidatingAdmissionPolicyBinding apm-csi-hostdir-namespaces", "Helm value admissionPolicy.hostdirNamespaces"}},
		{"hostdir through Datadog's driver name", csiPod("plain", "dd-hostdir", "k8s.csi.datadoghq.com", map[string]string{"type": "hostdir", "name": "x"}),
			[]string{"host directory volume vol (type hostdir, entry x) is not allowed in namespace plain"}},
		{"pod-supplied kubelet key", csiPod(hostdirNamespace, "forged", driver, map[string]string{"type": "hostdir", "name": "data", "csi.storage.k8s.io/pod.namespace": "team-a"}),
			[]string{"volumeAttributes not accepted: volume vol (type hostdir): csi.storage.k8s.io/pod.namespace", "set by kubelet"}},
		{"library key the webhook never writes", csiPod("plain", "extra", driver, map[string]string{"type": "library", "library.0.image": "x:1", "library.16.image": "y:1", "name": "data"}),
			[]string{"volume vol (type library): ", "library.16.image", "name"}},
		{"hostdir key on a library volume", csiPod("plain", "mixed", driver, map[string]string{"type": "DatadogLibrary", "name": "data"}),
			[]string{"volume vol (type DatadogLibrary): name"}},
		{"unknown type", csiPod("plain", "unknown", driver, map[string]string{"type": "HostPath", "path": "/etc"}),
			[]string{"apm-csi: CSI volume vol of driver csi.apm-csi.io has no volumeAttributes type, or one the driver does not serve"}},
		{"no attributes", csiPod("plain", "untyped", driver, nil),
			[]string{"has no volumeAttributes type"}},
	}
	for _, r := range refused {
		t.Run("refused/"+r.name, func(t *testing.T) {
			err := create(r.pod)
			if err == nil {
				t.Fatal("the pod was created")
			}
			if !apierrors.IsInvalid(err) && !apierrors.IsForbidden(err) {
				t.Errorf("want Forbidden or Invalid, got %v", err)
			}
			for _, f := range append([]string{"ValidatingAdmissionPolicy"}, r.frags...) {
				if !strings.Contains(err.Error(), f) {
					t.Errorf("the error lacks %q:\n%v", f, err)
				}
			}
		})
	}
}

// TestAdmissionPolicyParity: kustomize ships the same policies as the chart; its hostdir
// binding lists no namespace (the administrator adds them), the chart's follows its value.
func TestAdmissionPolicyParity(t *testing.T) {
	helmObjs := policyObjects(t)
	var kustomize []*unstructured.Unstructured
	for _, o := range Objects(t, variantByName(t, "kustomize-self-managed")) {
		if strings.HasPrefix(o.GetKind(), "ValidatingAdmissionPolicy") {
			kustomize = append(kustomize, o)
		}
	}
	if len(kustomize) != len(helmObjs) {
		t.Fatalf("kustomize renders %d policy objects, the chart %d", len(kustomize), len(helmObjs))
	}
	for _, k := range kustomize {
		var h *unstructured.Unstructured
		for _, o := range helmObjs {
			if o.GetKind() == k.GetKind() && o.GetName() == k.GetName() {
				h = o
			}
		}
		if h == nil {
			t.Errorf("%s is not rendered by the chart under the same name", describe(k))
			continue
		}
		ks, hs := k.Object["spec"].(map[string]any), h.Object["spec"].(map[string]any)
		if k.GetKind() == "ValidatingAdmissionPolicyBinding" && k.GetName() == "apm-csi-hostdir-namespaces" {
			if _, ok := ks["matchResources"]; ok {
				t.Errorf("kustomize's hostdir binding must list no namespace by default: %v", ks["matchResources"])
			}
			want := map[string]any{"namespaceSelector": map[string]any{"matchExpressions": []any{map[string]any{
				"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": []any{hostdirNamespace}}}}}
			if !reflect.DeepEqual(hs["matchResources"], want) {
				t.Errorf("the chart's hostdir binding matchResources = %v, want %v", hs["matchResources"], want)
			}
			delete(hs, "matchResources")
		}
		if !reflect.DeepEqual(ks, hs) {
			t.Errorf("%s differs between kustomize and the chart:\nkustomize: %v\nchart:     %v", describe(k), ks, hs)
		}
	}
}
