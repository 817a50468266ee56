package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/webhook/drift"
)

// grantRestarts gives the webhook's service account what the chart's
// webhook.drift.allowRestarts (kustomize: deploy/base/webhook/drift-restart-rbac.yaml) gives it.
func grantRestarts(t *testing.T, ctx context.Context, e *env) {
	t.Helper()
	const name = "e2e-apm-csi-webhook-drift-restart"
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{"apps"}, Resources: []string{"deployments", "statefulsets", "daemonsets"}, Verbs: []string{"get", "patch"}},
		{APIGroups: []string{"apps"}, Resources: []string{"replicasets"}, Verbs: []string{"get"}},
	}}
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: framework.Namespace, Name: framework.WebhookName}}}
	if _, err := e.cs.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	if _, err := e.cs.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	leaseRole := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: framework.Namespace}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, ResourceNames: []string{drift.LeaseName}, Verbs: []string{"get", "update"}},
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"create"}},
	}}
	leaseBinding := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: framework.Namespace},
		RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: name}, Subjects: binding.Subjects}
	if _, err := e.cs.RbacV1().Roles(framework.Namespace).Create(ctx, leaseRole, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	if _, err := e.cs.RbacV1().RoleBindings(framework.Namespace).Create(ctx, leaseBinding, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = e.cs.RbacV1().ClusterRoleBindings().Delete(context.Background(), name, metav1.DeleteOptions{})
		_ = e.cs.RbacV1().ClusterRoles().Delete(context.Background(), name, metav1.DeleteOptions{})
		_ = e.cs.RbacV1().RoleBindings(framework.Namespace).Delete(context.Background(), name, metav1.DeleteOptions{})
		_ = e.cs.RbacV1().Roles(framework.Namespace).Delete(context.Background(), name, metav1.DeleteOptions{})
	})
}

// webhookMetric reads one sample of the webhook's metrics through the API server's pod proxy.
func webhookMetric(ctx context.Context, e *env, sample string) (string, error) {
	pods, err := e.d.WebhookPods(ctx)
	if err != nil || len(pods) == 0 {
		return "", fmt.Errorf("no webhook pod: %v", err)
	}
	out, err := e.cs.CoreV1().Pods(framework.Namespace).ProxyGet("http", pods[0].Name, "8080", "/metrics", nil).DoRaw(ctx)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			return v, nil
		}
	}
	return "", nil
}

// podEventReasons lists the reasons of the Events about a pod.
func podEventReasons(ctx context.Context, e *env, ns string, kind, name string) ([]string, error) {
	list, err := e.cs.EventsV1().Events(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	var out []string
	for _, ev := range list.Items {
		if ev.Regarding.Kind == kind && ev.Regarding.Name == name {
			out = append(out, ev.Reason)
		}
	}
	return out, nil
}

// Scenario: the webhook is scaled to 0, a Deployment's pod and a bare pod are created in an
// SSI namespace that opted in to restarts (both run uninstrumented: failurePolicy Ignore), the
// webhook is scaled back: each pod gets a NotInstrumented Event, the gauge counts them, the
// Deployment is restarted once and its new pod is instrumented; the bare pod is left alone.
func scenarioDriftRestart(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-drift", ssiLabels)
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:"true"}}}`, drift.RestartAnnotation)
	if _, err := e.cs.CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	grantRestarts(t, ctx, e)
	restartWebhook := stopWebhook(t, ctx, e)

	tmpl := framework.BusyboxPod(ns, "web", "true")
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "web"},
		Spec: appsv1.DeploymentSpec{
			Replicas: framework.Ptr[int32](1),
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "web"}}, Spec: tmpl.Spec},
		},
	}
	if _, err := e.cs.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	bare := createReady(t, ctx, e, framework.BusyboxPod(ns, "bare", "true"))
	var old corev1.Pod
	if err := framework.Poll(ctx, podTimeout, "the Deployment's pod running uninstrumented", func() (bool, error) {
		pods, err := e.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil || len(pods.Items) != 1 || !framework.PodReady(&pods.Items[0]) {
			return false, nil
		}
		old = pods.Items[0]
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*corev1.Pod{&old, bare} {
		if framework.LibraryVolume(p) != nil {
			t.Fatalf("pod %s was mutated while the webhook was down", p.Name)
		}
	}

	start := time.Now()
	restartWebhook()

	for _, name := range []string{old.Name, bare.Name} {
		if err := framework.Poll(ctx, 2*time.Minute, "NotInstrumented Event on "+name, func() (bool, error) {
			reasons, err := podEventReasons(ctx, e, ns, "Pod", name)
			return err == nil && strings.Contains(strings.Join(reasons, ","), drift.ReasonNotInstrumented), nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := framework.Poll(ctx, 2*time.Minute, "the gauge counting the uninstrumented pods", func() (bool, error) {
		v, err := webhookMetric(ctx, e, fmt.Sprintf(`apm_csi_webhook_uninstrumented_pods{namespace=%q}`, ns))
		return err == nil && (v == "2" || v == "1"), nil
	}); err != nil {
		t.Fatal(err)
	}

	var next corev1.Pod
	if err := framework.Poll(ctx, podTimeout, "the Deployment restarted and its new pod ready", func() (bool, error) {
		pods, err := e.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil {
			return false, nil
		}
		for _, p := range pods.Items {
			if p.UID != old.UID && framework.PodReady(&p) && p.DeletionTimestamp == nil {
				next = p
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		t.Fatal(err)
	}
	measure(t, "webhook back to the restarted Deployment's instrumented pod ready", start)
	checkInstrumented(t, e, &next, e.jsRef)
	execIn(t, ctx, e, &next, "test", "-f", ddTracePackageJSON)

	got, err := e.cs.AppsV1().Deployments(ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Spec.Template.Annotations[drift.RestartedAtAnnotation] == "" || got.Generation != 2 {
		t.Errorf("want exactly one restart: generation %d, template annotations %v", got.Generation, got.Spec.Template.Annotations)
	}
	reasons, err := podEventReasons(ctx, e, ns, "Deployment", "web")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(strings.Join(reasons, ","), drift.ReasonOwnerRestarted) != 1 {
		t.Errorf("want one %s Event on the Deployment, got %v", drift.ReasonOwnerRestarted, reasons)
	}
	// A bare pod is never restarted (deleted): it is still there, still reported.
	if p, err := e.cs.CoreV1().Pods(ns).Get(ctx, bare.Name, metav1.GetOptions{}); err != nil || p.UID != bare.UID || p.DeletionTimestamp != nil {
		t.Errorf("the bare pod must be left alone: %v", err)
	}
	if err := framework.Poll(ctx, time.Minute, "the gauge at 1 (the bare pod) once the old pod is gone", func() (bool, error) {
		v, err := webhookMetric(ctx, e, fmt.Sprintf(`apm_csi_webhook_uninstrumented_pods{namespace=%q}`, ns))
		return err == nil && v == "1", nil
	}); err != nil {
		t.Error(err)
	}
}
