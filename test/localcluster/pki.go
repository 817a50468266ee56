package localcluster

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// keyPair is a certificate and its key, PEM encoded.
type keyPair struct {
	cert    *x509.Certificate
	key     crypto.Signer
	certPEM []byte
	keyPEM  []byte
}

// certRequest describes one leaf certificate signed by the cluster CA.
type certRequest struct {
	file         string // base name under pki/: <file>.crt and <file>.key
	commonName   string
	organization []string
	dnsNames     []string
	ips          []net.IP
	usage        x509.ExtKeyUsage
}

// pkiValidity is long enough for any test run or demo; the CA is regenerated on every Up.
const pkiValidity = 365 * 24 * time.Hour

func newKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func encodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func serialNumber() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

// newCA creates a self-signed CA.
func newCA(now time.Time) (*keyPair, error) {
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "apm-csi-localcluster-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(pkiValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	return sign(tmpl, key, tmpl, key)
}

func sign(tmpl *x509.Certificate, key crypto.Signer, parent *x509.Certificate, parentKey crypto.Signer) (*keyPair, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, err
	}
	return &keyPair{
		cert:    cert,
		key:     key,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  keyPEM,
	}, nil
}

// issue signs a leaf certificate with kp as the CA.
func (kp *keyPair) issue(req certRequest, now time.Time) (*keyPair, error) {
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: req.commonName, Organization: req.organization},
		DNSNames:     req.dnsNames,
		IPAddresses:  req.ips,
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(pkiValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{req.usage},
	}
	return sign(tmpl, key, kp.cert, kp.key)
}

func (kp *keyPair) write(dir, base string) error {
	if err := os.WriteFile(filepath.Join(dir, base+".crt"), kp.certPEM, 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, base+".key"), kp.keyPEM, 0o600)
}

// Identities the components present to the API server. The controller-manager, scheduler and
// kube-proxy names are those the API server's bootstrap RBAC policy grants their roles to;
// the kubelet's name is what the Node authorizer and NodeRestriction expect.
func (o Options) clientIdentities() map[string]certRequest {
	return map[string]certRequest{
		"admin":              {file: "admin", commonName: "kubernetes-admin", organization: []string{"system:masters"}},
		"controller-manager": {file: "controller-manager", commonName: "system:kube-controller-manager"},
		"scheduler":          {file: "scheduler", commonName: "system:kube-scheduler"},
		"kube-proxy":         {file: "kube-proxy", commonName: "system:kube-proxy"},
		"kubelet":            {file: "kubelet-client", commonName: "system:node:" + o.NodeName, organization: []string{"system:nodes"}},
	}
}

// writePKI generates the CA, serving certificates, client certificates, the service-account
// key pair and one kubeconfig per client identity. Everything is regenerated on every Up, so
// no state of an earlier run can leak in.
func (o Options) writePKI() error {
	dir := o.pkiDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := os.MkdirAll(o.kubeconfigDir(), 0o700); err != nil {
		return err
	}
	now := time.Now()
	ca, err := newCA(now)
	if err != nil {
		return err
	}
	if err := ca.write(dir, "ca"); err != nil {
		return err
	}
	nodeIP := net.IP(o.nodeIP().AsSlice())
	serving := []certRequest{
		{
			file:       "apiserver",
			commonName: "kube-apiserver",
			dnsNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
				"kubernetes.default.svc.cluster.local"},
			ips:   []net.IP{net.IPv4(127, 0, 0, 1), nodeIP, net.IP(o.apiServerServiceIP().AsSlice())},
			usage: x509.ExtKeyUsageServerAuth,
		},
		{
			file:       "kubelet",
			commonName: o.NodeName,
			dnsNames:   []string{o.NodeName, "localhost"},
			ips:        []net.IP{net.IPv4(127, 0, 0, 1), nodeIP},
			usage:      x509.ExtKeyUsageServerAuth,
		},
		{
			// The API server authenticates to kubelets (logs, exec, port-forward) with this.
			file:         "apiserver-kubelet-client",
			commonName:   "kube-apiserver-kubelet-client",
			organization: []string{"system:masters"},
			usage:        x509.ExtKeyUsageClientAuth,
		},
	}
	for _, req := range serving {
		kp, err := ca.issue(req, now)
		if err != nil {
			return fmt.Errorf("certificate %s: %w", req.file, err)
		}
		if err := kp.write(dir, req.file); err != nil {
			return err
		}
	}

	// Service-account token signing key pair (kube-apiserver signs, verifies; the
	// controller-manager's token controller signs legacy tokens).
	saKey, err := newKey()
	if err != nil {
		return err
	}
	saKeyPEM, err := encodeKey(saKey)
	if err != nil {
		return err
	}
	saPubDER, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.key"), saKeyPEM, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPubDER}), 0o644); err != nil {
		return err
	}

	for name, req := range o.clientIdentities() {
		req.usage = x509.ExtKeyUsageClientAuth
		kp, err := ca.issue(req, now)
		if err != nil {
			return fmt.Errorf("certificate %s: %w", req.file, err)
		}
		if err := kp.write(dir, req.file); err != nil {
			return err
		}
		if err := writeKubeconfig(filepath.Join(o.kubeconfigDir(), name+".conf"), o.apiServerURL(), req.commonName, ca.certPEM, kp); err != nil {
			return err
		}
	}
	return nil
}

// writeKubeconfig writes a self-contained kubeconfig (certificates embedded).
func writeKubeconfig(path, server, user string, caPEM []byte, client *keyPair) error {
	const clusterName, contextName = "apm-csi-local", "apm-csi-local"
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[clusterName] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caPEM}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: client.certPEM, ClientKeyData: client.keyPEM}
	cfg.Contexts[contextName] = &clientcmdapi.Context{Cluster: clusterName, AuthInfo: user}
	cfg.CurrentContext = contextName
	return clientcmd.WriteToFile(*cfg, path)
}
