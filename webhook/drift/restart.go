package drift

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
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
		"owner", owner.String(), "error", err)
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
	now := r.Clock.Now()
	if wait := r.waitFor(ctx, owner, now); wait > 0 {
		restartsTotal.WithLabelValues(resultDeferred).Inc()
		return reconcile.Result{RequeueAfter: wait}, nil
	}
	patch, _ := json.Marshal(map[string]any{
		"metadata": map[string]any{"resourceVersion": obj.GetResourceVersion()},
		"spec": map[string]any{"template": map[string]any{"metadata": map[string]any{
			"annotations": map[string]string{RestartedAtAnnotation: now.UTC().Format(time.RFC3339)},
		}}},
	})
	err := r.Client.Patch(ctx, obj, client.RawPatch(types.MergePatchType, patch))
	switch {
	case apierrors.IsConflict(err):
		// Changed meanwhile (another replica restarted it, or its owner edited it): look again.
		return reconcile.Result{Requeue: true}, nil
	case err != nil:
		return r.refuse(ctx, pod, owner, err)
	}
	r.mu.Lock()
	r.lastRestart, r.lastOwner = now, owner
	r.mu.Unlock()
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

// waitFor is how long to wait before restarting owner: until the interval since the last
// restart has passed and the last owner's rollout has finished (or maxRolloutWait passed).
func (r *Reconciler) waitFor(ctx context.Context, owner *ownerRef, now time.Time) time.Duration {
	r.mu.Lock()
	last, lastOwner := r.lastRestart, r.lastOwner
	r.mu.Unlock()
	if lastOwner == nil {
		return 0
	}
	if wait := last.Add(r.interval()).Sub(now); wait > 0 {
		return wait
	}
	if *lastOwner == *owner || now.Sub(last) >= maxRolloutWait {
		return 0
	}
	obj := lastOwner.object()
	if err := r.APIReader.Get(ctx, client.ObjectKeyFromObject(obj), obj); err != nil {
		return 0 // gone, or unreadable: it holds nothing back
	}
	if rolledOut(obj) {
		return 0
	}
	return r.interval()
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
