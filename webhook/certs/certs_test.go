package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/certwatcher"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
)

const (
	ns      = "apm-csi-system"
	svcName = "apm-csi-webhook"
)

type fixture struct {
	s      *SelfManaged
	client client.Client
	now    time.Time
	reload int
}

func newFixture(t *testing.T, objs ...client.Object) *fixture {
	t.Helper()
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: "apm-csi-webhook"},
		Webhooks:   []admissionregistrationv1.MutatingWebhook{{Name: "a.apm-csi.io"}, {Name: "b.apm-csi.io"}},
	}
	f := &fixture{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	f.client = fake.NewClientBuilder().WithScheme(scheme).WithObjects(append(objs, mwc)...).Build()
	f.s = &SelfManaged{
		Client: f.client, Namespace: ns, SecretName: "apm-csi-webhook-tls", ServiceName: svcName,
		WebhookConfigName: "apm-csi-webhook", CertDir: t.TempDir(),
		Reload: func() error { f.reload++; return nil },
		Now:    func() time.Time { return f.now }, Log: slog.New(slog.DiscardHandler),
	}
	return f
}

func (f *fixture) secret(t *testing.T) *corev1.Secret {
	t.Helper()
	s := &corev1.Secret{}
	if err := f.client.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: "apm-csi-webhook-tls"}, s); err != nil {
		t.Fatal(err)
	}
	return s
}

func (f *fixture) bundles(t *testing.T) [][]byte {
	t.Helper()
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := f.client.Get(context.Background(), types.NamespacedName{Name: "apm-csi-webhook"}, mwc); err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for _, w := range mwc.Webhooks {
		out = append(out, w.ClientConfig.CABundle)
	}
	return out
}

// verify checks, as the API server does, that the certificate on disk is trusted by the
// caBundle for the service's DNS name at time at.
func (f *fixture) verify(t *testing.T, at time.Time) *x509.Certificate {
	t.Helper()
	pair, err := tls.LoadX509KeyPair(filepath.Join(f.s.CertDir, "tls.crt"), filepath.Join(f.s.CertDir, "tls.key"))
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(pair.Certificate[0])
	for i, bundle := range f.bundles(t) {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(bundle) {
			t.Fatalf("webhook %d has no caBundle", i)
		}
		if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: svcName + "." + ns + ".svc", CurrentTime: at}); err != nil {
			t.Fatalf("webhook %d: serving certificate not trusted: %v", i, err)
		}
	}
	return cert
}

func TestEnsureCreatesAndIsStable(t *testing.T) {
	f := newFixture(t)
	due, err := f.s.Ensure(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	cert := f.verify(t, f.now)
	if f.reload != 1 {
		t.Errorf("reload called %d times", f.reload)
	}
	if want := cert.NotAfter.Add(-cert.NotAfter.Sub(cert.NotBefore) / 3); !due.Equal(want) {
		t.Errorf("next renewal %v, want %v", due, want)
	}
	s := f.secret(t)
	if s.Type != corev1.SecretTypeTLS || len(s.Data[KeyCAKey]) == 0 {
		t.Errorf("secret = %s %v", s.Type, s.Data)
	}

	// A second pass (another replica, or a resync) changes nothing.
	rv := s.ResourceVersion
	f.now = f.now.Add(24 * time.Hour)
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	if f.secret(t).ResourceVersion != rv || f.reload != 1 {
		t.Error("an up-to-date certificate must not be rewritten or reloaded")
	}
}

func TestEnsureRenewsServingCertificate(t *testing.T) {
	f := newFixture(t)
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	first := f.verify(t, f.now)
	caBefore := f.secret(t).Data[KeyCABundle]

	f.now = first.NotAfter.Add(-DefaultCertValidity / 4) // within the last third
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	second := f.verify(t, f.now)
	if second.SerialNumber.Cmp(first.SerialNumber) == 0 || !second.NotAfter.After(first.NotAfter) {
		t.Error("the serving certificate was not renewed")
	}
	if string(f.secret(t).Data[KeyCABundle]) != string(caBefore) {
		t.Error("renewing the serving certificate must keep the CA")
	}
	if f.reload != 2 {
		t.Errorf("reload called %d times", f.reload)
	}
}

func TestEnsureRotatesCA(t *testing.T) {
	f := newFixture(t)
	f.s.CAValidity = 90 * 24 * time.Hour
	f.s.CertValidity = 30 * 24 * time.Hour
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	oldCA, _ := parseCertificates(f.secret(t).Data[KeyCABundle])

	f.now = f.now.Add(70 * 24 * time.Hour) // CA in its last third
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	bundle, _ := parseCertificates(f.secret(t).Data[KeyCABundle])
	if len(bundle) != 2 || !bundle[1].Equal(oldCA[0]) || bundle[0].Equal(oldCA[0]) {
		t.Fatalf("during a CA rotation the bundle holds the new CA, then the old one; got %d certificates", len(bundle))
	}
	cert := f.verify(t, f.now)
	if cert.CheckSignatureFrom(bundle[0]) != nil {
		t.Error("the serving certificate must be signed by the new CA")
	}

	f.now = oldCA[0].NotAfter.Add(time.Hour) // the old CA expired
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	bundle, _ = parseCertificates(f.secret(t).Data[KeyCABundle])
	if len(bundle) != 1 {
		t.Errorf("an expired CA must leave the bundle; %d certificates", len(bundle))
	}
	f.verify(t, f.now)
}

func TestEnsureRepairs(t *testing.T) {
	corrupt := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "apm-csi-webhook-tls"},
		Type:       corev1.SecretTypeOpaque,
		Data:       map[string][]byte{KeyCert: []byte("garbage"), KeyKey: []byte("garbage")},
	}
	f := newFixture(t, corrupt)
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.verify(t, f.now)

	// Someone re-applies the manifest without a caBundle.
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{}
	_ = f.client.Get(context.Background(), types.NamespacedName{Name: "apm-csi-webhook"}, mwc)
	mwc.Webhooks[1].ClientConfig.CABundle = nil
	if err := f.client.Update(context.Background(), mwc); err != nil {
		t.Fatal(err)
	}
	if _, err := f.s.Reconcile(context.Background(), reconcileRequest()); err != nil {
		t.Fatal(err)
	}
	f.verify(t, f.now)

	// A certificate for another service name is replaced.
	f.s.ServiceName = "renamed"
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	cert, _ := parseCertificates(f.secret(t).Data[KeyCert])
	if cert[0].VerifyHostname("renamed.apm-csi-system.svc") != nil {
		t.Errorf("DNS names = %v", cert[0].DNSNames)
	}
}

func TestEnsureWithoutWebhookConfiguration(t *testing.T) {
	f := newFixture(t)
	f.s.WebhookConfigName = "not-installed-yet"
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatalf("a missing configuration must not stop the certificate: %v", err)
	}
	if _, err := os.Stat(filepath.Join(f.s.CertDir, "tls.crt")); err != nil {
		t.Fatal(err)
	}
}

// TestServedCertificateReloadsFromDisk runs a real TLS server on loopback whose certificate
// comes from controller-runtime's certwatcher, renews the certificate, and checks that new
// connections get the new one without a restart.
func TestServedCertificateReloadsFromDisk(t *testing.T) {
	f := newFixture(t)
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	watcher, err := certwatcher.New(filepath.Join(f.s.CertDir, "tls.crt"), filepath.Join(f.s.CertDir, "tls.key"))
	if err != nil {
		t.Fatal(err)
	}
	f.s.Reload = watcher.ReadCertificate
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: watcher.GetCertificate})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(http.ResponseWriter, *http.Request) {})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })

	served := func() *x509.Certificate {
		t.Helper()
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(f.secret(t).Data[KeyCABundle])
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(),
			&tls.Config{RootCAs: pool, ServerName: svcName + "." + ns + ".svc",
				Time: func() time.Time { return f.now }})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0]
	}
	first := served()
	f.now = first.NotAfter.Add(-DefaultCertValidity / 4)
	if _, err := f.s.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	if second := served(); second.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatal("the server still serves the old certificate")
	}
}

func reconcileRequest() reconcile.Request {
	return reconcile.Request{NamespacedName: types.NamespacedName{Namespace: ns, Name: "apm-csi-webhook-tls"}}
}
