package deploy

import (
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// TestPolicyChecksCatch breaks a correct install in the ways the checks exist for and expects
// each check to report it: a check that cannot fail proves nothing.
func TestPolicyChecksCatch(t *testing.T) {
	fresh := func(t *testing.T) *Install {
		t.Helper()
		objs := Objects(t, variantByName(t, "kustomize-sidecars"))
		copies := make([]*unstructured.Unstructured, 0, len(objs))
		for _, o := range objs {
			copies = append(copies, o.DeepCopy())
		}
		in := install(t, Set{Objs: copies})
		// The untouched install passes every check.
		for _, errs := range [][]error{
			checkWebhookSelectors(in.WebhookConfigs, in.Webhook.Namespace), checkWebhookConfig(in),
			checkNodePlugin(t, in), checkWebhookWorkload(in), checkImagesPinned(in), checkRBAC(t, in), checkTLS(t, in),
		} {
			if len(errs) > 0 {
				t.Fatalf("baseline install fails a check: %v", errs)
			}
		}
		return in
	}
	cases := []struct {
		name   string
		break_ func(in *Install)
		check  func(t *testing.T, in *Install) []error
		want   string
	}{
		{"webhook selects kube-system", func(in *Install) {
			for i := range in.WebhookConfigs[0].Webhooks {
				sel := in.WebhookConfigs[0].Webhooks[i].NamespaceSelector
				sel.MatchExpressions = sel.MatchExpressions[:0]
			}
		}, func(t *testing.T, in *Install) []error {
			return checkWebhookSelectors(in.WebhookConfigs, in.Webhook.Namespace)
		}, "selects namespace kube-system"},
		{"webhook selects its own namespace", func(in *Install) {
			for i := range in.WebhookConfigs[0].Webhooks {
				for j, r := range in.WebhookConfigs[0].Webhooks[i].NamespaceSelector.MatchExpressions {
					if r.Key == nameLabel {
						in.WebhookConfigs[0].Webhooks[i].NamespaceSelector.MatchExpressions[j].Values = []string{"kube-system"}
					}
				}
			}
		}, func(t *testing.T, in *Install) []error {
			return checkWebhookSelectors(in.WebhookConfigs, in.Webhook.Namespace)
		}, "selects namespace apm-csi-system"},
		{"failurePolicy Fail", func(in *Install) {
			fail := admissionregistrationv1.Fail
			in.WebhookConfigs[0].Webhooks[0].FailurePolicy = &fail
		}, func(t *testing.T, in *Install) []error { return checkWebhookConfig(in) }, "failurePolicy must be Ignore"},
		{"service selects nothing", func(in *Install) {
			in.Services[0].Spec.Selector = map[string]string{"app": "other"}
		}, func(t *testing.T, in *Install) []error { return checkWebhookConfig(in) }, "does not select the webhook pods"},
		{"pods dir without Bidirectional", func(in *Install) {
			for i := range in.NodeContainer.VolumeMounts {
				in.NodeContainer.VolumeMounts[i].MountPropagation = nil
			}
		}, func(t *testing.T, in *Install) []error { return checkNodePlugin(t, in) }, "not Bidirectional"},
		{"node plugin not privileged", func(in *Install) {
			in.NodeContainer.SecurityContext.Privileged = nil
		}, func(t *testing.T, in *Install) []error { return checkNodePlugin(t, in) }, "must be privileged"},
		{"readiness on the wrong port", func(in *Install) {
			in.NodeContainer.ReadinessProbe.HTTPGet.Port = intstr.FromInt32(9999)
		}, func(t *testing.T, in *Install) []error { return checkNodePlugin(t, in) }, "readinessProbe"},
		{"registrar with the wrong socket path", func(in *Install) {
			for i := range in.Node.Spec.Template.Spec.Containers {
				c := &in.Node.Spec.Template.Spec.Containers[i]
				for j, a := range c.Args {
					if strings.HasPrefix(a, "--kubelet-registration-path=") {
						c.Args[j] = "--kubelet-registration-path=/var/lib/kubelet/plugins/other/csi.sock"
					}
				}
			}
		}, func(t *testing.T, in *Install) []error { return checkNodePlugin(t, in) }, "kubelet-registration-path"},
		{"no tolerations", func(in *Install) {
			in.Node.Spec.Template.Spec.Tolerations = nil
		}, func(t *testing.T, in *Install) []error { return checkNodePlugin(t, in) }, "tolerate every taint"},
		{"webhook as root", func(in *Install) {
			in.Webhook.Spec.Template.Spec.SecurityContext.RunAsNonRoot = nil
		}, func(t *testing.T, in *Install) []error { return checkWebhookWorkload(in) }, "runAsNonRoot"},
		{"webhook writable root filesystem", func(in *Install) {
			no := false
			in.WebhookCont.SecurityContext.ReadOnlyRootFilesystem = &no
		}, func(t *testing.T, in *Install) []error { return checkWebhookWorkload(in) }, "read-only root filesystem"},
		{"webhook single replica", func(in *Install) {
			one := int32(1)
			in.Webhook.Spec.Replicas = &one
		}, func(t *testing.T, in *Install) []error { return checkWebhookWorkload(in) }, "at least 2 replicas"},
		{"no PodDisruptionBudget", func(in *Install) {
			in.PDBs = nil
		}, func(t *testing.T, in *Install) []error { return checkWebhookWorkload(in) }, "PodDisruptionBudget"},
		{"no memory limit", func(in *Install) {
			delete(in.WebhookCont.Resources.Limits, corev1.ResourceMemory)
		}, func(t *testing.T, in *Install) []error { return checkWebhookWorkload(in) }, "memory limit"},
		{"image latest", func(in *Install) {
			in.NodeContainer.Image = "ghcr.io/apm-csi/apm-csi-node:latest"
		}, func(t *testing.T, in *Install) []error { return checkImagesPinned(in) }, "latest"},
		{"image without tag", func(in *Install) {
			in.WebhookCont.Image = "ghcr.io/apm-csi/apm-csi-webhook"
		}, func(t *testing.T, in *Install) []error { return checkImagesPinned(in) }, "not pinned"},
		{"self-managed names another configuration", func(in *Install) {
			for i, a := range in.WebhookCont.Args {
				if strings.HasPrefix(a, "--webhook-config-name=") {
					in.WebhookCont.Args[i] = "--webhook-config-name=other"
				}
			}
		}, func(t *testing.T, in *Install) []error { return checkTLS(t, in) }, "caBundle would never be set"},
		{"wildcard RBAC", func(in *Install) {
			in.Objs = append(in.Objs, &unstructured.Unstructured{Object: map[string]any{
				"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
				"metadata": map[string]any{"name": "too-much"},
				"rules":    []any{map[string]any{"apiGroups": []any{"*"}, "resources": []any{"secrets"}, "verbs": []any{"get"}}},
			}})
		}, func(t *testing.T, in *Install) []error { return checkRBAC(t, in) }, "wildcard"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := fresh(t)
			tc.break_(in)
			errs := tc.check(t, in)
			for _, err := range errs {
				if strings.Contains(err.Error(), tc.want) {
					return
				}
			}
			t.Fatalf("the check did not report %q; it reported: %v", tc.want, errs)
		})
	}
}
