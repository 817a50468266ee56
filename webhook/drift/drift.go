// Package drift finds pods that the webhook should have instrumented but did not: pods created
// while it was not answering (scaled to zero, evicted, too slow for the API server's timeout:
// failurePolicy Ignore admits them as sent) or before their namespace was selected. Admission
// cannot see them afterwards, so a small controller looks at the stored pods.
//
// A stored pod is drift when the webhook, deciding about it now with the same code admission
// uses (admission.PodMutator.Decide: the same mutator, namespace, driver and nodes), would
// instrument it (outcome injected or rewritten). A pod the webhook decided about carries the
// status annotation (every deliberate skip included) and is never drift; mirror pods, excluded
// namespaces and opted-out pods are ruled out by the mutator's own rules (MayInstrument) from
// the cached metadata, before the pod's spec is read. Finished pods are not drift.
//
// Each drifting pod gets one Warning Event (NotInstrumented) and counts in the gauge
// apm_csi_webhook_uninstrumented_pods{namespace}. Opt-in (configuration drift.restartOwners,
// or the namespace annotation apm-csi.io/restart-uninstrumented), the owning Deployment,
// StatefulSet or DaemonSet is restarted the way kubectl rollout restart does it: one owner at
// a time across all replicas (they take turns through a Lease), at most one per
// drift.restartInterval, never a bare pod or a Job's.
package drift

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/webhook/mutation"
	"github.com/apm-csi/apm-csi/webhook/podevents"
)

// Event reasons.
const (
	ReasonNotInstrumented = "NotInstrumented"
	ReasonOwnerRestarted  = "RestartedForInstrumentation"
	ReasonRestartRefused  = "RestartRefused"
)

// RestartAnnotation on a namespace turns owner restarts on ("true") or off ("false") there,
// whatever the configuration's drift.restartOwners says.
const RestartAnnotation = names.Prefix + "restart-uninstrumented"

// RestartedAtAnnotation is the pod template annotation kubectl rollout restart sets.
const RestartedAtAnnotation = "kubectl.kubernetes.io/restartedAt"

// maxRolloutWait is how long the next restart waits for the previous owner's rollout to
// finish before going on anyway (a rollout that never completes must not stop every other).
const maxRolloutWait = 10 * time.Minute

// Decider decides about a pod as admission would (admission.PodMutator.Decide).
type Decider interface {
	Decide(ctx context.Context, pod *corev1.Pod) mutation.Result
	CurrentMutator() *mutation.Mutator
}

// Reconciler is the controller. One worker: restarts are serialised.
type Reconciler struct {
	// Client reads cached pod metadata and namespaces, and writes Events and restarts.
	Client client.Client
	// APIReader reads a candidate pod whole, and the owners (never cached).
	APIReader client.Reader
	Decider   Decider
	Clock     clock.Clock
	Log       *slog.Logger
	// Instance is the reporting instance of the Events and the Lease holder; default the host
	// name.
	Instance string
	// Reachable, when set, says whether the API server reaches this webhook now; owners are
	// restarted only then, or their new pods would be admitted uninstrumented again.
	Reachable func() bool
	// LeaseNamespace holds the Lease through which replicas take turns restarting owners (the
	// webhook's namespace).
	LeaseNamespace string

	mu sync.Mutex
	// drifting are the pods counted in the gauge.
	drifting map[types.NamespacedName]struct{}
	perNS    map[string]int
}

// SetupWithManager watches pods (metadata, through the webhook's shared pod cache) and
// namespaces: a pod is checked when it appears (also when the webhook starts and lists every
// pod) and when its labels or annotations change; every pod of a namespace is checked again
// when the namespace's labels or annotations change (a namespace selected afterwards).
func (r *Reconciler) SetupWithManager(mgr manager.Manager) error {
	if r.Clock == nil {
		r.Clock = clock.RealClock{}
	}
	if r.Log == nil {
		r.Log = slog.Default()
	}
	if r.Instance == "" {
		r.Instance, _ = os.Hostname()
	}
	if r.Instance == "" {
		r.Instance = names.WebhookBinary
	}
	r.drifting = map[types.NamespacedName]struct{}{}
	r.perNS = map[string]int{}
	skip := true
	metaChanged := predicate.Or(predicate.LabelChangedPredicate{}, predicate.AnnotationChangedPredicate{})
	return ctrl.NewControllerManagedBy(mgr).
		Named("uninstrumented-pods").
		For(&corev1.Pod{}, builder.OnlyMetadata, builder.WithPredicates(predicate.Funcs{
			CreateFunc:  func(event.CreateEvent) bool { return true },
			UpdateFunc:  metaChanged.Update,
			DeleteFunc:  func(event.DeleteEvent) bool { return true },
			GenericFunc: func(event.GenericEvent) bool { return false },
		})).
		Watches(&corev1.Namespace{}, handler.EnqueueRequestsFromMapFunc(r.podsOf), builder.WithPredicates(predicate.Funcs{
			CreateFunc:  func(event.CreateEvent) bool { return false },
			UpdateFunc:  metaChanged.Update,
			DeleteFunc:  func(event.DeleteEvent) bool { return false },
			GenericFunc: func(event.GenericEvent) bool { return false },
		})).
		WithOptions(controller.Options{MaxConcurrentReconciles: 1, SkipNameValidation: &skip}).
		Complete(r)
}

// podsOf lists a namespace's pods from the cache.
func (r *Reconciler) podsOf(ctx context.Context, ns client.Object) []reconcile.Request {
	var list metav1.PartialObjectMetadataList
	list.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("PodList"))
	if err := r.Client.List(ctx, &list, client.InNamespace(ns.GetName())); err != nil {
		r.Log.Warn("cannot list the namespace's pods for the uninstrumented-pod check", "namespace", ns.GetName(), "err", err)
		return nil
	}
	out := make([]reconcile.Request, 0, len(list.Items))
	for _, p := range list.Items {
		out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: p.Namespace, Name: p.Name}})
	}
	return out
}

// Reconcile checks one pod.
func (r *Reconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	meta := &metav1.PartialObjectMetadata{}
	meta.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Pod"))
	if err := r.Client.Get(ctx, req.NamespacedName, meta); err != nil {
		if apierrors.IsNotFound(err) {
			r.forget(req.NamespacedName)
			return reconcile.Result{}, nil
		}
		return reconcile.Result{}, err
	}
	ns := &corev1.Namespace{}
	if err := r.Client.Get(ctx, client.ObjectKey{Name: req.Namespace}, ns); err != nil {
		ns = nil
	}
	m := r.Decider.CurrentMutator()
	if !m.MayInstrument(meta, ns) {
		r.forget(req.NamespacedName)
		return reconcile.Result{}, nil
	}
	pod := &corev1.Pod{}
	if err := r.APIReader.Get(ctx, req.NamespacedName, pod); err != nil {
		if apierrors.IsNotFound(err) {
			r.forget(req.NamespacedName)
			return reconcile.Result{}, nil
		}
		return reconcile.Result{}, fmt.Errorf("read pod %s: %w", req, err)
	}
	if pod.DeletionTimestamp != nil || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		r.forget(req.NamespacedName)
		return reconcile.Result{}, nil
	}
	res := r.Decider.Decide(ctx, pod)
	if res.Outcome != mutation.OutcomeInjected && res.Outcome != mutation.OutcomeRewritten {
		r.forget(req.NamespacedName)
		return reconcile.Result{}, nil
	}

	if r.remember(req.NamespacedName) {
		owner := likelyOwner(pod)
		r.Log.Warn("pod runs without the instrumentation the webhook gives it", "namespace", pod.Namespace, "pod", pod.Name,
			"libraries", res.Libraries, "owner", owner.String())
		r.event(ctx, podRef(pod), podevents.EventName(pod), ReasonNotInstrumented, "Detect", notInstrumentedNote(res, owner))
	}
	if !restartsEnabled(m, ns) {
		return reconcile.Result{}, nil
	}
	owner, ownerErr := r.owner(ctx, pod)
	if ownerErr != nil {
		return r.refuse(ctx, pod, owner, ownerErr)
	}
	if owner == nil {
		r.Log.Debug("uninstrumented pod has no owner that can be restarted", "namespace", pod.Namespace, "pod", pod.Name)
		return reconcile.Result{}, nil
	}
	return r.restart(ctx, pod, owner)
}

func restartsEnabled(m *mutation.Mutator, ns *corev1.Namespace) bool {
	if ns != nil {
		switch ns.Annotations[RestartAnnotation] {
		case "true":
			return true
		case "false":
			return false
		}
	}
	return m.Config().Drift.RestartOwners
}

func notInstrumentedNote(res mutation.Result, owner *ownerRef) string {
	what := "the libraries " + strings.Join(res.Libraries, ",")
	if len(res.Libraries) == 0 {
		what = "its instrumentation"
	}
	fix := "delete it so that it is created again"
	if owner != nil {
		fix = fmt.Sprintf("restart its owner (kubectl rollout restart %s/%s -n %s), or annotate the namespace %s=true to have apm-csi restart it",
			strings.ToLower(owner.Kind), owner.Name, owner.Namespace, RestartAnnotation)
	}
	note := fmt.Sprintf("apm-csi would give this pod %s, but it runs without: it was created while the webhook did not answer (not running, or slower than its timeout) or before its namespace was selected. To instrument it, %s", what, fix)
	if len(note) > 1024 {
		note = note[:1021] + "..."
	}
	return note
}

// remember counts a drifting pod; it reports whether the pod is new.
func (r *Reconciler) remember(key types.NamespacedName) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.drifting[key]; ok {
		return false
	}
	r.drifting[key] = struct{}{}
	r.perNS[key.Namespace]++
	uninstrumentedPods.WithLabelValues(key.Namespace).Set(float64(r.perNS[key.Namespace]))
	return true
}

func (r *Reconciler) forget(key types.NamespacedName) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.drifting[key]; !ok {
		return
	}
	delete(r.drifting, key)
	r.perNS[key.Namespace]--
	if r.perNS[key.Namespace] <= 0 {
		delete(r.perNS, key.Namespace)
		// Bounded labels: a namespace without drift is not exported.
		uninstrumentedPods.DeleteLabelValues(key.Namespace)
		return
	}
	uninstrumentedPods.WithLabelValues(key.Namespace).Set(float64(r.perNS[key.Namespace]))
}

// Drifting returns how many pods of a namespace are counted as uninstrumented.
func (r *Reconciler) Drifting(namespace string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.perNS[namespace]
}

// event records an Event about an object once (its name is fixed; AlreadyExists means
// recorded, by this replica before a restart or by another).
func (r *Reconciler) event(ctx context.Context, regarding corev1.ObjectReference, name, reason, action, note string) {
	typ := corev1.EventTypeWarning
	if reason == ReasonOwnerRestarted {
		typ = corev1.EventTypeNormal
	}
	ev := &eventsv1.Event{
		ObjectMeta:          metav1.ObjectMeta{Name: name, Namespace: regarding.Namespace},
		EventTime:           metav1.NewMicroTime(r.Clock.Now()),
		ReportingController: podevents.ReportingController,
		ReportingInstance:   r.Instance,
		Action:              action,
		Reason:              reason,
		Type:                typ,
		Note:                note,
		Regarding:           regarding,
	}
	if err := r.Client.Create(ctx, ev); err != nil && !apierrors.IsAlreadyExists(err) {
		r.Log.Warn("cannot record an Event", "namespace", regarding.Namespace, "name", regarding.Name, "reason", reason, "err", err)
	}
}

func podRef(pod *corev1.Pod) corev1.ObjectReference {
	return corev1.ObjectReference{APIVersion: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID}
}

// eventName is name.suffix.tail within the 253 characters of an object name.
func eventName(name, suffix, tail string) string {
	sep := "." + suffix + "."
	if limit := 253 - len(sep) - len(tail); len(name) > limit {
		name = strings.TrimRight(name[:limit], ".-")
	}
	return name + sep + tail
}
