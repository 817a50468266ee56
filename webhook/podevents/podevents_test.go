package podevents

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	clocktesting "k8s.io/utils/clock/testing"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/apm-csi/apm-csi/webhook/annotations"
)

func TestDerive(t *testing.T) {
	long := strings.Repeat("x", 2000)
	for _, tt := range []struct {
		status string
		want   Derived
		ok     bool
	}{
		{"injected: csi mode, injector layout, containers app", Derived{corev1.EventTypeNormal, ReasonInjected, "csi mode, injector layout, containers app"}, true},
		{"injected: init-container mode, auto mode (namespace annotation apm-csi.io/injection-mode) chose init-container: CSI driver csi.apm-csi.io is not installed; image volumes cannot be used: node n2 runs containerd 2.1.4",
			Derived{corev1.EventTypeNormal, ReasonInjected, "init-container mode, auto mode (namespace annotation apm-csi.io/injection-mode) chose init-container: CSI driver csi.apm-csi.io is not installed; image volumes cannot be used: node n2 runs containerd 2.1.4"}, true},
		{"injected: csi mode, replaced init containers datadog-lib-java-init by CSI volume apm-csi-libraries", Derived{corev1.EventTypeNormal, ReasonRewritten, "csi mode, replaced init containers datadog-lib-java-init by CSI volume apm-csi-libraries"}, true},
		{"skipped: Windows pods cannot load the Linux tracer libraries (nodeSelector kubernetes.io/os=windows)", Derived{corev1.EventTypeWarning, ReasonSkipped, "Windows pods cannot load the Linux tracer libraries (nodeSelector kubernetes.io/os=windows)"}, true},
		{"error: namespace shop could not be read", Derived{corev1.EventTypeWarning, ReasonError, "namespace shop could not be read"}, true},
		{"injected: " + long, Derived{corev1.EventTypeNormal, ReasonInjected, long[:maxNote-3] + "..."}, true},
		{"", Derived{}, false},
		{"done by hand", Derived{}, false},
	} {
		got, ok := Derive(tt.status)
		if ok != tt.ok || got != tt.want {
			t.Errorf("Derive(%.60q) = %+v, %v; want %+v, %v", tt.status, got, ok, tt.want, tt.ok)
		}
	}
}

func TestEventNameIsStableValidAndPerIncarnation(t *testing.T) {
	pod := func(name, uid string) *metav1.PartialObjectMetadata {
		return &metav1.PartialObjectMetadata{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID(uid)}}
	}
	a := EventName(pod("web-0", "0b1c2d3e-0000-4000-8000-000000000001"))
	if a != EventName(pod("web-0", "0b1c2d3e-0000-4000-8000-000000000001")) {
		t.Error("the name must be the same for every replica and restart")
	}
	if a == EventName(pod("web-0", "0b1c2d3e-0000-4000-8000-000000000002")) {
		t.Error("a pod of the same name created again needs its own Event")
	}
	long := strings.Repeat("a", 240) + "-" + strings.Repeat("b", 12)
	for _, n := range []string{a, EventName(pod(long, "0b1c2d3e-0000-4000-8000-000000000001"))} {
		if errs := validation.IsDNS1123Subdomain(n); len(errs) > 0 {
			t.Errorf("event name %q is not a valid object name: %v", n, errs)
		}
	}
}

func TestCacheTransformKeepsOnlyWhatTheRecorderReads(t *testing.T) {
	created := metav1.NewTime(time.Unix(1_700_000_000, 0))
	in := &metav1.PartialObjectMetadata{ObjectMeta: metav1.ObjectMeta{
		Name: "web", Namespace: "shop", UID: "u1", ResourceVersion: "7", CreationTimestamp: created,
		Labels:          map[string]string{"app": "web"},
		Annotations:     map[string]string{annotations.InjectionStatus: "injected: csi mode", "kubectl.kubernetes.io/last-applied-configuration": strings.Repeat("{}", 500)},
		OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-1"}},
		ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "kubectl"}},
	}}
	out, err := CacheTransform(in)
	if err != nil {
		t.Fatal(err)
	}
	got := out.(*metav1.PartialObjectMetadata)
	if got.Name != "web" || got.Namespace != "shop" || got.UID != "u1" || got.ResourceVersion != "7" || !got.CreationTimestamp.Equal(&created) {
		t.Errorf("identity lost: %+v", got.ObjectMeta)
	}
	if len(got.Annotations) != 1 || got.Annotations[annotations.InjectionStatus] != "injected: csi mode" {
		t.Errorf("annotations = %v; only the status is kept", got.Annotations)
	}
	if got.Labels != nil || got.OwnerReferences != nil || got.ManagedFields != nil {
		t.Errorf("kept more than needed: %+v", got.ObjectMeta)
	}
	in.Annotations = map[string]string{"other": "x"}
	out, _ = CacheTransform(in)
	if a := out.(*metav1.PartialObjectMetadata).Annotations; a != nil {
		t.Errorf("a pod without status keeps no annotation; got %v", a)
	}
}

func newRecorder(t *testing.T, now time.Time, pods ...*corev1.Pod) (*Recorder, client.Client) {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	b := fake.NewClientBuilder().WithScheme(s)
	for _, p := range pods {
		b = b.WithObjects(p)
	}
	c := b.Build()
	return &Recorder{Client: c, Instance: "apm-csi-webhook-0", Window: DefaultWindow, Clock: clocktesting.NewFakePassiveClock(now), Log: slog.New(slog.DiscardHandler)}, c
}

func storedPod(name, status string, created time.Time) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, UID: types.UID("uid-" + name), CreationTimestamp: metav1.NewTime(created)}}
	if status != "" {
		p.Annotations = map[string]string{annotations.InjectionStatus: status}
	}
	return p
}

func events(t *testing.T, c client.Client) []eventsv1.Event {
	t.Helper()
	var list eventsv1.EventList
	if err := c.List(context.Background(), &list, client.InNamespace("shop")); err != nil {
		t.Fatal(err)
	}
	return list.Items
}

func TestReconcileRecordsOnceFromTheStoredStatus(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	r, c := newRecorder(t, now,
		storedPod("injected", "injected: csi mode, injector layout", now.Add(-time.Minute)),
		storedPod("unmutated", "", now.Add(-time.Minute)),
		storedPod("old", "injected: csi mode", now.Add(-DefaultWindow-time.Second)),
		storedPod("foreign", "whatever someone wrote", now.Add(-time.Minute)),
	)
	ctx := context.Background()
	for _, name := range []string{"injected", "unmutated", "old", "foreign", "deleted"} {
		for range 2 { // the second pass is another replica, or this one after a restart
			if _, err := r.Reconcile(ctx, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: "shop", Name: name}}); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}
	}
	evs := events(t, c)
	if len(evs) != 1 {
		t.Fatalf("want exactly one Event (the injected pod's, once), got %d: %+v", len(evs), evs)
	}
	e := evs[0]
	if e.Regarding.Kind != "Pod" || e.Regarding.Name != "injected" || e.Regarding.UID != "uid-injected" || e.Reason != ReasonInjected ||
		e.Type != corev1.EventTypeNormal || e.Note != "csi mode, injector layout" || e.Action != Action ||
		e.ReportingController != ReportingController || e.ReportingInstance != "apm-csi-webhook-0" || !e.EventTime.Time.Equal(now) {
		t.Errorf("event = %+v", e)
	}
}

func TestDueOnlyForStatusWithinTheWindow(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	r, _ := newRecorder(t, now)
	for _, tt := range []struct {
		pod  *corev1.Pod
		want bool
	}{
		{storedPod("new", "skipped: no container to instrument", now.Add(-time.Second)), true},
		{storedPod("edge", "error: x", now.Add(-DefaultWindow)), true},
		{storedPod("late", "error: x", now.Add(-DefaultWindow-time.Millisecond)), false},
		{storedPod("none", "", now), false},
	} {
		if got := r.due(tt.pod); got != tt.want {
			t.Errorf("due(%s) = %v, want %v", tt.pod.Name, got, tt.want)
		}
	}
}
