package localcluster

import (
	"crypto/x509"
	"encoding/pem"
)

// CABundleHas reports whether every certificate of the PEM ca is in the PEM bundle. cainjector
// merges CAs into a webhook's caBundle, so a bundle is checked for the CA, not compared to it.
func CABundleHas(bundle, ca []byte) bool {
	in := map[string]bool{}
	for _, c := range PEMCertificates(bundle) {
		in[string(c.Raw)] = true
	}
	want := PEMCertificates(ca)
	for _, c := range want {
		if !in[string(c.Raw)] {
			return false
		}
	}
	return len(want) > 0
}

// PEMCertificates returns the certificates of a PEM bundle, skipping other blocks.
func PEMCertificates(data []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return out
		}
		if c, err := x509.ParseCertificate(b.Bytes); err == nil && b.Type == "CERTIFICATE" {
			out = append(out, c)
		}
	}
}
