package drift

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
)

// ownerRef is a restartable owner: a Deployment, StatefulSet or DaemonSet.
type ownerRef struct {
	Kind, Namespace, Name string
}

func (o *ownerRef) String() string {
	if o == nil {
		return ""
	}
	return o.Kind + "/" + o.Name
}

func (o *ownerRef) object() client.Object {
	meta := metav1.ObjectMeta{Namespace: o.Namespace, Name: o.Name}
	switch o.Kind {
	case "Deployment":
		return &appsv1.Deployment{ObjectMeta: meta}
	case "StatefulSet":
		return &appsv1.StatefulSet{ObjectMeta: meta}
	}
	return &appsv1.DaemonSet{ObjectMeta: meta}
}

// owner finds the Deployment (through its ReplicaSet), StatefulSet or DaemonSet that controls
// pod. Nil for a bare pod and any other controller (a Job's pods finish on their own; other
// controllers do not restart the kubectl way). The error is from reading the ReplicaSet.
func (r *Reconciler) owner(ctx context.Context, pod *corev1.Pod) (*ownerRef, error) {
	ref := metav1.GetControllerOf(pod)
	if ref == nil || ref.APIVersion != appsv1.SchemeGroupVersion.String() {
		return nil, nil
	}
	switch ref.Kind {
	case "StatefulSet", "DaemonSet":
		return &ownerRef{Kind: ref.Kind, Namespace: pod.Namespace, Name: ref.Name}, nil
	case "ReplicaSet":
		rs := &appsv1.ReplicaSet{}
		if err := r.APIReader.Get(ctx, types.NamespacedName{Namespace: pod.Namespace, Name: ref.Name}, rs); err != nil {
			if apierrors.IsNotFound(err) {
				return nil, nil
			}
			return &ownerRef{Kind: "ReplicaSet", Namespace: pod.Namespace, Name: ref.Name}, err
		}
		if d := metav1.GetControllerOf(rs); d != nil && d.Kind == "Deployment" && d.APIVersion == appsv1.SchemeGroupVersion.String() {
			return &ownerRef{Kind: "Deployment", Namespace: pod.Namespace, Name: d.Name}, nil
		}
	}
	return nil, nil
}

// likelyOwner names the restartable owner from the pod alone, for the Event's advice: a
// ReplicaSet named <deployment>-<pod-template-hash> is taken to be the Deployment's.
func likelyOwner(pod *corev1.Pod) *ownerRef {
	ref := metav1.GetControllerOf(pod)
	if ref == nil || ref.APIVersion != appsv1.SchemeGroupVersion.String() {
		return nil
	}
	switch ref.Kind {
	case "StatefulSet", "DaemonSet":
		return &ownerRef{Kind: ref.Kind, Namespace: pod.Namespace, Name: ref.Name}
	case "ReplicaSet":
		if h := pod.Labels[appsv1.DefaultDeploymentUniqueLabelKey]; h != "" {
			if d, ok := strings.CutSuffix(ref.Name, "-"+h); ok {
				return &ownerRef{Kind: "Deployment", Namespace: pod.Namespace, Name: d}
			}
		}
	}
	return nil
}

// refuse reports, once per pod, that the webhook may not restart the owner (no RBAC).
func (r *Reconciler) refuse(ctx context.Context, pod *corev1.Pod, owner *ownerRef, err error) (reconcile.Result, error) {
	if !apierrors.IsForbidden(err) {
		return reconcile.Result{}, fmt.Errorf("restart %s of pod %s/%s: %w", owner, pod.Namespace, pod.Name, err)
	}
	restartsTotal.WithLabelValues(resultForbidden).Inc()
	note := fmt.Sprintf("apm-csi may not restart %s to instrument this pod: its service account lacks the rights (%s). Grant them with the Helm value webhook.drift.allowRestarts=true, or restart it yourself (kubectl rollout restart), or turn restarts off for this namespace with %s=false",
		owner, trimForbidden(err), RestartAnnotation)
	r.Log.Error("cannot restart the owner of an uninstrumented pod: forbidden", "namespace", pod.Namespace, "pod", pod.Name,
		"owner", owner.String(), "err", err)
	r.event(ctx, podRef(pod), eventName(pod.Name, "apm-csi-restart", string(pod.UID)), ReasonRestartRefused, "Restart", note)
	// Rights may be granted later; look again at the next restart interval.
	return reconcile.Result{RequeueAfter: r.interval()}, nil
}

// trimForbidden keeps the API server's own words short (it names the verb and resource).
func trimForbidden(err error) string {
	var se apierrors.APIStatus
	if errors.As(err, &se) {
		s := se.Status()
		return fmt.Sprintf("%s %s forbidden", s.Details.Kind, s.Details.Name)
	}
	return "forbidden"
}

func (r *Reconciler) interval() time.Duration {
	d := r.Decider.CurrentMutator().Config().Drift.RestartInterval.Duration
	if d <= 0 {
		d = 5 * time.Minute
	}
	return d
}

// restart restarts the pod's owner, unless it was restarted since the pod was created, or
// the rate limit (one owner per interval, and the previous one's rollout finished) says wait.
func (r *Reconciler) restart(ctx context.Context, pod *corev1.Pod, owner *ownerRef) (reconcile.Result, error) {
	obj := owner.object()
	if err := r.APIReader.Get(ctx, client.ObjectKeyFromObject(obj), obj); err != nil {
		if apierrors.IsNotFound(err) {
			return reconcile.Result{}, nil
		}
		return r.refuse(ctx, pod, owner, err)
	}
	if restartedSince(obj, pod.CreationTimestamp.Time) {
		// Restarted after this pod was created: its rollout replaces the pod.
		return reconcile.Result{}, nil
	}
	if r.Reachable != nil && !r.Reachable() {
		// Just started: the Service may not route to the webhook yet.
		restartsTotal.WithLabelValues(resultDeferred).Inc()
		return reconcile.Result{RequeueAfter: reachableRetry}, nil
	}
	now := r.Clock.Now()
	wait, err := r.claim(ctx, owner, now)
	switch {
	case err != nil && apierrors.IsConflict(err), err != nil && apierrors.IsAlreadyExists(err):
		// Another replica claimed the turn at the same moment.
		return reconcile.Result{RequeueAfter: time.Second}, nil
	case err != nil:
		return r.refuse(ctx, pod, owner, err)
	case wait > 0:
		restartsTotal.WithLabelValues(resultDeferred).Inc()
		return reconcile.Result{RequeueAfter: wait}, nil
	}
	// No resourceVersion precondition: the Lease already made this replica the only one
	// restarting now, and an owner's status changes all the time.
	patch, _ := json.Marshal(map[string]any{
		"spec": map[string]any{"template": map[string]any{"metadata": map[string]any{
			"annotations": map[string]string{RestartedAtAnnotation: now.UTC().Format(time.RFC3339)},
		}}},
	})
	if err := r.Client.Patch(ctx, obj, client.RawPatch(types.MergePatchType, patch)); err != nil {
		if apierrors.IsNotFound(err) {
			return reconcile.Result{}, nil
		}
		return r.refuse(ctx, pod, owner, err)
	}
	restartsTotal.WithLabelValues(resultRestarted).Inc()
	r.Log.Info("restarted the owner of an uninstrumented pod", "namespace", pod.Namespace, "pod", pod.Name, "owner", owner.String())
	r.event(ctx, corev1.ObjectReference{APIVersion: appsv1.SchemeGroupVersion.String(), Kind: owner.Kind, Namespace: owner.Namespace, Name: owner.Name, UID: obj.GetUID()},
		eventName(owner.Name, "apm-csi-restart", obj.GetResourceVersion()), ReasonOwnerRestarted, "Restart",
		fmt.Sprintf("restarted so that apm-csi instruments its pods: pod %s runs without instrumentation (created while the webhook did not answer, or before its namespace was selected)", pod.Name))
	return reconcile.Result{}, nil
}

// restartedSince reports whether the owner's pod template was restarted at or after t.
func restartedSince(obj client.Object, t time.Time) bool {
	var ann map[string]string
	switch o := obj.(type) {
	case *appsv1.Deployment:
		ann = o.Spec.Template.Annotations
	case *appsv1.StatefulSet:
		ann = o.Spec.Template.Annotations
	case *appsv1.DaemonSet:
		ann = o.Spec.Template.Annotations
	}
	at, err := time.Parse(time.RFC3339, ann[RestartedAtAnnotation])
	// RFC3339 has whole seconds; the pod's creation time too.
	return err == nil && !at.Before(t.Truncate(time.Second))
}

// reachableRetry is how often a restart waiting for the webhook to be reachable looks again.
const reachableRetry = 5 * time.Second

// LeaseName is the Lease (in the webhook's namespace) through which replicas take turns
// restarting owners: it records the last restart's time and owner, so that the rate limit
// and "one owner at a time" hold across replicas and restarts of the webhook.
const LeaseName = "apm-csi-webhook-owner-restarts"

// leaseOwnerAnnotation on the Lease names the last owner restarted (kind/namespace/name).
const leaseOwnerAnnotation = "apm-csi.io/restarted-owner"

// claim takes the turn to restart owner: it returns how long to wait when the interval since
// the last restart (by any replica) has not passed or the last owner has not rolled out yet
// (at most maxRolloutWait), else records owner and now in the Lease (an optimistic create or
// update: a Conflict or AlreadyExists means another replica took the turn).
func (r *Reconciler) claim(ctx context.Context, owner *ownerRef, now time.Time) (time.Duration, error) {
	key := types.NamespacedName{Namespace: r.LeaseNamespace, Name: LeaseName}
	lease := &coordinationv1.Lease{}
	err := r.APIReader.Get(ctx, key, lease)
	if err != nil && !apierrors.IsNotFound(err) {
		return 0, err
	}
	exists := err == nil
	if exists && lease.Spec.RenewTime != nil {
		last := lease.Spec.RenewTime.Time
		if wait := last.Add(r.interval()).Sub(now); wait > 0 {
			return wait, nil
		}
		if prev := parseOwner(lease.Annotations[leaseOwnerAnnotation]); prev != nil && *prev != *owner && now.Sub(last) < maxRolloutWait {
			obj := prev.object()
			if err := r.APIReader.Get(ctx, client.ObjectKeyFromObject(obj), obj); err == nil && !rolledOut(obj) {
				return r.interval(), nil
			}
		}
	}
	seconds := int32(r.interval() / time.Second)
	lease.Namespace, lease.Name = key.Namespace, key.Name
	if lease.Annotations == nil {
		lease.Annotations = map[string]string{}
	}
	lease.Annotations[leaseOwnerAnnotation] = owner.Kind + "/" + owner.Namespace + "/" + owner.Name
	lease.Spec.HolderIdentity = &r.Instance
	lease.Spec.LeaseDurationSeconds = &seconds
	lease.Spec.RenewTime = &metav1.MicroTime{Time: now}
	if !exists {
		lease.Spec.AcquireTime = &metav1.MicroTime{Time: now}
		return 0, r.Client.Create(ctx, lease)
	}
	return 0, r.Client.Update(ctx, lease)
}

func parseOwner(s string) *ownerRef {
	parts := strings.SplitN(s, "/", 3)
	if len(parts) != 3 {
		return nil
	}
	switch parts[0] {
	case "Deployment", "StatefulSet", "DaemonSet":
		return &ownerRef{Kind: parts[0], Namespace: parts[1], Name: parts[2]}
	}
	return nil
}

// rolledOut reports whether every replica of the owner runs its current template.
func rolledOut(obj client.Object) bool {
	switch o := obj.(type) {
	case *appsv1.Deployment:
		want := int32(1)
		if o.Spec.Replicas != nil {
			want = *o.Spec.Replicas
		}
		return o.Status.ObservedGeneration >= o.Generation && o.Status.UpdatedReplicas == want &&
			o.Status.Replicas == want && o.Status.AvailableReplicas == want
	case *appsv1.StatefulSet:
		return o.Status.ObservedGeneration >= o.Generation && o.Status.CurrentRevision == o.Status.UpdateRevision
	case *appsv1.DaemonSet:
		return o.Status.ObservedGeneration >= o.Generation && o.Status.UpdatedNumberScheduled == o.Status.DesiredNumberScheduled &&
			o.Status.NumberUnavailable == 0
	}
	return true
}
