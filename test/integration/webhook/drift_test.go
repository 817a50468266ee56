package webhook_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/drift"
)

// uninstrumentedGauge reads apm_csi_webhook_uninstrumented_pods{namespace} (0 when the
// namespace is not exported).
func uninstrumentedGauge(tb testing.TB, ns string) float64 {
	tb.Helper()
	m, ok := webhookMetric(tb, "apm_csi_webhook_uninstrumented_pods", "namespace", ns)
	if !ok {
		return 0
	}
	return m.GetGauge().GetValue()
}

// eventsWithReason lists the Events of a namespace with a reason, by the object they regard.
func (h *harness) eventsWithReason(tb testing.TB, ns, reason string) map[string]eventsv1.Event {
	tb.Helper()
	var list eventsv1.EventList
	if err := h.client.List(context.Background(), &list, client.InNamespace(ns)); err != nil {
		tb.Fatal(err)
	}
	out := map[string]eventsv1.Event{}
	for _, e := range list.Items {
		if e.Reason == reason {
			out[e.Regarding.Kind+"/"+e.Regarding.Name] = e
		}
	}
	return out
}

// ownedPod is a pod as the ReplicaSet controller creates it from the Deployment's template.
func ownedPod(ns, name string, rs *appsv1.ReplicaSet) *corev1.Pod {
	p := pod(ns, name, map[string]string{"app": "web", appsv1.DefaultDeploymentUniqueLabelKey: "6b7c9"}, nil)
	p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: rs.Name, UID: rs.UID, Controller: new(true)}}
	return p
}

// TestPodsCreatedWhileTheWebhookWasDownAreNoticed: the webhook is stopped, pods of a
// Deployment and a bare pod are created in an SSI namespace (admitted unmutated:
// failurePolicy Ignore), the webhook starts again: each pod gets a NotInstrumented Event, the
// gauge counts them, and with the namespace's opt-in the Deployment (and only it) is
// restarted once; a pod created from its template afterwards is instrumented. A pod of a
// namespace selected after the pod was created is noticed too.
func TestPodsCreatedWhileTheWebhookWasDownAreNoticed(t *testing.T) {
	h := startHarnessWith(t, harnessOptions{config: func(c *config.Config) {
		c.Drift.RestartInterval = metav1.Duration{Duration: time.Second}
	}})
	h.setDriver(t, true)
	h.namespace(t, "down", map[string]string{"apm-csi.io/ssi": "enabled"}, map[string]string{drift.RestartAnnotation: "true"})
	h.namespace(t, "later", nil, nil)
	// Where the replicas' Lease for taking turns lives.
	h.namespace(t, "apm-csi-system", nil, nil)
	ctx := context.Background()

	// A pod in a namespace that is not selected yet: not the webhook's (no status).
	early := h.create(t, pod("later", "early", nil, nil))
	assertUnmutated(t, early)

	h.shutdown(t)
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: "down", Name: "web"},
		Spec: appsv1.DeploymentSpec{
			Replicas: new(int32(2)),
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "web"}},
				Spec: pod("", "", nil, nil).Spec},
		},
	}
	if err := h.client.Create(ctx, d); err != nil {
		t.Fatal(err)
	}
	rs := &appsv1.ReplicaSet{
		ObjectMeta: metav1.ObjectMeta{Namespace: "down", Name: "web-6b7c9",
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "Deployment", Name: d.Name, UID: d.UID, Controller: new(true)}}},
		Spec: appsv1.ReplicaSetSpec{Selector: d.Spec.Selector, Template: d.Spec.Template},
	}
	if err := h.client.Create(ctx, rs); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		assertUnmutated(t, h.create(t, ownedPod("down", fmt.Sprintf("web-6b7c9-%d", i), rs)))
	}
	assertUnmutated(t, h.create(t, pod("down", "bare", nil, nil)))

	h.startWebhook(t)
	// The API server reaches the webhook again: a pod created now is instrumented (owners are
	// restarted only once the webhook has seen such a request).
	assertCSIInjected(t, h.create(t, pod("down", "probe", nil, nil)))
	h.eventually(t, "a NotInstrumented Event on each pod and the gauge at 3", func() bool {
		return len(h.eventsWithReason(t, "down", drift.ReasonNotInstrumented)) == 3 && uninstrumentedGauge(t, "down") == 3
	})
	h.eventually(t, "the Deployment restarted", func() bool {
		if err := h.client.Get(ctx, client.ObjectKeyFromObject(d), d); err != nil {
			t.Fatal(err)
		}
		return d.Spec.Template.Annotations[drift.RestartedAtAnnotation] != ""
	})
	if d.Generation != 2 {
		t.Errorf("Deployment generation %d: want one restart (2)", d.Generation)
	}
	if ev, ok := h.eventsWithReason(t, "down", drift.ReasonOwnerRestarted)["Deployment/web"]; !ok || ev.Type != corev1.EventTypeNormal {
		t.Errorf("want a Normal %s Event on the Deployment, got %+v", drift.ReasonOwnerRestarted, h.eventsWithReason(t, "down", drift.ReasonOwnerRestarted))
	}

	// The rollout, as the controllers would do it: the old pods go, a new one is created from
	// the restarted template and the webhook instruments it.
	for i := range 2 {
		if err := h.client.Delete(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "down", Name: fmt.Sprintf("web-6b7c9-%d", i)}}); err != nil {
			t.Fatal(err)
		}
	}
	next := ownedPod("down", "web-6b7c9-new", rs)
	next.Spec = d.Spec.Template.Spec
	assertCSIInjected(t, h.create(t, next))
	h.eventually(t, "the gauge back to the bare pod only", func() bool { return uninstrumentedGauge(t, "down") == 1 })
	if err := h.client.Get(ctx, client.ObjectKeyFromObject(d), d); err != nil {
		t.Fatal(err)
	}
	if d.Generation != 2 {
		t.Errorf("the Deployment was restarted again (generation %d)", d.Generation)
	}

	// The namespace is selected after its pod was created.
	ns := &corev1.Namespace{}
	if err := h.client.Get(ctx, client.ObjectKey{Name: "later"}, ns); err != nil {
		t.Fatal(err)
	}
	ns.Labels["apm-csi.io/ssi"] = "enabled"
	if err := h.client.Update(ctx, ns); err != nil {
		t.Fatal(err)
	}
	h.eventually(t, "the early pod noticed once its namespace is selected", func() bool {
		_, ok := h.eventsWithReason(t, "later", drift.ReasonNotInstrumented)["Pod/early"]
		return ok && uninstrumentedGauge(t, "later") == 1
	})
}
