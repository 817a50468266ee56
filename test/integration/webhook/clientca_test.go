package webhook_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/webhook/certs"
)

// issue creates a certificate signed by parent (self-signed CA when parent is nil) and writes
// it and its key as PEM files in dir.
func issue(t *testing.T, dir, name string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	signer := key
	if parent == nil {
		tmpl.IsCA, tmpl.BasicConstraintsValid, tmpl.KeyUsage, tmpl.ExtKeyUsage = true, true, x509.KeyUsageCertSign, nil
		parent = tmpl
	} else {
		signer = parentKey
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// TestClientCA: with --client-ca the webhook answers a real API server that presents its
// client certificate (configured as documented, through WebhookAdmissionConfiguration), and
// refuses a caller without one.
func TestClientCA(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := issue(t, dir, "webhook-client-ca", nil, nil)
	issue(t, dir, "kube-apiserver", ca, caKey)
	kubeconfig := filepath.Join(dir, "webhook-kubeconfig.yaml")
	if err := os.WriteFile(kubeconfig, fmt.Appendf(nil, `apiVersion: v1
kind: Config
users:
- name: "*"
  user:
    client-certificate: %s
    client-key: %s
`, filepath.Join(dir, "kube-apiserver.crt"), filepath.Join(dir, "kube-apiserver.key")), 0o600); err != nil {
		t.Fatal(err)
	}
	admissionConfig := filepath.Join(dir, "admission.yaml")
	if err := os.WriteFile(admissionConfig, fmt.Appendf(nil, `apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: MutatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: %s
`, kubeconfig), 0o600); err != nil {
		t.Fatal(err)
	}
	clientCA, err := certs.ClientCA(filepath.Join(dir, "webhook-client-ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	h := startHarnessWith(t, harnessOptions{
		apiServerFlags: map[string]string{"admission-control-config-file": admissionConfig},
		tlsOpts:        []func(*tls.Config){clientCA},
	})
	h.setDriver(t, true)
	h.namespace(t, "ssi", map[string]string{"apm-csi.io/ssi": "enabled"}, nil)

	// The API server presented its certificate: the pod was mutated (failurePolicy Ignore
	// would have admitted it unmutated otherwise).
	assertCSIInjected(t, h.create(t, pod("ssi", "web", nil, nil)))

	// Anyone else who reaches the port gets no answer.
	wio := h.webhookAddr
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	resp, err := hc.Post("https://"+wio+"/mutate-v1-pod", "application/json", bytes.NewReader([]byte(`{}`)))
	if err == nil {
		resp.Body.Close()
		t.Fatalf("a caller without a client certificate got HTTP %d", resp.StatusCode)
	}
	t.Logf("caller without a certificate: %v", err)
}
