package deploy

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/apm-csi/apm-csi/test/localcluster"
)

// certManagerModule is the module whose API types the tests use and whose CRDs the API
// servers of these tests install.
const certManagerModule = "github.com/cert-manager/cert-manager"

var (
	certManagerCRDsOnce sync.Once
	certManagerCRDsDir  string
	certManagerCRDsErr  error
)

// certManagerCRDs returns the directory of cert-manager's own CustomResourceDefinitions in the
// source of the cert-manager release go.mod requires (deploy/crds of the module): the schemas
// its Helm chart installs (the chart's CRD templates add only labels), so the dry runs check
// apm-csi's Certificate and Issuer against what users have, not against hand-written fixtures.
func certManagerCRDs(t testing.TB) string {
	t.Helper()
	certManagerCRDsOnce.Do(func() {
		cmd := exec.Command("go", "mod", "download", "-json", certManagerModule)
		cmd.Dir = repoRoot(t)
		out, err := cmd.Output()
		if err != nil {
			certManagerCRDsErr = err
			return
		}
		var m struct{ Dir, Version, Error string }
		if err := json.Unmarshal(out, &m); err != nil {
			certManagerCRDsErr = err
			return
		}
		if m.Error != "" {
			certManagerCRDsErr = errString(m.Error)
			return
		}
		certManagerCRDsDir = filepath.Join(m.Dir, "deploy", "crds")
	})
	if certManagerCRDsErr != nil {
		t.Fatalf("locating cert-manager's CRDs (go mod download %s): %v", certManagerModule, certManagerCRDsErr)
	}
	return certManagerCRDsDir
}

type errString string

func (e errString) Error() string { return string(e) }

// TestCertManagerVersionIsOneRelease keeps the cert-manager release single: the version
// go.mod requires (API types, the CRDs of the deploy tests), the one
// hack/cert-manager-binaries.sh builds by default and the one the local cluster installs.
func TestCertManagerVersionIsOneRelease(t *testing.T) {
	root := repoRoot(t)
	gomod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(certManagerModule) + `\s+v(\S+)`).FindSubmatch(gomod)
	if m == nil {
		t.Fatalf("go.mod does not require %s", certManagerModule)
	}
	script, err := os.ReadFile(filepath.Join(root, "hack", "cert-manager-binaries.sh"))
	if err != nil {
		t.Fatal(err)
	}
	s := regexp.MustCompile(`CERT_MANAGER_VERSION:-([0-9.]+)`).FindSubmatch(script)
	if s == nil {
		t.Fatal("hack/cert-manager-binaries.sh names no default CERT_MANAGER_VERSION")
	}
	versions := map[string]string{
		"go.mod":                          string(m[1]),
		"hack/cert-manager-binaries.sh":   string(s[1]),
		"localcluster.CertManagerVersion": localcluster.CertManagerVersion,
	}
	for _, v := range versions {
		if v != localcluster.CertManagerVersion {
			t.Fatalf("cert-manager versions differ: %v", versions)
		}
	}
	if dir := certManagerCRDs(t); !strings.Contains(dir, "@v"+localcluster.CertManagerVersion) {
		t.Errorf("the CRDs come from %s, not cert-manager v%s", dir, localcluster.CertManagerVersion)
	}
}
