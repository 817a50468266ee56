package admission

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	jsonpatch "github.com/evanphx/json-patch/v5"
	dto "github.com/prometheus/client_model/go"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	ctrladmission "sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/mutation"
)

const testNS = "shop"

func scheme(t testing.TB) *runtime.Scheme {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	return s
}

func namespace(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

func csiDriver() *storagev1.CSIDriver {
	return &storagev1.CSIDriver{ObjectMeta: metav1.ObjectMeta{Name: "csi.apm-csi.io"}}
}

func newHandler(t testing.TB, cached []client.Object, live []client.Object) *PodMutator {
	h := &PodMutator{
		Mutator: mutation.New(config.Default(), "apm-csi-system"),
		Reader:  fake.NewClientBuilder().WithScheme(scheme(t)).WithObjects(cached...).Build(),
		Log:     slog.New(slog.DiscardHandler),
		Now:     func() time.Time { return time.Unix(1_700_000_000, 0) },
	}
	if live != nil {
		h.APIReader = fake.NewClientBuilder().WithScheme(scheme(t)).WithObjects(live...).Build()
	}
	return h
}

// typicalPod is what a Deployment's ReplicaSet sends: no name yet, an owner, two containers.
func typicalPod() *corev1.Pod {
	return &corev1.Pod{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: "web-7d9f8-", Labels: map[string]string{"app": "web"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "web-7d9f8", UID: "u1", Controller: new(true)}},
		},
		Spec: corev1.PodSpec{Containers: []corev1.Container{
			{Name: "app", Image: "registry.example.com/web:1", Env: []corev1.EnvVar{{Name: "LD_PRELOAD", Value: "/lib/a.so"}}},
			{Name: "worker", Image: "registry.example.com/worker:1"},
		}},
	}
}

// request builds the AdmissionRequest the API server sends. extraSpec adds raw JSON to the
// pod spec, e.g. fields this build's API types do not know.
func request(t testing.TB, pod *corev1.Pod, op admissionv1.Operation, extraSpec map[string]any) ctrladmission.Request {
	raw, err := json.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	if extraSpec != nil {
		var doc map[string]any
		_ = json.Unmarshal(raw, &doc)
		spec := doc["spec"].(map[string]any)
		for k, v := range extraSpec {
			spec[k] = v
		}
		raw, _ = json.Marshal(doc)
	}
	return ctrladmission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
		UID: "req-1", Kind: metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
		Resource: metav1.GroupVersionResource{Version: "v1", Resource: "pods"}, Namespace: testNS,
		Operation: op, Object: runtime.RawExtension{Raw: raw},
	}}
}

// applyPatch applies the response the way the API server does, to the raw request object.
func applyPatch(t testing.TB, req ctrladmission.Request, resp ctrladmission.Response) map[string]any {
	t.Helper()
	if err := resp.Complete(req); err != nil {
		t.Fatal(err)
	}
	out := req.Object.Raw
	if resp.Patch != nil {
		p, err := jsonpatch.DecodePatch(resp.Patch)
		if err != nil {
			t.Fatal(err)
		}
		if out, err = p.Apply(out); err != nil {
			t.Fatal(err)
		}
	}
	var doc map[string]any
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

func decodePod(t testing.TB, doc map[string]any) *corev1.Pod {
	raw, _ := json.Marshal(doc)
	pod := &corev1.Pod{}
	if err := json.Unmarshal(raw, pod); err != nil {
		t.Fatal(err)
	}
	return pod
}

func ssiLabels() map[string]string { return map[string]string{"apm-csi.io/ssi": "enabled"} }

func counter(result, mode string) float64 {
	m := &dto.Metric{}
	if err := mutationsTotal.WithLabelValues(result, mode).Write(m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

func TestHandleInjects(t *testing.T) {
	h := newHandler(t, []client.Object{namespace(testNS, ssiLabels()), csiDriver()}, nil)
	before := counter("injected", "csi")
	req := request(t, typicalPod(), admissionv1.Create, map[string]any{"futureField": map[string]any{"kept": true}})
	resp := h.Handle(context.Background(), req)
	if !resp.Allowed {
		t.Fatalf("denied: %+v", resp.Result)
	}
	doc := applyPatch(t, req, resp)
	if doc["spec"].(map[string]any)["futureField"] == nil {
		t.Error("a field unknown to this build must survive the patch")
	}
	pod := decodePod(t, doc)
	if !slices.ContainsFunc(pod.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == mutation.VolumeName && v.CSI != nil }) {
		t.Fatalf("volumes = %+v", pod.Spec.Volumes)
	}
	if !strings.HasPrefix(pod.Annotations[annotations.InjectionStatus], "injected: csi mode, injector layout, containers app,worker") {
		t.Errorf("status = %q", pod.Annotations[annotations.InjectionStatus])
	}
	if got := counter("injected", "csi") - before; got != 1 {
		t.Errorf("mutations_total{injected,csi} grew by %v", got)
	}
}

func TestHandleFallsBackWithoutDriver(t *testing.T) {
	h := newHandler(t, []client.Object{namespace(testNS, ssiLabels())}, nil)
	req := request(t, typicalPod(), admissionv1.Create, nil)
	pod := decodePod(t, applyPatch(t, req, h.Handle(context.Background(), req)))
	if len(pod.Spec.InitContainers) == 0 || !strings.Contains(pod.Annotations[annotations.InjectionStatus], "fell back to init-container mode") {
		t.Fatalf("status %q, init containers %d", pod.Annotations[annotations.InjectionStatus], len(pod.Spec.InitContainers))
	}
}

func TestHandleDeniesInvalidManualAnnotation(t *testing.T) {
	h := newHandler(t, []client.Object{namespace(testNS, nil), csiDriver()}, nil)
	pod := typicalPod()
	pod.Labels[annotations.Volumes] = "enabled"
	pod.Annotations = map[string]string{annotations.VolumePrefix + "tracer": "libraries=jav; mountPath=/dd"}
	resp := h.Handle(context.Background(), request(t, pod, admissionv1.Create, nil))
	if resp.Allowed || resp.Result.Code != http.StatusForbidden {
		t.Fatalf("want a denial, got %+v", resp)
	}
	for _, frag := range []string{"annotation apm-csi.io/volume.tracer", `"jav"`, "fix:"} {
		if !strings.Contains(resp.Result.Message, frag) {
			t.Errorf("message %q lacks %q", resp.Result.Message, frag)
		}
	}
}

func TestHandleNamespaceLookup(t *testing.T) {
	// Not in the cache yet (just created): read from the API server.
	h := newHandler(t, []client.Object{csiDriver()}, []client.Object{namespace(testNS, ssiLabels())})
	req := request(t, typicalPod(), admissionv1.Create, nil)
	pod := decodePod(t, applyPatch(t, req, h.Handle(context.Background(), req)))
	if !strings.HasPrefix(pod.Annotations[annotations.InjectionStatus], "injected") {
		t.Errorf("status = %q", pod.Annotations[annotations.InjectionStatus])
	}

	// Nowhere: admitted uninstrumented, with the reason recorded and a warning.
	h = newHandler(t, []client.Object{csiDriver()}, []client.Object{})
	resp := h.Handle(context.Background(), req)
	pod = decodePod(t, applyPatch(t, req, resp))
	if !resp.Allowed || !strings.HasPrefix(pod.Annotations[annotations.InjectionStatus], `error: namespace shop could not be read`) || len(pod.Spec.Volumes) != 0 {
		t.Errorf("allowed %v status %q volumes %d", resp.Allowed, pod.Annotations[annotations.InjectionStatus], len(pod.Spec.Volumes))
	}
	if len(resp.Warnings) == 0 {
		t.Error("want a warning")
	}
}

func TestHandleLeavesOtherRequestsAlone(t *testing.T) {
	h := newHandler(t, []client.Object{namespace(testNS, ssiLabels()), csiDriver()}, nil)
	for name, req := range map[string]ctrladmission.Request{
		"update": request(t, typicalPod(), admissionv1.Update, nil),
		"not a pod": func() ctrladmission.Request {
			r := request(t, typicalPod(), admissionv1.Create, nil)
			r.Kind.Kind = "Service"
			return r
		}(),
		"subresource": func() ctrladmission.Request {
			r := request(t, typicalPod(), admissionv1.Create, nil)
			r.SubResource = "binding"
			return r
		}(),
		"undecodable": func() ctrladmission.Request {
			r := request(t, typicalPod(), admissionv1.Create, nil)
			r.Object.Raw = []byte("{not json")
			return r
		}(),
		"opted out": request(t, func() *corev1.Pod { p := typicalPod(); p.Labels[annotations.DatadogEnabled] = "false"; return p }(), admissionv1.Create, nil),
	} {
		t.Run(name, func(t *testing.T) {
			resp := h.Handle(context.Background(), req)
			if !resp.Allowed || len(resp.Patches) != 0 || resp.Patch != nil {
				t.Fatalf("want allowed without patch, got %+v", resp)
			}
		})
	}
}

func TestHandleNeverDeniesOnPanic(t *testing.T) {
	h := newHandler(t, []client.Object{namespace(testNS, ssiLabels()), csiDriver()}, nil)
	h.Mutator = nil // any bug that panics
	before := counter("error", "none")
	resp := h.Handle(context.Background(), request(t, typicalPod(), admissionv1.Create, nil))
	if !resp.Allowed || len(resp.Patches) != 0 || len(resp.Warnings) == 0 {
		t.Fatalf("want allowed, unpatched, with a warning; got %+v", resp)
	}
	if counter("error", "none") != before+1 {
		t.Error("the panic must be counted as an error")
	}
}

func TestHandleAutoModeReadsServerVersionAndNodes(t *testing.T) {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", Labels: map[string]string{corev1.LabelOSStable: "linux"}},
		Status:     corev1.NodeStatus{NodeInfo: corev1.NodeSystemInfo{KubeletVersion: "v1.35.1", ContainerRuntimeVersion: "containerd://2.2.0"}},
	}
	ns := namespace(testNS, ssiLabels())
	ns.Annotations = map[string]string{annotations.InjectionMode: "auto"}
	for _, tt := range []struct {
		name    string
		version string
		mode    string
		status  string
	}{
		{"image volumes served", "v1.35.1", "image-volume", "auto mode (namespace annotation apm-csi.io/injection-mode) chose image-volume"},
		{"API server version not read yet", "", "init-container", "image volumes cannot be used: the API server version is not known yet"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := newHandler(t, []client.Object{ns, node}, nil)
			h.ServerVersion = func() string { return tt.version }
			before := counter("injected", tt.mode)
			req := request(t, typicalPod(), admissionv1.Create, nil)
			pod := decodePod(t, applyPatch(t, req, h.Handle(context.Background(), req)))
			if s := pod.Annotations[annotations.InjectionStatus]; !strings.HasPrefix(s, "injected: "+tt.mode+" mode") || !strings.Contains(s, tt.status) {
				t.Errorf("status = %q", s)
			}
			if got := counter("injected", tt.mode) - before; got != 1 {
				t.Errorf("mutations_total{injected,%s} grew by %v", tt.mode, got)
			}
		})
	}
}
