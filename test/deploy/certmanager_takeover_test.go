package deploy

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	kscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/localcluster"
	"github.com/apm-csi/apm-csi/test/testenv"
	"github.com/apm-csi/apm-csi/webhook/certs"
)

// TestCertManagerTakesOverSelfManagedCertificate switches a Helm release from self-managed TLS
// to cert-manager mode with `helm upgrade`, as docs/deploy.md describes: the webhook had
// created the Secret itself and put its own CA into the MutatingWebhookConfiguration. The real
// cert-manager controller must take the Secret over, and the real cainjector must replace the
// self-managed CA in the MutatingWebhookConfiguration with the Certificate's CA, so that the
// API server trusts the certificate the webhook serves in cert-manager mode.
func TestCertManagerTakesOverSelfManagedCertificate(t *testing.T) {
	assets := testenv.KubebuilderAssets(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmDir, err := localcluster.CertManagerBuild(ctx, repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	cp := startCertManager(t, ctx, assets, cmDir)
	cfg, cs, cm, kenv := cp.cfg, cp.cs, cp.cm, cp.kenv

	ns := names.SystemNamespace
	if out, err := runEnv(t, kenv, helm(t), "install", "apm-csi", chartDir, "--namespace", ns, "--create-namespace",
		"--set", "webhook.tls.mode=self-managed"); err != nil {
		t.Fatalf("helm install (self-managed): %v\n%s", err, out)
	}
	// What the webhook does at start in self-managed mode: its Secret, its CA in the
	// MutatingWebhookConfiguration.
	direct, err := client.New(cfg, client.Options{Scheme: kscheme.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	self := &certs.SelfManaged{Client: direct, Namespace: ns, SecretName: "apm-csi-webhook-tls", ServiceName: names.WebhookBinary,
		WebhookConfigName: names.WebhookBinary, CertDir: t.TempDir()}
	if _, err := self.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	secret, err := cs.CoreV1().Secrets(ns).Get(ctx, self.SecretName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	selfCA := secret.Data[certs.KeyCABundle]
	mwc, err := cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, names.WebhookBinary, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(mwc.Webhooks) == 0 || !bytes.Equal(mwc.Webhooks[0].ClientConfig.CABundle, selfCA) {
		t.Fatal("the self-managed CA is not in the MutatingWebhookConfiguration before the switch")
	}

	if out, err := runEnv(t, kenv, helm(t), "upgrade", "apm-csi", chartDir, "--namespace", ns,
		"--reuse-values", "--set", "webhook.tls.mode=cert-manager"); err != nil {
		t.Fatalf("helm upgrade (cert-manager): %v\n%s", err, out)
	}
	got := waitIssued(t, ctx, cs, cm, ns, names.WebhookBinary, 0)
	if localcluster.CABundleHas(got.ca, selfCA) {
		t.Fatal("the Certificate's Secret still holds the self-managed CA: cert-manager did not take the Secret over")
	}
	// What the API server checks: the issued certificate verifies against every webhook's
	// caBundle. cainjector merges CAs, so the self-managed CA stays in the caBundle next to
	// cert-manager's until it expires or the caBundle is cleared (docs/deploy.md).
	mwc, err = cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, names.WebhookBinary, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range mwc.Webhooks {
		if err := verifyLeaf(got.leaf, w.ClientConfig.CABundle, ns); err != nil {
			t.Errorf("webhook %s: the issued certificate does not verify against its caBundle: %v", w.Name, err)
		}
	}
	t.Logf("caBundle after the switch: %d CAs, the self-managed CA still in it: %v",
		len(localcluster.PEMCertificates(mwc.Webhooks[0].ClientConfig.CABundle)), localcluster.CABundleHas(mwc.Webhooks[0].ClientConfig.CABundle, selfCA))

	// The clean-up docs/deploy.md gives: drop the self-managed CA key and empty the caBundle;
	// cainjector then injects cert-manager's CA alone. It is done once cainjector has settled
	// (as a person would, minutes later): a reconcile still queued from the switch would
	// re-apply the merged caBundle it read before the clean-up.
	settled(t, ctx, cs)
	if _, err := cs.CoreV1().Secrets(ns).Patch(ctx, self.SecretName, types.JSONPatchType,
		[]byte(`[{"op":"remove","path":"/data/ca.key"}]`), metav1.PatchOptions{}); err != nil {
		t.Fatalf("remove ca.key: %v", err)
	}
	settled(t, ctx, cs)
	var ops []string
	for i := range mwc.Webhooks {
		ops = append(ops, fmt.Sprintf(`{"op":"remove","path":"/webhooks/%d/clientConfig/caBundle"}`, i))
	}
	if _, err := cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Patch(ctx, names.WebhookBinary, types.JSONPatchType,
		[]byte("["+strings.Join(ops, ",")+"]"), metav1.PatchOptions{}); err != nil {
		t.Fatalf("empty the caBundle: %v", err)
	}
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		m, err := cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, names.WebhookBinary, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		for _, w := range m.Webhooks {
			if !localcluster.CABundleHas(w.ClientConfig.CABundle, got.ca) || !localcluster.CABundleHas(got.ca, w.ClientConfig.CABundle) {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("cainjector did not inject cert-manager's CA alone after the caBundle was emptied: %v", err)
	}
	secret, err = cs.CoreV1().Secrets(ns).Get(ctx, self.SecretName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := secret.Data[certs.KeyCAKey]; ok {
		t.Errorf("%s came back into the Secret", certs.KeyCAKey)
	}
}

// settled waits until the MutatingWebhookConfiguration has not changed for three reads a
// second apart.
func settled(t *testing.T, ctx context.Context, cs kubernetes.Interface) {
	t.Helper()
	last, same := "", 0
	err := wait.PollUntilContextTimeout(ctx, time.Second, time.Minute, true, func(ctx context.Context) (bool, error) {
		m, err := cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, names.WebhookBinary, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		if m.ResourceVersion == last {
			same++
		} else {
			last, same = m.ResourceVersion, 0
		}
		return same >= 2, nil
	})
	if err != nil {
		t.Fatalf("the MutatingWebhookConfiguration kept changing: %v", err)
	}
}
