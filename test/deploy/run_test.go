package deploy

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	jsonpatch "github.com/evanphx/json-patch/v5"
	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/eventually"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// TestWebhookRunsWithRenderedRBAC installs each variant for real into a fresh kube-apiserver
// with the documented command (`helm install`, `kubectl apply -k`), then runs the webhook binary built from this tree with the variant's own
// command line and configuration file, authenticated as the variant's ServiceAccount
// (impersonation), so that only the rendered RBAC rules apply. It must become ready (its
// informers list and watch with exactly those rights), in self-managed mode create its Secret
// and set the caBundle, mutate a pod of an SSI namespace and record the Event. Then
// SubjectAccessReviews check that the account cannot do more than that.
func TestWebhookRunsWithRenderedRBAC(t *testing.T) {
	bin := BuiltBinary(t, names.WebhookBinary)
	assets := testenv.KubebuilderAssets(t)
	for _, v := range Variants(t) {
		t.Run(v.Name, func(t *testing.T) {
			in := install(t, Set{Objs: Objects(t, v)})
			if in.DropIn {
				t.Skip("this variant installs no webhook (the node plugin runs as Datadog's CSI driver)")
			}
			runWebhookVariant(t, bin, assets, v, in)
		})
	}
}

// runWebhookVariant installs one variant into a fresh API server and runs the webhook as the
// variant's ServiceAccount. Each step is a subtest named by what it shows; when a step the later
// ones build on fails (the install, the webhook becoming ready), the variant ends there.
func runWebhookVariant(t *testing.T, bin, assets string, v Variant, in *Install) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cfg := startAPIServer(t, assets)
	admin, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}

	ns := in.Webhook.Namespace
	dir := t.TempDir()
	if !testenv.Step(t, "installs with the documented command", func(t *testing.T) {
		installDocumented(ctx, t, admin, cfg, dir, v, in)
	}) {
		return
	}

	// A namespace where SSI is on, for the admission request below.
	ssiLabel := webhookConfig(t, in).SSINamespaceLabel
	mustCreate(ctx, t, admin, nsObject("shop", map[string]string{ssiLabel: "enabled"}))

	// The webhook's command line, as rendered, with local paths and ports.
	cfgFile := filepath.Join(dir, "config.yaml")
	data, err := FileFromConfigMap(t, in.Set, ns, &in.Webhook.Spec.Template.Spec, in.WebhookCont, FlagValue(t, in.WebhookCont, "config", ""))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgFile, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	certDir := filepath.Join(dir, "tls")
	mode := FlagValue(t, in.WebhookCont, "cert-mode", "cert-manager")
	if mode == "cert-manager" {
		// What cert-manager would have written into the Secret.
		writeServingCert(t, certDir)
	}
	webhookPort, healthPort := freePort(t), freePort(t)
	var args []string
	for _, a := range Args(in.WebhookCont) {
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		switch name {
		case "config":
			a = "--config=" + cfgFile
		case "cert-dir":
			a = "--cert-dir=" + certDir
		case "webhook-port":
			a = fmt.Sprintf("--webhook-port=%d", webhookPort)
		case "health-probe-bind-address":
			a = fmt.Sprintf("--health-probe-bind-address=127.0.0.1:%d", healthPort)
		case "metrics-bind-address":
			a = "--metrics-bind-address=0"
		}
		args = append(args, a)
	}
	args = append(args, "--webhook-host=127.0.0.1")

	sa := in.Webhook.Spec.Template.Spec.ServiceAccountName
	saConfig := kubeconfig(t, cfg, ns, sa, dir, "sa")
	cmd := exec.Command(bin, args...)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	cmd.Env = append(os.Environ(), "KUBECONFIG="+saConfig, "POD_NAMESPACE="+ns)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("the webhook did not stop cleanly on SIGTERM: %v", err)
			}
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			t.Logf("the webhook did not stop within 20s of SIGTERM; killed: %v", <-exited)
		}
		if t.Failed() {
			t.Logf("webhook %s\nlogs:\n%s", strings.Join(args, " "), logs.String())
		}
	}()

	// Ready: the server is up and its informers synced under the rendered RBAC.
	readyz := fmt.Sprintf("http://127.0.0.1:%d/readyz", healthPort)
	ready := testenv.Step(t, "becomes ready with only the rendered RBAC rights", func(t *testing.T) {
		eventually.Require(t, ctx, time.Minute, 250*time.Millisecond, "the webhook's /readyz to answer 200", func(context.Context) error {
			select {
			case err := <-exited:
				return eventually.Stop(fmt.Errorf("the webhook exited before it was ready: %v", err))
			default:
			}
			return httpOK(readyz)
		})
	})
	if !ready {
		return
	}

	if mode == "self-managed" {
		t.Run("self-managed mode creates its TLS Secret and sets every caBundle", func(t *testing.T) {
			secretName := FlagValue(t, in.WebhookCont, "secret-name", "apm-csi-webhook-tls")
			secret := &corev1.Secret{}
			if err := admin.Get(ctx, types.NamespacedName{Namespace: ns, Name: secretName}, secret); err != nil || len(secret.Data[corev1.TLSCertKey]) == 0 {
				t.Errorf("self-managed mode: Secret %s/%s with a certificate: %v", ns, secretName, err)
			}
			for _, c := range in.WebhookConfigs {
				mwc := &admissionregistrationv1.MutatingWebhookConfiguration{}
				if err := admin.Get(ctx, types.NamespacedName{Name: c.Name}, mwc); err != nil {
					t.Fatal(err)
				}
				for _, w := range mwc.Webhooks {
					if len(w.ClientConfig.CABundle) == 0 {
						t.Errorf("self-managed mode: webhook %s has no caBundle", w.Name)
					}
				}
			}
		})
	}

	// A pod of the SSI namespace is mutated; once the pod is stored as the webhook mutated it
	// (this API server does not call the webhook: it is created here with the patch applied),
	// the webhook's pod watch records the decision as an Event.
	t.Run("mutates a pod of an SSI namespace and records an Event about it", func(t *testing.T) {
		review := admissionReview(t, "shop")
		resp := postReview(t, webhookPort, review)
		if !resp.Allowed || len(resp.Patch) == 0 {
			t.Fatalf("pod of an SSI namespace not mutated: allowed=%v patch=%d bytes result=%v", resp.Allowed, len(resp.Patch), resp.Result)
		}
		patch, err := jsonpatch.DecodePatch(resp.Patch)
		if err != nil {
			t.Fatal(err)
		}
		mutated, err := patch.Apply(review.Request.Object.Raw)
		if err != nil {
			t.Fatal(err)
		}
		stored := &corev1.Pod{}
		if err := json.Unmarshal(mutated, stored); err != nil {
			t.Fatal(err)
		}
		if err := admin.Create(ctx, stored); err != nil {
			t.Fatalf("store the mutated pod: %v", err)
		}
		err = eventually.Wait(ctx, 20*time.Second, 250*time.Millisecond, "an Event about pod shop/"+stored.Name, func(ctx context.Context) error {
			list := &eventsv1.EventList{}
			if err := admin.List(ctx, list, client.InNamespace("shop")); err != nil {
				return eventually.Stop(err)
			}
			if !slices.ContainsFunc(list.Items, func(e eventsv1.Event) bool { return e.Regarding.UID == stored.UID }) {
				return fmt.Errorf("%d Events in namespace shop, none about the pod", len(list.Items))
			}
			return nil
		})
		if err != nil {
			t.Errorf("%v (pods list/watch and events.k8s.io create rights?)", err)
		}
	})
	if strings.Contains(logs.String(), "forbidden") {
		t.Errorf("the webhook logged a forbidden request: its RBAC is missing a rule")
	}

	// Least privilege: what the account must not be able to do.
	t.Run("the webhook's ServiceAccount may do no more than it needs", func(t *testing.T) {
		user := fmt.Sprintf("system:serviceaccount:%s:%s", ns, sa)
		for _, ra := range []authorizationv1.ResourceAttributes{
			{Verb: "list", Resource: "secrets", Namespace: "kube-system"},
			{Verb: "get", Resource: "secrets", Namespace: ns, Name: "someone-elses-secret"},
			{Verb: "list", Resource: "secrets", Namespace: ns},
			{Verb: "update", Group: "admissionregistration.k8s.io", Resource: "mutatingwebhookconfigurations", Name: "another-webhook"},
			{Verb: "update", Group: "admissionregistration.k8s.io", Resource: "validatingwebhookconfigurations", Name: in.WebhookConfigs[0].Name},
			// get pods is granted (list already reads every pod; get reads one whose status is
			// missing, to decide about it as admission would); restarting workloads is opt-in.
			{Verb: "patch", Group: "apps", Resource: "deployments", Namespace: "shop", Name: "web"},
			{Verb: "get", Group: "apps", Resource: "replicasets", Namespace: "shop"},
			{Verb: "patch", Resource: "pods", Namespace: "shop", Name: "app"},
			{Verb: "update", Resource: "pods", Namespace: "shop", Name: "app"},
			{Verb: "patch", Group: "events.k8s.io", Resource: "events", Namespace: "shop"},
			{Verb: "update", Resource: "namespaces", Name: "shop"},
			{Verb: "update", Group: "storage.k8s.io", Resource: "csidrivers", Name: names.DriverName},
			{Verb: "get", Group: "storage.k8s.io", Resource: "csidrivers", Name: "other.csi.example.com"},
		} {
			sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
				User: user, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
				ResourceAttributes: &ra,
			}}
			if err := admin.Create(ctx, sar); err != nil {
				t.Fatal(err)
			}
			if sar.Status.Allowed {
				t.Errorf("%s may %s %s %s/%s: more than it needs", user, ra.Verb, ra.Resource, ra.Namespace, ra.Name)
			}
		}

	})

	// The node plugin's account has no rights at all.
	t.Run("the node plugin's ServiceAccount has no API rights", func(t *testing.T) {
		nodeSA := fmt.Sprintf("system:serviceaccount:%s:%s", in.Node.Namespace, in.Node.Spec.Template.Spec.ServiceAccountName)
		for _, ra := range []authorizationv1.ResourceAttributes{
			{Verb: "get", Resource: "pods", Namespace: "shop"},
			{Verb: "get", Resource: "secrets", Namespace: ns},
			{Verb: "list", Resource: "nodes"},
		} {
			sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{User: nodeSA, ResourceAttributes: &ra}}
			if err := admin.Create(ctx, sar); err != nil {
				t.Fatal(err)
			}
			if sar.Status.Allowed {
				t.Errorf("%s may %s %s: the node plugin needs no API access", nodeSA, ra.Verb, ra.Resource)
			}
		}
	})
}

// installDocumented installs the variant the way the documentation says, `helm install` or
// `kubectl apply -k`, and checks that every rendered object exists.
func installDocumented(ctx context.Context, t *testing.T, admin client.Client, cfg *rest.Config, dir string, v Variant, in *Install) {
	ns := in.Webhook.Namespace
	adminConfig := kubeconfig(t, cfg, "", "", dir, "admin")
	kenv := []string{"KUBECONFIG=" + adminConfig}
	if v.Helm {
		args := []string{"install", "apm-csi", chartDir, "--namespace", v.Namespace, "--create-namespace"}
		if v.Values != "" {
			args = append(args, "--values", v.Values)
		}
		out, err := runEnv(t, kenv, helm(t), args...)
		if err != nil {
			t.Fatalf("helm install: %v", err)
		}
		// The release notes tell the user how to label a namespace and check a pod.
		for _, want := range []string{"kubectl label namespace", "injection-status", "kubectl -n " + ns + " get daemonset,deployment"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("helm install output lacks %q:\n%s", want, out)
			}
		}
	} else {
		if out, err := runEnv(t, kenv, kubectl(t), "apply", "-k", v.Kustomize); err != nil {
			t.Fatalf("kubectl apply -k: %v\n%s", err, out)
		}
	}
	for _, o := range in.Objs {
		got := o.DeepCopy()
		if err := admin.Get(ctx, client.ObjectKeyFromObject(o), got); err != nil {
			t.Errorf("%s was not installed: %v", describe(o), err)
		}
	}
}

func nsObject(name string, labels map[string]string) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": name}}}
	u.SetLabels(labels)
	return u
}

func mustCreate(ctx context.Context, t *testing.T, c client.Client, o *unstructured.Unstructured) {
	t.Helper()
	if err := c.Create(ctx, o); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create %s: %v", describe(o), err)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// kubeconfig writes a kubeconfig that authenticates as the envtest admin and, when sa is set,
// impersonates that ServiceAccount, so that the API server authorizes every request as it.
func kubeconfig(t *testing.T, cfg *rest.Config, ns, sa, dir, file string) string {
	t.Helper()
	kc := clientcmdapi.NewConfig()
	kc.Clusters["envtest"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	user := &clientcmdapi.AuthInfo{ClientCertificateData: cfg.CertData, ClientKeyData: cfg.KeyData}
	if sa != "" {
		user.Impersonate = fmt.Sprintf("system:serviceaccount:%s:%s", ns, sa)
		user.ImpersonateGroups = []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"}
	}
	kc.AuthInfos["user"] = user
	kc.Contexts["envtest"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "user", Namespace: ns}
	kc.CurrentContext = "envtest"
	p := filepath.Join(dir, file+".kubeconfig")
	if err := clientcmd.WriteToFile(*kc, p); err != nil {
		t.Fatal(err)
	}
	return p
}

// writeServingCert writes a self-signed tls.crt/tls.key for 127.0.0.1, as cert-manager's
// Secret would provide one.
func writeServingCert(t *testing.T, dir string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "apm-csi-webhook"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, block := range map[string]*pem.Block{
		corev1.TLSCertKey:       {Type: "CERTIFICATE", Bytes: der},
		corev1.TLSPrivateKeyKey: {Type: "EC PRIVATE KEY", Bytes: kder},
	} {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func admissionReview(t *testing.T, ns string) *admissionv1.AdmissionReview {
	t.Helper()
	pod := &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: ns},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "registry.example.com/app:1"}}},
	}
	raw, err := json.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	return &admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID:       types.UID("deploy-test"),
			Kind:      metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
			Namespace: ns, Name: "app",
			Operation: admissionv1.Create,
			Object:    runtime.RawExtension{Raw: raw},
		},
	}
}

func postReview(t *testing.T, port int, review *admissionv1.AdmissionReview) *admissionv1.AdmissionResponse {
	t.Helper()
	body, err := json.Marshal(review)
	if err != nil {
		t.Fatal(err)
	}
	// The certificate is the webhook's own (self-managed) or a test one: trust is what the
	// caBundle is for, checked above; here only the handler is exercised.
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	resp, err := hc.Post(fmt.Sprintf("https://127.0.0.1:%d/mutate-v1-pod", port), "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatalf("admission request: %v", err)
	}
	defer resp.Body.Close()
	out := &admissionv1.AdmissionReview{}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil || out.Response == nil {
		t.Fatalf("admission response (HTTP %d): %v", resp.StatusCode, err)
	}
	return out.Response
}

// httpOK is nil when GET url answers 200 and otherwise describes the answer.
func httpOK(url string) error {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("GET %s = %s %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}
