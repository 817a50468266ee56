package drift

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	clocktesting "k8s.io/utils/clock/testing"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/apm-csi/apm-csi/webhook/admission"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/mutation"
)

var start = time.Date(2026, 12, 5, 22, 0, 0, 0, time.UTC)

type fixture struct {
	t     *testing.T
	c     client.Client
	clock *clocktesting.FakeClock
	r     *Reconciler
}

func ssiNS(name string, ann map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{config.DefaultSSINamespaceLabel: "enabled"}, Annotations: ann}}
}

func newFixture(t *testing.T, cfg func(*config.Config), funcs *interceptor.Funcs, objs ...client.Object) *fixture {
	t.Helper()
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	b := fake.NewClientBuilder().WithScheme(scheme).WithObjects(objs...)
	if funcs != nil {
		b = b.WithInterceptorFuncs(*funcs)
	}
	c := b.Build()
	wcfg := config.Default()
	wcfg.Drift.RestartInterval = metav1.Duration{Duration: time.Minute}
	if cfg != nil {
		cfg(wcfg)
	}
	clk := clocktesting.NewFakeClock(start)
	pm := &admission.PodMutator{Mutator: mutation.New(wcfg, "apm-csi-system"), Reader: c, Log: slog.New(slog.DiscardHandler), Now: clk.Now}
	r := &Reconciler{Client: c, APIReader: c, Decider: pm, Clock: clk, Log: slog.New(slog.DiscardHandler), Instance: "replica-1",
		LeaseNamespace: "apm-csi-system", drifting: map[types.NamespacedName]struct{}{}, perNS: map[string]int{}}
	return &fixture{t: t, c: c, clock: clk, r: r}
}

func (f *fixture) reconcile(ns, name string) reconcile.Result {
	f.t.Helper()
	res, err := f.r.Reconcile(context.Background(), reconcile.Request{NamespacedName: types.NamespacedName{Namespace: ns, Name: name}})
	if err != nil {
		f.t.Fatalf("reconcile %s/%s: %v", ns, name, err)
	}
	return res
}

func (f *fixture) events(ns string) []eventsv1.Event {
	f.t.Helper()
	var list eventsv1.EventList
	if err := f.c.List(context.Background(), &list, client.InNamespace(ns)); err != nil {
		f.t.Fatal(err)
	}
	return list.Items
}

func (f *fixture) restartedAt(obj client.Object) string {
	f.t.Helper()
	if err := f.c.Get(context.Background(), client.ObjectKeyFromObject(obj), obj); err != nil {
		f.t.Fatal(err)
	}
	switch o := obj.(type) {
	case *appsv1.Deployment:
		return o.Spec.Template.Annotations[RestartedAtAnnotation]
	case *appsv1.StatefulSet:
		return o.Spec.Template.Annotations[RestartedAtAnnotation]
	case *appsv1.DaemonSet:
		return o.Spec.Template.Annotations[RestartedAtAnnotation]
	}
	return ""
}

func appPod(ns, name string, created time.Time, owner *metav1.OwnerReference, labels, ann map[string]string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name), Labels: labels, Annotations: ann,
			CreationTimestamp: metav1.NewTime(created)},
		Spec:   corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "registry.example.com/web:1"}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning},
	}
	if owner != nil {
		p.OwnerReferences = []metav1.OwnerReference{*owner}
	}
	return p
}

func controllerRef(kind, name string) *metav1.OwnerReference {
	return &metav1.OwnerReference{APIVersion: "apps/v1", Kind: kind, Name: name, UID: types.UID("uid-" + name), Controller: new(true)}
}

func deployment(ns, name string) (*appsv1.Deployment, *appsv1.ReplicaSet) {
	d := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name)},
		Spec: appsv1.DeploymentSpec{Replicas: new(int32(1))}}
	rs := &appsv1.ReplicaSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name + "-5d8f7", UID: types.UID("uid-" + name + "-5d8f7"),
		OwnerReferences: []metav1.OwnerReference{*controllerRef("Deployment", name)}}}
	return d, rs
}

func gauge(t *testing.T, ns string) float64 {
	t.Helper()
	var m dto.Metric
	if err := uninstrumentedPods.WithLabelValues(ns).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetGauge().GetValue()
}

// TestUninstrumentedPodsAreReportedNotSkippedOnes: a pod the webhook would instrument but
// that has no status gets one NotInstrumented Event and counts in the gauge; the pods the
// mutator leaves alone (a status already there, opted out, Windows, mirror, an unselected
// namespace, finished) do not.
func TestUninstrumentedPodsAreReportedNotSkippedOnes(t *testing.T) {
	d, rs := deployment("shop", "web")
	windows := appPod("shop", "windows", start, nil, nil, nil)
	windows.Spec.NodeSelector = map[string]string{corev1.LabelOSStable: "windows"}
	done := appPod("shop", "done", start, nil, nil, nil)
	done.Status.Phase = corev1.PodSucceeded
	f := newFixture(t, nil, nil, ssiNS("shop", nil), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "plain"}}, d, rs,
		appPod("shop", "web-5d8f7-abcde", start, controllerRef("ReplicaSet", "web-5d8f7"), map[string]string{appsv1.DefaultDeploymentUniqueLabelKey: "5d8f7"}, nil),
		appPod("shop", "admitted", start, nil, nil, map[string]string{annotations.InjectionStatus: "injected: csi mode"}),
		appPod("shop", "skipped", start, nil, nil, map[string]string{annotations.InjectionStatus: "skipped: no container to instrument"}),
		appPod("shop", "opted-out", start, nil, map[string]string{annotations.DatadogEnabled: "false"}, nil),
		appPod("shop", "mirror", start, nil, nil, map[string]string{corev1.MirrorPodAnnotationKey: "x"}),
		appPod("plain", "ordinary", start, nil, nil, nil),
		windows, done,
	)
	for _, p := range []string{"admitted", "skipped", "opted-out", "mirror", "windows", "done"} {
		f.reconcile("shop", p)
	}
	f.reconcile("plain", "ordinary")
	if n := f.r.Drifting("shop") + f.r.Drifting("plain"); n != 0 {
		t.Fatalf("%d pods counted as uninstrumented; none of these is", n)
	}
	if evs := f.events("shop"); len(evs) != 0 {
		t.Fatalf("Events for pods that are not drift: %+v", evs)
	}

	f.reconcile("shop", "web-5d8f7-abcde")
	f.reconcile("shop", "web-5d8f7-abcde") // seen again: still one pod, one Event
	if got := gauge(t, "shop"); got != 1 || f.r.Drifting("shop") != 1 {
		t.Errorf("gauge %v, counted %d; want 1", got, f.r.Drifting("shop"))
	}
	evs := f.events("shop")
	if len(evs) != 1 || evs[0].Reason != ReasonNotInstrumented || evs[0].Type != corev1.EventTypeWarning || evs[0].Regarding.Name != "web-5d8f7-abcde" {
		t.Fatalf("want one NotInstrumented Warning about the pod, got %+v", evs)
	}
	if !strings.Contains(evs[0].Note, "kubectl rollout restart deployment/web -n shop") || !strings.Contains(evs[0].Note, RestartAnnotation+"=true") {
		t.Errorf("the Event must say how to fix it: %q", evs[0].Note)
	}
	if f.restartedAt(d) != "" {
		t.Error("restarts are opt-in: the Deployment must not be restarted")
	}

	// The pod goes away: the gauge's namespace is no longer exported.
	if err := f.c.Delete(context.Background(), appPod("shop", "web-5d8f7-abcde", start, nil, nil, nil)); err != nil {
		t.Fatal(err)
	}
	f.reconcile("shop", "web-5d8f7-abcde")
	if f.r.Drifting("shop") != 0 {
		t.Error("a deleted pod still counts")
	}
}

// TestOwnerRestartsAreOptInRateLimitedAndOneAtATime: with the namespace opt-in, the
// Deployment of an uninstrumented pod is restarted once (its pod template gets restartedAt);
// another uninstrumented pod of the same Deployment does not restart it again; a second
// owner waits for the interval and for the first rollout to finish; bare pods and Jobs' pods
// are never restarted.
func TestOwnerRestartsAreOptInRateLimitedAndOneAtATime(t *testing.T) {
	d, rs := deployment("shop", "web")
	sts := &appsv1.StatefulSet{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "db", UID: "uid-db", Generation: 1}}
	job := &metav1.OwnerReference{APIVersion: "batch/v1", Kind: "Job", Name: "migrate", UID: "uid-migrate", Controller: new(true)}
	f := newFixture(t, nil, nil, ssiNS("shop", map[string]string{RestartAnnotation: "true"}), d, rs, sts,
		appPod("shop", "web-1", start, controllerRef("ReplicaSet", rs.Name), nil, nil),
		appPod("shop", "web-2", start, controllerRef("ReplicaSet", rs.Name), nil, nil),
		appPod("shop", "db-0", start, controllerRef("StatefulSet", "db"), nil, nil),
		appPod("shop", "bare", start, nil, nil, nil),
		appPod("shop", "migrate-x", start, job, nil, nil),
	)
	f.clock.Step(time.Second)
	f.reconcile("shop", "web-1")
	first := f.restartedAt(d)
	if first != start.Add(time.Second).Format(time.RFC3339) {
		t.Fatalf("Deployment restartedAt = %q, want the clock's time", first)
	}
	f.clock.Step(2 * time.Minute)
	f.reconcile("shop", "web-2")
	if got := f.restartedAt(d); got != first {
		t.Errorf("restarted again for its second pod: %q", got)
	}

	// The StatefulSet: the interval has passed, but the Deployment's rollout has not finished.
	res := f.reconcile("shop", "db-0")
	if f.restartedAt(sts) != "" || res.RequeueAfter <= 0 {
		t.Fatalf("a second owner must wait for the first rollout (requeue %v)", res.RequeueAfter)
	}
	d.Status = appsv1.DeploymentStatus{ObservedGeneration: d.Generation, Replicas: 1, UpdatedReplicas: 1, AvailableReplicas: 1}
	if err := f.c.Status().Update(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	f.reconcile("shop", "db-0")
	if f.restartedAt(sts) == "" {
		t.Fatal("the StatefulSet must be restarted once the Deployment rolled out")
	}

	for _, p := range []string{"bare", "migrate-x"} {
		f.clock.Step(time.Hour)
		f.reconcile("shop", p)
	}
	var restarted []string
	for _, e := range f.events("shop") {
		if e.Reason == ReasonOwnerRestarted {
			restarted = append(restarted, e.Regarding.Kind+"/"+e.Regarding.Name)
		}
	}
	if strings.Join(restarted, ",") != "Deployment/web,StatefulSet/db" && strings.Join(restarted, ",") != "StatefulSet/db,Deployment/web" {
		t.Errorf("restart Events %v; want one for the Deployment and one for the StatefulSet", restarted)
	}
}

// twoOwnersFixture restarts owners and holds, in namespace shop, an uninstrumented pod of a
// DaemonSet (agent-x) and one of a StatefulSet (db-0); it returns the fixture and the owners.
func twoOwnersFixture(t *testing.T) (*fixture, *appsv1.DaemonSet, *appsv1.StatefulSet) {
	t.Helper()
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "agent", UID: "uid-agent"}}
	sts := &appsv1.StatefulSet{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "db", UID: "uid-db"}}
	f := newFixture(t, func(c *config.Config) { c.Drift.RestartOwners = true }, nil, ssiNS("shop", nil), ds, sts,
		appPod("shop", "agent-x", start, controllerRef("DaemonSet", "agent"), nil, nil),
		appPod("shop", "db-0", start, controllerRef("StatefulSet", "db"), nil, nil),
	)
	return f, ds, sts
}

// TestSecondOwnerWaitsForTheInterval: the rate limit holds a second restart back until the
// interval has passed, even when the first rollout is done; the clock is advanced, not slept.
func TestSecondOwnerWaitsForTheInterval(t *testing.T) {
	f, ds, sts := twoOwnersFixture(t)
	f.clock.Step(time.Second)
	f.reconcile("shop", "agent-x")
	if f.restartedAt(ds) == "" {
		t.Fatal("the configuration's restartOwners must restart the DaemonSet")
	}
	res := f.reconcile("shop", "db-0")
	if f.restartedAt(sts) != "" || res.RequeueAfter != time.Minute {
		t.Fatalf("second owner restarted within the interval (requeue %v)", res.RequeueAfter)
	}
	f.clock.Step(time.Minute)
	f.reconcile("shop", "db-0")
	if f.restartedAt(sts) == "" {
		t.Error("after the interval the second owner must be restarted")
	}
}

// TestRestartWithoutRightsIsRefusedClearly: when the API server forbids the patch, the pod
// gets a RestartRefused Event naming the Helm value, and nothing else happens.
func TestRestartWithoutRightsIsRefusedClearly(t *testing.T) {
	d, rs := deployment("shop", "web")
	forbid := &interceptor.Funcs{Patch: func(ctx context.Context, c client.WithWatch, obj client.Object, patch client.Patch, opts ...client.PatchOption) error {
		return apierrors.NewForbidden(schema.GroupResource{Group: "apps", Resource: "deployments"}, obj.GetName(), nil)
	}}
	f := newFixture(t, nil, forbid, ssiNS("shop", map[string]string{RestartAnnotation: "true"}), d, rs,
		appPod("shop", "web-1", start, controllerRef("ReplicaSet", rs.Name), nil, nil))
	res := f.reconcile("shop", "web-1")
	var refused *eventsv1.Event
	for _, e := range f.events("shop") {
		if e.Reason == ReasonRestartRefused {
			refused = &e
		}
	}
	if refused == nil || !strings.Contains(refused.Note, "webhook.drift.allowRestarts=true") || refused.Regarding.Name != "web-1" {
		t.Fatalf("want a RestartRefused Event on the pod naming the Helm value, got %+v", f.events("shop"))
	}
	if res.RequeueAfter <= 0 {
		t.Error("a refused restart is tried again later (rights may be granted)")
	}
}

// TestNamespaceAnnotationTurnsRestartsOff: "false" on the namespace wins over the configuration.
func TestNamespaceAnnotationTurnsRestartsOff(t *testing.T) {
	sts := &appsv1.StatefulSet{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "db", UID: "uid-db"}}
	f := newFixture(t, func(c *config.Config) { c.Drift.RestartOwners = true }, nil, ssiNS("shop", map[string]string{RestartAnnotation: "false"}), sts,
		appPod("shop", "db-0", start, controllerRef("StatefulSet", "db"), nil, nil))
	f.reconcile("shop", "db-0")
	if f.restartedAt(sts) != "" {
		t.Error("restarted although the namespace turned restarts off")
	}
	if f.r.Drifting("shop") != 1 {
		t.Error("the pod is still reported")
	}
}

// replica is another webhook replica's check, on the same API server and clock.
func (f *fixture) replica(name string) *Reconciler {
	return &Reconciler{Client: f.r.Client, APIReader: f.r.APIReader, Decider: f.r.Decider, Clock: f.r.Clock, Log: f.r.Log,
		Instance: name, LeaseNamespace: f.r.LeaseNamespace, drifting: map[types.NamespacedName]struct{}{}, perNS: map[string]int{}}
}

// TestReplicasTakeTurnsThroughTheLease: two replicas each find an uninstrumented pod of a
// different owner at the same time; only one owner is restarted within the interval, the
// other once the interval has passed, and the Lease names the last one.
func TestReplicasTakeTurnsThroughTheLease(t *testing.T) {
	f, ds, sts := twoOwnersFixture(t)
	other := f.replica("replica-2")
	f.clock.Step(time.Second)
	f.reconcile("shop", "agent-x")
	res, err := other.Reconcile(context.Background(), reconcile.Request{NamespacedName: types.NamespacedName{Namespace: "shop", Name: "db-0"}})
	if err != nil {
		t.Fatal(err)
	}
	if f.restartedAt(ds) == "" || f.restartedAt(sts) != "" || res.RequeueAfter <= 0 {
		t.Fatalf("want only the DaemonSet restarted within the interval (StatefulSet %q, requeue %v)", f.restartedAt(sts), res.RequeueAfter)
	}
	f.clock.Step(time.Minute)
	if _, err := other.Reconcile(context.Background(), reconcile.Request{NamespacedName: types.NamespacedName{Namespace: "shop", Name: "db-0"}}); err != nil {
		t.Fatal(err)
	}
	if f.restartedAt(sts) == "" {
		t.Fatal("after the interval the other replica restarts the StatefulSet")
	}
	lease := &coordinationv1.Lease{}
	if err := f.c.Get(context.Background(), types.NamespacedName{Namespace: "apm-csi-system", Name: LeaseName}, lease); err != nil {
		t.Fatal(err)
	}
	if lease.Annotations[leaseOwnerAnnotation] != "StatefulSet/shop/db" || *lease.Spec.HolderIdentity != "replica-2" {
		t.Errorf("lease %v held by %s", lease.Annotations, *lease.Spec.HolderIdentity)
	}
}

// TestNoRestartBeforeTheWebhookIsReachable: a replica that the API server has not reached yet
// reports the pod but does not restart its owner (its new pods would be uninstrumented again).
func TestNoRestartBeforeTheWebhookIsReachable(t *testing.T) {
	sts := &appsv1.StatefulSet{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "db", UID: "uid-db"}}
	f := newFixture(t, func(c *config.Config) { c.Drift.RestartOwners = true }, nil, ssiNS("shop", nil), sts,
		appPod("shop", "db-0", start, controllerRef("StatefulSet", "db"), nil, nil))
	reachable := false
	f.r.Reachable = func() bool { return reachable }
	if res := f.reconcile("shop", "db-0"); res.RequeueAfter <= 0 || f.restartedAt(sts) != "" {
		t.Fatalf("restarted (or not retried: %v) before the webhook was reachable", res.RequeueAfter)
	}
	if f.r.Drifting("shop") != 1 {
		t.Error("the pod must be reported meanwhile")
	}
	reachable = true
	f.reconcile("shop", "db-0")
	if f.restartedAt(sts) == "" {
		t.Error("once reachable, the owner is restarted")
	}
}
