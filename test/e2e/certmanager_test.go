package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	cmclient "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned"

	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/localcluster"
	"github.com/apm-csi/apm-csi/webhook/annotations"
)

// certWait bounds each wait on cert-manager and on the webhook's reload: the kubelet updates
// a mounted Secret on its sync period (about a minute), then certwatcher reloads it.
const certWait = 4 * time.Minute

// loadInterval paces the pods created during a renewal (5 a second).
const loadInterval = 200 * time.Millisecond

// scenarioCertManager installs the real cert-manager (its own chart, CRDs included, with its
// controller, webhook and cainjector built from the cert-manager module), switches apm-csi's
// chart to cert-manager mode and checks what the README's first install path promises: the
// Certificate becomes Ready, cainjector puts its CA into the MutatingWebhookConfiguration, the
// webhook serves the issued certificate, and an SSI pod is instrumented. Then it forces a
// renewal (what `cmctl renew` does) while pods are created continuously: the webhook must serve
// the new certificate without restarting, and every pod created meanwhile must be mutated. It
// leaves apm-csi in self-managed mode, as the other scenarios expect; cert-manager stays
// installed (it touches nothing outside its namespace and the objects it is asked about).
func scenarioCertManager(t *testing.T, ctx context.Context, e *env) {
	start := time.Now()
	if err := e.c.InstallCertManager(ctx, localcluster.CertManagerOptions{
		RepoRoot: e.d.Opts.RepoRoot, Helm: e.d.HelmPath(), WorkDir: t.TempDir(),
	}); err != nil {
		t.Fatal(err)
	}
	measure(t, "install cert-manager (build cached)", start)
	cm, err := e.c.CertManagerClient()
	if err != nil {
		t.Fatal(err)
	}

	restored := false
	t.Cleanup(func() {
		if !restored {
			if err := e.d.SetWebhookTLSMode(context.Background(), framework.TLSModeSelfManaged); err != nil {
				t.Errorf("restoring the webhook's self-managed TLS: %v", err)
			}
		}
	})
	start = time.Now()
	if err := e.d.SetWebhookTLSMode(ctx, framework.TLSModeCertManager); err != nil {
		t.Fatal(err)
	}
	issued := checkIssuedCertificateServed(t, ctx, e, cm, 0)
	measure(t, "helm upgrade to cert-manager mode until the issued certificate is served", start)

	ns := namespace(t, ctx, e, "e2e-cert-manager", ssiLabels)
	pod := createReady(t, ctx, e, framework.BusyboxPod(ns, "ssi-app", "true"))
	checkInstrumented(t, e, pod, e.jsRef)
	execIn(t, ctx, e, pod, "test", "-f", ddTracePackageJSON)

	renewUnderLoad(t, ctx, e, cm, ns, issued)

	if err := e.d.SetWebhookTLSMode(ctx, framework.TLSModeSelfManaged); err != nil {
		t.Fatal(err)
	}
	restored = true
}

// issuedCert is what cert-manager issued and the webhook serves.
type issuedCert struct {
	revision int
	serial   string
	pod      *corev1.Pod
}

// checkIssuedCertificateServed waits until the webhook's Certificate is Ready at a revision
// after minRevision, its CA is in the MutatingWebhookConfiguration, and the webhook pod serves
// exactly the leaf certificate in the Secret.
func checkIssuedCertificateServed(t *testing.T, ctx context.Context, e *env, cm cmclient.Interface, minRevision int) issuedCert {
	t.Helper()
	var crt *cmapi.Certificate
	if err := framework.Poll(ctx, certWait, fmt.Sprintf("Certificate %s Ready (revision > %d)", framework.WebhookName, minRevision), func() (bool, error) {
		var err error
		crt, err = cm.CertmanagerV1().Certificates(framework.Namespace).Get(ctx, framework.WebhookName, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		return certificateReady(crt) && crt.Status.Revision != nil && *crt.Status.Revision > minRevision, nil
	}); err != nil {
		t.Fatalf("%v; last status: %+v", err, statusOf(crt))
	}

	var secret *corev1.Secret
	var leaf *x509.Certificate
	if err := framework.Poll(ctx, certWait, "the Secret to hold the certificate of the Ready revision", func() (bool, error) {
		var err error
		secret, err = e.cs.CoreV1().Secrets(framework.Namespace).Get(ctx, crt.Spec.SecretName, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		leaf, err = firstCert(secret.Data[corev1.TLSCertKey])
		if err != nil {
			return false, nil
		}
		return secret.Annotations[cmapi.CertificateNameKey] == crt.Name && len(secret.Data[cmmeta.TLSCAKey]) > 0, nil
	}); err != nil {
		t.Fatal(err)
	}
	ca := secret.Data[cmmeta.TLSCAKey]

	if err := framework.Poll(ctx, certWait, "cainjector to put the Certificate's CA into the MutatingWebhookConfiguration", func() (bool, error) {
		mwc, err := e.cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, framework.WebhookName, metav1.GetOptions{})
		if err != nil || len(mwc.Webhooks) == 0 {
			return false, nil
		}
		// cainjector merges the CA into the caBundle (cert-manager's CAInjectorMerging, on by
		// default since v1.21): the self-managed CA stays next to it until it expires.
		for _, w := range mwc.Webhooks {
			if !localcluster.CABundleHas(w.ClientConfig.CABundle, ca) {
				return false, nil
			}
		}
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}

	var pod *corev1.Pod
	var served *x509.Certificate
	if err := framework.Poll(ctx, certWait, "the webhook to serve the issued certificate (serial "+leaf.SerialNumber.String()+")", func() (bool, error) {
		pods, err := e.d.WebhookPods(ctx)
		if err != nil || len(pods) != 1 || pods[0].Status.PodIP == "" {
			return false, nil
		}
		pod = &pods[0]
		served, err = servedCert(ctx, pod.Status.PodIP)
		return err == nil && served.Equal(leaf), nil
	}); err != nil {
		t.Fatalf("%v; served: %v", err, describeCert(served))
	}
	// The served chain verifies against the injected CA: what the API server checks.
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca) {
		t.Fatalf("ca.crt of Secret %s holds no PEM certificate", secret.Name)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: framework.WebhookName + "." + framework.Namespace + ".svc"}); err != nil {
		t.Fatalf("the served certificate does not verify against the injected CA for the Service name: %v", err)
	}
	t.Logf("Certificate %s revision %d: serial %s, issuer %q, valid until %s; the webhook pod %s serves it",
		crt.Name, *crt.Status.Revision, leaf.SerialNumber, leaf.Issuer.CommonName, leaf.NotAfter.Format(time.RFC3339), pod.Name)
	return issuedCert{revision: *crt.Status.Revision, serial: leaf.SerialNumber.String(), pod: pod}
}

// renewUnderLoad forces a renewal of the webhook's Certificate while a loader creates pods in
// the SSI namespace ns, and checks that the webhook serves the renewed certificate without a
// restart and that no pod was admitted without the library volume or refused.
func renewUnderLoad(t *testing.T, ctx context.Context, e *env, cm cmclient.Interface, ns string, before issuedCert) {
	t.Helper()
	l := startLoader(ctx, e, ns)
	start := time.Now()
	if err := localcluster.RenewCertificate(ctx, cm, framework.Namespace, framework.WebhookName); err != nil {
		l.stop()
		t.Fatal(err)
	}
	after := checkIssuedCertificateServed(t, ctx, e, cm, before.revision)
	reloaded := time.Since(start)
	// A little more load once the new certificate is served: the API server has the new CA and
	// the webhook the new key from here on.
	settle := time.NewTimer(5 * time.Second)
	select {
	case <-settle.C:
	case <-ctx.Done():
	}
	res := l.stop()
	t.Logf("MEASURE cert-manager renewal under load: pods created %d, pods mutated %d, admitted unmutated %d, admission errors %d, renewal to new certificate served %s",
		res.created, res.mutated, res.created-res.mutated, res.errors, reloaded.Round(100*time.Millisecond))

	if after.serial == before.serial {
		t.Errorf("the renewal kept serial %s", after.serial)
	}
	if after.pod.UID != before.pod.UID || restarts(after.pod) != restarts(before.pod) {
		t.Errorf("the webhook restarted to pick up the certificate: pod %s (uid %s, %d restarts) before, %s (uid %s, %d restarts) after",
			before.pod.Name, before.pod.UID, restarts(before.pod), after.pod.Name, after.pod.UID, restarts(after.pod))
	}
	if res.created == 0 {
		t.Fatalf("no pod was created during the renewal (errors: %v)", res.firstErrors)
	}
	if res.mutated != res.created {
		t.Errorf("%d of %d pods created during the renewal were admitted without the library volume: %v", res.created-res.mutated, res.created, res.unmutated)
	}
	if res.errors != 0 {
		t.Errorf("%d pod creations failed during the renewal: %v", res.errors, res.firstErrors)
	}
}

// loader creates pods one after the other until stopped. The pods are bound to a node that
// does not exist, so that admission is all they cost: the kubelet never runs them; each is
// deleted (without grace) once counted.
type loader struct {
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	res    loadResult
}

type loadResult struct {
	created, mutated, errors int
	unmutated, firstErrors   []string
}

func startLoader(ctx context.Context, e *env, ns string) *loader {
	ctx, cancel := context.WithCancel(ctx)
	l := &loader{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		tick := time.NewTicker(loadInterval)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			p := framework.BusyboxPod(ns, "renewal-load-"+strconv.Itoa(i), "true")
			p.Spec.NodeName = "e2e-no-such-node"
			got, err := e.cs.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
			if ctx.Err() != nil {
				return // cancelled mid-request: neither counted as created nor as an error
			}
			l.mu.Lock()
			switch {
			case err != nil:
				l.res.errors++
				if len(l.res.firstErrors) < 5 {
					l.res.firstErrors = append(l.res.firstErrors, err.Error())
				}
			default:
				l.res.created++
				if framework.LibraryVolume(got) != nil && got.Annotations[annotations.InjectionStatus] != "" {
					l.res.mutated++
				} else if len(l.res.unmutated) < 10 {
					l.res.unmutated = append(l.res.unmutated, got.Name+" at "+got.CreationTimestamp.Format(time.RFC3339))
				}
			}
			l.mu.Unlock()
			if err == nil {
				// Admission was all it was for; no kubelet will ever confirm its deletion.
				_ = e.cs.CoreV1().Pods(ns).Delete(ctx, got.Name, metav1.DeleteOptions{GracePeriodSeconds: framework.Ptr[int64](0)})
			}
		}
	}()
	return l
}

func (l *loader) stop() loadResult {
	l.cancel()
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.res
}

func certificateReady(c *cmapi.Certificate) bool {
	for _, cond := range c.Status.Conditions {
		if cond.Type == cmapi.CertificateConditionReady {
			return cond.Status == cmmeta.ConditionTrue && cond.ObservedGeneration == c.Generation
		}
	}
	return false
}

func statusOf(c *cmapi.Certificate) any {
	if c == nil {
		return nil
	}
	return c.Status
}

// servedCert is the leaf certificate the webhook presents on its pod IP.
func servedCert(ctx context.Context, podIP string) (*x509.Certificate, error) {
	d := tls.Dialer{Config: &tls.Config{
		// Only the presented certificate is read here; its chain is verified by the caller.
		InsecureSkipVerify: true, //nolint:gosec
		ServerName:         framework.WebhookName + "." + framework.Namespace + ".svc",
	}}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := d.DialContext(dctx, "tcp", net.JoinHostPort(podIP, strconv.Itoa(framework.WebhookPort)))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return nil, fmt.Errorf("no certificate presented")
	}
	return certs[0], nil
}

func firstCert(pemData []byte) (*x509.Certificate, error) {
	b, _ := pem.Decode(pemData)
	if b == nil {
		return nil, fmt.Errorf("no PEM block")
	}
	return x509.ParseCertificate(b.Bytes)
}

func describeCert(c *x509.Certificate) string {
	if c == nil {
		return "none"
	}
	return fmt.Sprintf("serial %s issued by %q", c.SerialNumber, c.Issuer.CommonName)
}

func restarts(p *corev1.Pod) int32 {
	var n int32
	for _, s := range p.Status.ContainerStatuses {
		n += s.RestartCount
	}
	return n
}
