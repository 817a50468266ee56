// Package podevents records, once per pod, an Event saying what the webhook did to it, derived
// from the status annotation the API server actually stored, never from the admission answer.
//
// Admission writes nothing to the API: the webhook's answer may be lost (the API server gave up
// after timeoutSeconds and admitted the pod unmutated under failurePolicy Ignore), and a pod
// created from generateName has no name yet while it is admitted. So a small controller watches
// pods (metadata only, each cached object reduced to its name, UID, creation time and the
// status annotation) and, for a pod created within Window that carries the status, creates one
// events.k8s.io Event about the pod.
//
// Once per pod, across restarts and replicas, without writing to the pod: the Event's name is
// derived from the pod's UID, so a second create (another replica, or this one after a restart
// re-lists the pods) fails with AlreadyExists and nothing is duplicated. Window (default 15
// minutes) keeps a restart from reporting old pods whose Event the API server has already
// expired (--event-ttl, default one hour): it must stay below the Event TTL. The cost: a pod
// whose creation the webhook sees only after Window (every replica down that long) gets no
// Event; its status annotation still says what happened.
package podevents

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/mutation"
)

// Event reasons.
const (
	ReasonInjected  = "Injected"
	ReasonRewritten = "Rewritten"
	ReasonSkipped   = "InjectionSkipped"
	ReasonError     = "InjectionFailed"
)

// Action is the Event's action: what the webhook did when it decided.
const Action = "Admit"

// ReportingController names the webhook in its Events.
const ReportingController = names.WebhookBinary

// DefaultWindow is how long after its creation a pod still gets its Event. It must stay
// below the API server's --event-ttl (default one hour), or a restart could report a pod again
// after its first Event expired.
const DefaultWindow = 15 * time.Minute

// workers is how many Events are written at once. Few on purpose: Event writes yield to pod
// creates on a busy API server (a burst queues its Events, which the window leaves 15 minutes
// to drain) instead of competing with them (in one run of BenchmarkPodCreateAt200PerSecond on
// 2 shared cores, 8 workers made the mutated creates' median 1.5 s instead of 0.02-0.1 s).
const workers = 2

// maxNote is the events.k8s.io limit on an Event's note.
const maxNote = 1024

// Derived is the Event a stored status annotation calls for.
type Derived struct {
	Type   string // Normal or Warning
	Reason string
	Note   string
}

// Derive turns a stored status annotation into its Event. ok is false for a value the webhook
// does not write (nothing to report).
func Derive(status string) (d Derived, ok bool) {
	outcome, reason, ok := mutation.StatusOutcome(status)
	if !ok {
		return Derived{}, false
	}
	switch outcome {
	case mutation.OutcomeInjected:
		d = Derived{Type: corev1.EventTypeNormal, Reason: ReasonInjected}
	case mutation.OutcomeRewritten:
		d = Derived{Type: corev1.EventTypeNormal, Reason: ReasonRewritten}
	case mutation.OutcomeSkipped:
		d = Derived{Type: corev1.EventTypeWarning, Reason: ReasonSkipped}
	default:
		d = Derived{Type: corev1.EventTypeWarning, Reason: ReasonError}
	}
	d.Note = reason
	if len(d.Note) > maxNote {
		d.Note = d.Note[:maxNote-3] + "..."
	}
	return d, true
}

// EventName is the name of a pod's Event: the pod's name (shortened if need be) and its UID,
// so that it is the same for every replica and every restart, and different for a pod of the
// same name created again (a StatefulSet's).
func EventName(pod metav1.Object) string {
	const sep = ".apm-csi."
	uid := string(pod.GetUID())
	name := pod.GetName()
	if limit := 253 - len(sep) - len(uid); len(name) > limit {
		name = strings.TrimRight(name[:limit], ".-")
	}
	return name + sep + uid
}

// Recorder is the controller.
type Recorder struct {
	// Client reads pods (PartialObjectMetadata) from the cache and creates Events.
	Client client.Client
	// Instance is the reporting instance (the webhook's pod name); default the host name.
	Instance string
	// Window defaults to DefaultWindow.
	Window time.Duration
	Clock  clock.PassiveClock
	Log    *slog.Logger
}

// CacheTransform reduces a cached pod to what the Recorder reads: name, namespace, UID,
// resourceVersion, creation time and the status annotation. It keeps a large cluster's pods
// at a few hundred bytes each in the webhook's memory.
func CacheTransform(obj any) (any, error) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return obj, nil
	}
	out := &metav1.PartialObjectMetadata{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{
			Name: m.GetName(), Namespace: m.GetNamespace(), UID: m.GetUID(),
			ResourceVersion: m.GetResourceVersion(), CreationTimestamp: m.GetCreationTimestamp(),
		},
	}
	if s, ok := m.GetAnnotations()[annotations.InjectionStatus]; ok {
		out.Annotations = map[string]string{annotations.InjectionStatus: s}
	}
	return out, nil
}

// SetupWithManager adds the controller to mgr. Only pod creations (and the pods listed at
// start) that carry the status and are within the window reach the queue; updates and
// deletions never do.
func (r *Recorder) SetupWithManager(mgr manager.Manager) error {
	if r.Instance == "" {
		r.Instance, _ = os.Hostname()
	}
	if r.Instance == "" {
		r.Instance = names.WebhookBinary
	}
	if r.Window == 0 {
		r.Window = DefaultWindow
	}
	if r.Clock == nil {
		r.Clock = clock.RealClock{}
	}
	if r.Log == nil {
		r.Log = slog.Default()
	}
	skip := true
	return ctrl.NewControllerManagedBy(mgr).
		Named("pod-events").
		For(&corev1.Pod{}, builder.OnlyMetadata, builder.WithPredicates(predicate.Funcs{
			CreateFunc:  func(e event.CreateEvent) bool { return r.due(e.Object) },
			UpdateFunc:  func(event.UpdateEvent) bool { return false },
			DeleteFunc:  func(event.DeleteEvent) bool { return false },
			GenericFunc: func(event.GenericEvent) bool { return false },
		})).
		// Several managers run in one test process; the name is unique within each.
		WithOptions(controller.Options{MaxConcurrentReconciles: workers, SkipNameValidation: &skip}).
		Complete(r)
}

// due: the pod carries a status the webhook writes and was created within the window.
func (r *Recorder) due(pod metav1.Object) bool {
	if _, ok := Derive(pod.GetAnnotations()[annotations.InjectionStatus]); !ok {
		return false
	}
	return r.Clock.Since(pod.GetCreationTimestamp().Time) <= r.Window
}

// Reconcile records the Event of one pod, unless it is already recorded.
func (r *Recorder) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	pod := &metav1.PartialObjectMetadata{}
	pod.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Pod"))
	if err := r.Client.Get(ctx, req.NamespacedName, pod); err != nil {
		// Deleted before its turn: nothing left to describe.
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if !r.due(pod) {
		return reconcile.Result{}, nil
	}
	d, _ := Derive(pod.Annotations[annotations.InjectionStatus])
	ev := &eventsv1.Event{
		ObjectMeta:          metav1.ObjectMeta{Name: EventName(pod), Namespace: pod.Namespace},
		EventTime:           metav1.NewMicroTime(r.Clock.Now()),
		ReportingController: ReportingController,
		ReportingInstance:   r.Instance,
		Action:              Action,
		Reason:              d.Reason,
		Type:                d.Type,
		Note:                d.Note,
		Regarding: corev1.ObjectReference{
			APIVersion: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID,
		},
	}
	err := r.Client.Create(ctx, ev)
	switch {
	case err == nil:
		eventsTotal.WithLabelValues(resultRecorded).Inc()
		r.Log.Debug("pod event recorded", "namespace", pod.Namespace, "pod", pod.Name, "reason", d.Reason)
		return reconcile.Result{}, nil
	case apierrors.IsAlreadyExists(err):
		// Another replica, or this one before a restart, recorded it.
		eventsTotal.WithLabelValues(resultAlreadyRecorded).Inc()
		return reconcile.Result{}, nil
	}
	if ctx.Err() != nil {
		// Shutting down: another replica, or this one after its restart, records it.
		return reconcile.Result{}, nil
	}
	eventsTotal.WithLabelValues(resultFailed).Inc()
	r.Log.Warn("cannot record the pod's Event; retrying", "namespace", pod.Namespace, "pod", pod.Name, "reason", d.Reason, "err", err)
	// Retried with the queue's backoff while the pod is within the window.
	return reconcile.Result{}, fmt.Errorf("record Event %s/%s: %w", ev.Namespace, ev.Name, err)
}
