package webhook_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"log/slog"
	"os"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/test/testenv"
	"github.com/apm-csi/apm-csi/webhook/certs"
)

// TestSelfManagedCertificates runs the self-managed certificate mode against a real API
// server: two replicas bootstrap concurrently and agree on one Secret, the caBundle of every
// webhook in the real manifest is set, and when someone re-applies the manifest (wiping the
// caBundle) the controller puts it back.
func TestSelfManagedCertificates(t *testing.T) {
	env := &envtest.Environment{BinaryAssetsDirectory: testenv.KubebuilderAssets(t)}
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	scheme := k8sruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "apm-csi-system"}}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(manifest(t))
	if err != nil {
		t.Fatal(err)
	}
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := yaml.UnmarshalStrict(data, mwc); err != nil {
		t.Fatal(err)
	}
	if err := c.Create(ctx, mwc.DeepCopy()); err != nil {
		t.Fatal(err)
	}

	replica := func() *certs.SelfManaged {
		return &certs.SelfManaged{Client: c, Namespace: "apm-csi-system", SecretName: "apm-csi-webhook-tls",
			ServiceName: "apm-csi-webhook", WebhookConfigName: mwc.Name, CertDir: t.TempDir(), Log: slog.New(slog.DiscardHandler)}
	}
	a, b := replica(), replica()
	errs := make(chan error, 2)
	for _, r := range []*certs.SelfManaged{a, b} {
		go func() { _, err := r.Ensure(ctx); errs <- err }()
	}
	failures := 0
	for range 2 {
		if err := <-errs; err != nil {
			failures++ // the replica that lost the race; it retries
		}
	}
	for _, r := range []*certs.SelfManaged{a, b} {
		if _, err := r.Ensure(ctx); err != nil {
			t.Fatalf("after the race: %v", err)
		}
	}
	certA, _ := os.ReadFile(a.CertDir + "/tls.crt")
	certB, _ := os.ReadFile(b.CertDir + "/tls.crt")
	if !bytes.Equal(certA, certB) || len(certA) == 0 {
		t.Fatal("both replicas must serve the certificate of the one Secret")
	}
	t.Logf("replicas that lost the creation race and retried: %d", failures)

	assertBundle := func() {
		t.Helper()
		got := &admissionregistrationv1.MutatingWebhookConfiguration{}
		if err := c.Get(ctx, client.ObjectKey{Name: mwc.Name}, got); err != nil {
			t.Fatal(err)
		}
		for _, w := range got.Webhooks {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(w.ClientConfig.CABundle) {
				t.Fatalf("webhook %s has no caBundle", w.Name)
			}
		}
	}
	assertBundle()

	// The controller: a manager whose cache holds only the Secret and the configuration.
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{Scheme: scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		Cache: cache.Options{ByObject: a.CacheByObject()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	mctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- mgr.Start(mctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("the certificate controller's manager: %v", err)
		}
	})

	// Re-apply the manifest as shipped: no caBundle.
	current := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := c.Get(ctx, client.ObjectKey{Name: mwc.Name}, current); err != nil {
		t.Fatal(err)
	}
	for i := range current.Webhooks {
		current.Webhooks[i].ClientConfig.CABundle = nil
	}
	if err := c.Update(ctx, current); err != nil {
		t.Fatal(err)
	}
	h := &harness{client: c}
	h.eventually(t, "the controller to restore the caBundle", func() bool {
		got := &admissionregistrationv1.MutatingWebhookConfiguration{}
		if err := c.Get(ctx, client.ObjectKey{Name: mwc.Name}, got); err != nil {
			return false
		}
		for _, w := range got.Webhooks {
			if len(w.ClientConfig.CABundle) == 0 {
				return false
			}
		}
		return true
	})
	assertBundle()
}
