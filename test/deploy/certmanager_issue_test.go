package deploy

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	cmclient "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned"

	"github.com/apm-csi/apm-csi/test/localcluster"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// TestCertManagerIssuesAndRenewsWebhookCertificate installs every variant in cert-manager mode
// whose issuer it renders (the cert-manager overlay, the chart's cert-manager values) into a
// real kube-apiserver with cert-manager's CRDs, the documented way (`kubectl apply -k`,
// `helm install`), and runs the real cert-manager controller and cainjector (built from the
// cert-manager module by hack/cert-manager-binaries.sh) against it. The Certificate the
// webhook configuration names must become Ready, its CA must be injected into the
// MutatingWebhookConfiguration and the issued certificate must verify against it for the
// Service's name. Then a renewal is forced: the serving certificate must change while the CA
// the API server trusts stays the same, so that the certificate the webhook keeps serving
// until the kubelet refreshes the mounted Secret is still trusted.
func TestCertManagerIssuesAndRenewsWebhookCertificate(t *testing.T) {
	assets := testenv.KubebuilderAssets(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmDir, err := localcluster.CertManagerBuild(ctx, repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	ran := 0
	for _, v := range Variants(t) {
		in := install(t, Set{Objs: Objects(t, v)})
		if in.DropIn { // no webhook, so no certificate
			continue
		}
		if FlagValue(t, in.WebhookCont, "cert-mode", "cert-manager") != "cert-manager" || len(in.WebhookConfigs) == 0 {
			continue
		}
		ns, name, ok := strings.Cut(in.WebhookConfigs[0].Annotations[injectCAAnnotation], "/")
		crt := in.Get("Certificate", ns, name)
		if !ok || crt == nil {
			continue // checkTLS reports this
		}
		ref := typed[cmapi.Certificate](t, crt).Spec.IssuerRef
		kind, issuer := ref.Kind, ref.Name
		if (kind != "" && kind != "Issuer") || in.Get("Issuer", ns, issuer) == nil {
			t.Logf("%s: the Certificate's issuer %s %q is the user's own, not rendered; nothing to issue here", v.Name, kind, issuer)
			continue
		}
		ran++
		t.Run(v.Name, func(t *testing.T) { issueAndRenew(t, ctx, assets, cmDir, v, ns, name) })
	}
	if ran == 0 {
		t.Fatal("no variant renders cert-manager mode with its own issuer (the cert-manager overlay should)")
	}
}

func issueAndRenew(t *testing.T, ctx context.Context, assets, cmDir string, v Variant, ns, certName string) {
	cp := startCertManager(t, ctx, assets, cmDir)
	cs, cm, kenv := cp.cs, cp.cm, cp.kenv

	if v.Helm {
		args := []string{"install", "apm-csi", chartDir, "--namespace", v.Namespace, "--create-namespace"}
		if v.Values != "" {
			args = append(args, "--values", v.Values)
		}
		if out, err := runEnv(t, kenv, helm(t), args...); err != nil {
			t.Fatalf("helm install: %v\n%s", err, out)
		}
	} else if out, err := runEnv(t, kenv, kubectl(t), "apply", "-k", v.Kustomize); err != nil {
		t.Fatalf("kubectl apply -k: %v\n%s", err, out)
	}

	first := waitIssued(t, ctx, cs, cm, ns, certName, 0)
	if err := localcluster.RenewCertificate(ctx, cm, ns, certName); err != nil {
		t.Fatal(err)
	}
	renewed := waitIssued(t, ctx, cs, cm, ns, certName, first.revision)
	if renewed.leaf.Equal(first.leaf) {
		t.Fatalf("the renewal kept the serving certificate (serial %s)", first.leaf.SerialNumber)
	}
	if !bytes.Equal(renewed.ca, first.ca) {
		t.Errorf("the renewal changed the CA the API server trusts: the webhook serves the previous certificate until the kubelet refreshes the Secret, and the API server would reject it (pods admitted unmutated)")
	}
	// The certificate the webhook still serves right after the renewal verifies against the CA
	// now injected.
	if err := verifyLeaf(first.leaf, renewed.ca, ns); err != nil {
		t.Errorf("the previous serving certificate is not trusted after the renewal: %v", err)
	}
	t.Logf("%s: revision %d -> %d, serial %s -> %s, CA %q unchanged", v.Name, first.revision, renewed.revision,
		first.leaf.SerialNumber, renewed.leaf.SerialNumber, first.leaf.Issuer.CommonName)
}

type issued struct {
	revision int
	leaf     *x509.Certificate
	ca       []byte
}

// waitIssued waits until the Certificate is Ready at a revision after minRevision, its Secret
// holds that certificate, the MutatingWebhookConfigurations carry its CA, and the certificate
// verifies against that CA for the webhook Service's name. cainjector merges the CA into the
// caBundle (cert-manager's CAInjectorMerging, on by default since v1.21): CAs already there
// stay until they expire, so the caBundle must contain the CA, not equal it.
func waitIssued(t *testing.T, ctx context.Context, cs kubernetes.Interface, cm cmclient.Interface, ns, name string, minRevision int) issued {
	t.Helper()
	var got issued
	var last string
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		crt, err := cm.CertmanagerV1().Certificates(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		ready := false
		for _, c := range crt.Status.Conditions {
			if c.Type == cmapi.CertificateConditionReady {
				ready = c.Status == cmmeta.ConditionTrue && c.ObservedGeneration == crt.Generation
				last = string(c.Status) + " " + c.Reason + ": " + c.Message
			}
		}
		if !ready || crt.Status.Revision == nil || *crt.Status.Revision <= minRevision {
			return false, nil
		}
		s, err := cs.CoreV1().Secrets(ns).Get(ctx, crt.Spec.SecretName, metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		b, _ := pem.Decode(s.Data[corev1.TLSCertKey])
		if b == nil {
			return false, nil
		}
		leaf, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return false, nil
		}
		ca := s.Data[cmmeta.TLSCAKey]
		mwcs, err := cs.AdmissionregistrationV1().MutatingWebhookConfigurations().List(ctx, metav1.ListOptions{})
		if err != nil || len(mwcs.Items) == 0 {
			return false, nil
		}
		for _, m := range mwcs.Items {
			for _, w := range m.Webhooks {
				if !localcluster.CABundleHas(w.ClientConfig.CABundle, ca) {
					last = "cainjector has not injected the CA into " + m.Name + " yet"
					return false, nil
				}
			}
		}
		got = issued{revision: *crt.Status.Revision, leaf: leaf, ca: ca}
		return true, nil
	})
	if err != nil {
		t.Fatalf("Certificate %s/%s issued after revision %d with its CA injected: %v (last: %s)", ns, name, minRevision, err, last)
	}
	if err := verifyLeaf(got.leaf, got.ca, ns); err != nil {
		t.Fatalf("the issued certificate does not verify against the injected CA: %v", err)
	}
	return got
}

func verifyLeaf(leaf *x509.Certificate, caPEM []byte, ns string) error {
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: "apm-csi-webhook." + ns + ".svc"})
	return err
}

// startProcess runs a program until the test ends, its output in dir (shown on failure).
func startProcess(t *testing.T, ctx context.Context, dir string, env []string, bin string, args ...string) {
	t.Helper()
	logPath := filepath.Join(dir, filepath.Base(bin)+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logf.Close()
		if t.Failed() {
			if data, err := os.ReadFile(logPath); err == nil {
				lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
				if len(lines) > 40 {
					lines = lines[len(lines)-40:]
				}
				t.Logf("%s log (tail):\n%s", filepath.Base(bin), strings.Join(lines, "\n"))
			}
		}
	})
}

// certManagerControlPlane is a real kube-apiserver with cert-manager's CRDs and the real
// cert-manager controller and CA injector running against it as host processes.
type certManagerControlPlane struct {
	cfg  *rest.Config
	cs   kubernetes.Interface
	cm   cmclient.Interface
	kenv []string // KUBECONFIG for kubectl and helm, with admin rights
}

func startCertManager(t *testing.T, ctx context.Context, assets, cmDir string) certManagerControlPlane {
	t.Helper()
	cfg := startAPIServer(t, assets)
	dir := t.TempDir()
	admin := kubeconfig(t, cfg, "", "", dir, "admin")
	kenv := []string{"KUBECONFIG=" + admin}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cm, err := cmclient.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "kube-system"}}, metav1.CreateOptions{}); err != nil && !strings.Contains(err.Error(), "already exists") {
		t.Fatal(err)
	}
	startProcess(t, ctx, dir, kenv, filepath.Join(cmDir, "bin", "controller"), "--kubeconfig="+admin, "--cluster-resource-namespace=kube-system", "--v=2")
	startProcess(t, ctx, dir, kenv, filepath.Join(cmDir, "bin", "cainjector"), "--leader-election-namespace=kube-system", "--v=2")
	return certManagerControlPlane{cfg: cfg, cs: cs, cm: cm, kenv: kenv}
}
