package localcluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/yaml"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	cmclient "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned"

	"github.com/apm-csi/apm-csi/test/images"
)

// CertManagerVersion is the cert-manager release the local cluster installs: the one
// hack/cert-manager-binaries.sh builds by default and the one go.mod requires for the API
// types (a test keeps the three equal).
const CertManagerVersion = "1.21.2"

// CertManagerNamespace and CertManagerRelease are where InstallCertManager installs it, the
// names cert-manager's documentation uses.
const (
	CertManagerNamespace = "cert-manager"
	CertManagerRelease   = "cert-manager"
)

// certManagerComponents are cert-manager's programs, each in its own image, and the chart's
// values key of its image.
var certManagerComponents = []struct{ bin, valuesKey string }{
	{"controller", "image"},
	{"webhook", "webhook"},
	{"cainjector", "cainjector"},
}

// certManagerImageRef is the reference of a cert-manager component's image in the cluster.
func certManagerImageRef(bin string) string {
	return "localhost/cert-manager/" + bin + ":v" + CertManagerVersion
}

// CertManagerBuild runs hack/cert-manager-binaries.sh of the checkout at repoRoot, which builds
// cert-manager's controller, webhook and cainjector through the Go module proxy (once; cached
// by version), and returns the directory holding bin/ and chart/ (cert-manager's own Helm
// chart of that release, CRDs included).
func CertManagerBuild(ctx context.Context, repoRoot string) (string, error) {
	return HackScript(ctx, repoRoot, "cert-manager-binaries.sh", "CERT_MANAGER_VERSION="+CertManagerVersion)
}

// CertManagerOptions of InstallCertManager.
type CertManagerOptions struct {
	// RepoRoot is the apm-csi checkout (hack/cert-manager-binaries.sh).
	RepoRoot string
	// Helm is the helm binary that installs cert-manager's chart.
	Helm string
	// WorkDir receives the image tarballs.
	WorkDir string
}

// InstallCertManager installs the real cert-manager the way its documentation does, with its
// own Helm chart (CRDs included, crds.enabled=true) into the cert-manager namespace, the
// images pointing at the programs built by CertManagerBuild and imported into containerd. It
// returns once cert-manager's own webhook admits cert-manager objects (what the chart's
// startupapicheck Job checks, which is left out because it needs cmctl).
func (c *Cluster) InstallCertManager(ctx context.Context, o CertManagerOptions) error {
	start := time.Now()
	dir, err := CertManagerBuild(ctx, o.RepoRoot)
	if err != nil {
		return err
	}
	values := map[string]any{
		"crds":            map[string]any{"enabled": true},
		"startupapicheck": map[string]any{"enabled": false},
		// The controller launcher serves no clock-skew health endpoint.
		"livenessProbe": map[string]any{"enabled": false},
	}
	for _, comp := range certManagerComponents {
		bin := filepath.Join(dir, "bin", comp.bin)
		f, err := images.StaticBinary(bin, "/app/cmd/"+comp.bin)
		if err != nil {
			return err
		}
		ref := certManagerImageRef(comp.bin)
		tb, err := images.BuildAndWrite(images.Spec{
			Ref:        ref,
			Files:      []images.File{f},
			Entrypoint: []string{"/app/cmd/" + comp.bin},
			// cert-manager's chart runs its containers with runAsNonRoot and no runAsUser.
			User:   "1000:1000",
			Labels: map[string]string{"org.opencontainers.image.version": "v" + CertManagerVersion},
		}, filepath.Join(o.WorkDir, "cert-manager-"+comp.bin+".tar"))
		if err != nil {
			return err
		}
		if err := c.ImportImage(ctx, tb.Path); err != nil {
			return err
		}
		img := map[string]any{"repository": strings.TrimSuffix(ref, ":v"+CertManagerVersion), "tag": "v" + CertManagerVersion, "pullPolicy": "Never"}
		if comp.valuesKey == "image" {
			values["image"] = img
		} else {
			values[comp.valuesKey] = map[string]any{"image": img}
		}
	}
	data, err := yaml.Marshal(values)
	if err != nil {
		return err
	}
	// Not under WorkDir: helm splits --values at commas, which test names (and so t.TempDir)
	// may contain.
	valuesFile := filepath.Join(c.opts.runDir(), "cert-manager-values.yaml")
	if err := os.WriteFile(valuesFile, data, 0o600); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, o.Helm, "--kubeconfig", c.Kubeconfig(), "upgrade", "--install", CertManagerRelease, filepath.Join(dir, "chart"),
		"--namespace", CertManagerNamespace, "--create-namespace", "--values", valuesFile, "--wait", "--timeout", "5m")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("helm install cert-manager: %w\n%s", err, out)
	}
	if err := c.waitCertManagerWebhook(ctx); err != nil {
		return err
	}
	c.opts.logf("cert-manager v%s installed in %s", CertManagerVersion, time.Since(start).Round(100*time.Millisecond))
	return nil
}

// CertManagerClient is a typed cert-manager client with admin rights.
func (c *Cluster) CertManagerClient() (cmclient.Interface, error) {
	cfg, err := c.RestConfig()
	if err != nil {
		return nil, err
	}
	return cmclient.NewForConfig(cfg)
}

// waitCertManagerWebhook waits until the API server, calling cert-manager's webhook, admits
// an Issuer (a server-side dry run): the webhook serves and cainjector has put the webhook's
// CA into its configurations.
func (c *Cluster) waitCertManagerWebhook(ctx context.Context) error {
	cm, err := c.CertManagerClient()
	if err != nil {
		return err
	}
	probe := &cmapi.Issuer{
		ObjectMeta: metav1.ObjectMeta{Name: "cert-manager-probe", Namespace: CertManagerNamespace},
		Spec:       cmapi.IssuerSpec{IssuerConfig: cmapi.IssuerConfig{SelfSigned: &cmapi.SelfSignedIssuer{}}},
	}
	waitCtx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var last error
	err = poll(waitCtx, 500*time.Millisecond, func() (bool, error) {
		_, last = cm.CertmanagerV1().Issuers(CertManagerNamespace).Create(waitCtx, probe, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return last == nil, nil
	})
	if err != nil {
		return fmt.Errorf("cert-manager's webhook does not admit an Issuer: %v (last: %v)", err, last)
	}
	return nil
}

// RenewCertificate asks cert-manager to re-issue a Certificate now, as `cmctl renew` does: it
// sets the Issuing condition with reason ManuallyTriggered through the status subresource.
func RenewCertificate(ctx context.Context, cm cmclient.Interface, ns, name string) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		crt, err := cm.CertmanagerV1().Certificates(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now()
		cond := cmapi.CertificateCondition{
			Type:               cmapi.CertificateConditionIssuing,
			Status:             cmmeta.ConditionTrue,
			Reason:             "ManuallyTriggered",
			Message:            "Certificate re-issuance manually triggered by an apm-csi test",
			LastTransitionTime: &now,
			ObservedGeneration: crt.Generation,
		}
		replaced := false
		for i := range crt.Status.Conditions {
			if crt.Status.Conditions[i].Type == cmapi.CertificateConditionIssuing {
				crt.Status.Conditions[i] = cond
				replaced = true
			}
		}
		if !replaced {
			crt.Status.Conditions = append(crt.Status.Conditions, cond)
		}
		_, err = cm.CertmanagerV1().Certificates(ns).UpdateStatus(ctx, crt, metav1.UpdateOptions{})
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("the Certificate %s/%s is gone", ns, name)
		}
		return err
	})
}
