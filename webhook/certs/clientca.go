package certs

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
)

// ClientCA returns a TLS option that makes the webhook server accept only callers presenting a
// client certificate signed by a CA in file (PEM): the API server, when its admission
// configuration gives it a client certificate for webhooks. The file is read once, at start.
// It is the same check as controller-runtime's webhook.Options.ClientCAName, for a file
// anywhere (a mounted ConfigMap or Secret) rather than inside the serving certificate directory.
func ClientCA(file string) (func(*tls.Config), error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("--client-ca: %w", err)
	}
	certs, err := parseCertificates(data)
	if err != nil {
		return nil, fmt.Errorf("--client-ca %s: %w; give the PEM CA certificate that signs the API server's webhook client certificate", file, err)
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	return func(c *tls.Config) {
		c.ClientCAs = pool
		c.ClientAuth = tls.RequireAndVerifyClientCert
	}, nil
}
