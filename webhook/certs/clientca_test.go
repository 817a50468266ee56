package certs

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// clientCert issues a client certificate (as the API server presents to webhooks) signed by ca.
func clientCert(t *testing.T, ca *keyPair) tls.Certificate {
	t.Helper()
	key, err := newKey()
	if err != nil {
		t.Fatal(err)
	}
	serial, err := serialNumber()
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	kp, err := sign(&x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca.cert, key, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(kp.certPEM, kp.keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return pair
}

// TestClientCARequiresTheCallersCertificate serves HTTPS with the option over real TLS
// handshakes: only a caller with a certificate from the configured CA gets an answer.
func TestClientCARequiresTheCallersCertificate(t *testing.T) {
	now := time.Now()
	servingCA, err := newCA("serving", now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	serving, err := newServingCert(servingCA, []string{"localhost"}, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	apiserverCA, err := newCA("apiserver-webhook-client", now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherCA, err := newCA("someone-else", now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "client-ca.crt")
	if err := os.WriteFile(file, apiserverCA.certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	opt, err := ClientCA(file)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(serving.certPEM, serving.keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) }))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	opt(srv.TLS)
	srv.StartTLS()
	defer srv.Close()

	roots := x509.NewCertPool()
	roots.AddCert(servingCA.cert)
	call := func(certs ...tls.Certificate) error {
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: roots, ServerName: "localhost", Certificates: certs,
		}}, Timeout: 10 * time.Second}
		resp, err := c.Get(srv.URL)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
		return nil
	}
	if err := call(); err == nil {
		t.Error("a caller without a client certificate was answered")
	}
	if err := call(clientCert(t, otherCA)); err == nil {
		t.Error("a caller with a certificate from another CA was answered")
	}
	if err := call(clientCert(t, apiserverCA)); err != nil {
		t.Errorf("the API server's certificate was refused: %v", err)
	}
}

func TestClientCAFileErrors(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]string{
		filepath.Join(dir, "missing.crt"): "no such file",
		notPEM:                            "no PEM certificate; give the PEM CA certificate that signs the API server's webhook client certificate",
	} {
		if _, err := ClientCA(file); err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "--client-ca") {
			t.Errorf("ClientCA(%s) = %v, want an error with %q", file, err, want)
		}
	}
}
