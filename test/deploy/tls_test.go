package deploy

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
)

// injectCAAnnotation is cert-manager's cainjector annotation: <namespace>/<certificate>.
const injectCAAnnotation = "cert-manager.io/inject-ca-from"

// webhookNamespace returns the namespace the webhook believes it runs in: --namespace, else
// $POD_NAMESPACE, which must come from the downward API.
func webhookNamespace(t testing.TB, in *Install) (string, error) {
	t.Helper()
	if ns := FlagValue(t, in.WebhookCont, "namespace", ""); ns != "" {
		return ns, nil
	}
	for _, e := range in.WebhookCont.Env {
		if e.Name == "POD_NAMESPACE" {
			if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace" {
				return in.Webhook.Namespace, nil
			}
			return e.Value, nil
		}
	}
	return "", fmt.Errorf("the webhook container sets neither --namespace nor POD_NAMESPACE (it would assume the default namespace)")
}

// checkTLS: the webhook's certificate mode is wired end to end.
//   - cert-manager: the configuration's inject-ca-from names a rendered Certificate whose
//     Secret is what the webhook serves from --cert-dir, valid for the Service's DNS name,
//     issued by a rendered Issuer or an external (Cluster)Issuer.
//   - self-managed: the names the webhook is given (--webhook-config-name, --service-name,
//     --secret-name, its namespace) are the rendered objects, and --cert-dir is writable.
func checkTLS(t testing.TB, in *Install) []error {
	t.Helper()
	var errs []error
	c := in.WebhookCont
	spec := &in.Webhook.Spec.Template.Spec
	mode := FlagValue(t, c, "cert-mode", "cert-manager")
	certDir := FlagValue(t, c, "cert-dir", "")
	if certDir == "" {
		return []error{fmt.Errorf("webhook: no --cert-dir (its default is under /tmp, on the read-only root filesystem)")}
	}
	m, _ := MountFor(c, certDir)
	if m == nil {
		return []error{fmt.Errorf("webhook: --cert-dir %s is on no volume", certDir)}
	}
	vol := Volume(spec, m.Name)
	ns, err := webhookNamespace(t, in)
	if err != nil {
		errs = append(errs, err)
	} else if ns != in.Webhook.Namespace {
		errs = append(errs, fmt.Errorf("webhook: it thinks it runs in namespace %q, but runs in %q", ns, in.Webhook.Namespace))
	}

	for _, cfg := range in.WebhookConfigs {
		ann := cfg.Annotations[injectCAAnnotation]
		switch mode {
		case "cert-manager":
			certNS, certName, ok := strings.Cut(ann, "/")
			if !ok {
				errs = append(errs, fmt.Errorf("MutatingWebhookConfiguration %s: cert-manager mode needs the %s annotation (<namespace>/<certificate>), got %q", cfg.Name, injectCAAnnotation, ann))
				continue
			}
			u := in.Get("Certificate", certNS, certName)
			if u == nil {
				errs = append(errs, fmt.Errorf("MutatingWebhookConfiguration %s: %s=%s names no rendered Certificate", cfg.Name, injectCAAnnotation, ann))
				continue
			}
			crt := typed[cmapi.Certificate](t, u)
			secretName := crt.Spec.SecretName
			if vol == nil || vol.Secret == nil || vol.Secret.SecretName != secretName {
				errs = append(errs, fmt.Errorf("webhook: --cert-dir %s must be the Secret %q of Certificate %s", certDir, secretName, certName))
			}
			for _, w := range cfg.Webhooks {
				if s := w.ClientConfig.Service; s != nil {
					want := s.Name + "." + s.Namespace + ".svc"
					if !slices.Contains(crt.Spec.DNSNames, want) {
						errs = append(errs, fmt.Errorf("Certificate %s: dnsNames %v lack %s, the name the API server calls", certName, crt.Spec.DNSNames, want))
					}
				}
			}
			kind, issuer := crt.Spec.IssuerRef.Kind, crt.Spec.IssuerRef.Name
			if (kind == "" || kind == "Issuer") && in.Get("Issuer", certNS, issuer) == nil {
				errs = append(errs, fmt.Errorf("Certificate %s: Issuer %s/%s is not rendered", certName, certNS, issuer))
			}
		case "self-managed":
			if ann != "" {
				errs = append(errs, fmt.Errorf("MutatingWebhookConfiguration %s: self-managed mode, but cert-manager would also inject a CA (%s)", cfg.Name, injectCAAnnotation))
			}
			if got := FlagValue(t, c, "webhook-config-name", "apm-csi-webhook"); got != cfg.Name {
				errs = append(errs, fmt.Errorf("webhook: --webhook-config-name %q, but the configuration is %q: its caBundle would never be set", got, cfg.Name))
			}
			for _, w := range cfg.Webhooks {
				if s := w.ClientConfig.Service; s != nil {
					if got := FlagValue(t, c, "service-name", "apm-csi-webhook"); got != s.Name {
						errs = append(errs, fmt.Errorf("webhook: --service-name %q, but the configuration calls Service %q: the certificate would not match", got, s.Name))
					}
				}
			}
			if vol == nil || vol.EmptyDir == nil || m.ReadOnly {
				errs = append(errs, fmt.Errorf("webhook: self-managed mode writes --cert-dir %s: it must be a writable emptyDir", certDir))
			}
		default:
			errs = append(errs, fmt.Errorf("webhook: unknown --cert-mode %q", mode))
		}
	}
	return errs
}
