package webhook_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/test/eventually"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// syncBuffer collects the process's log output while it runs.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestBinary runs the apm-csi-webhook binary as deployed in self-managed certificate mode
// against a real API server. Its subtests are the binary's behaviours in the order a
// deployment sees them; a step the later ones need ends the test when it fails.
func TestBinary(t *testing.T) {
	env := &envtest.Environment{BinaryAssetsDirectory: testenv.KubebuilderAssets(t)}
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	scheme := k8sruntime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, ns := range []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: "apm-csi-system"}},
		{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"apm-csi.io/ssi": "enabled"}}},
	} {
		if err := c.Create(ctx, ns); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Create(ctx, &storagev1.CSIDriver{ObjectMeta: metav1.ObjectMeta{Name: driverName}}); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(manifest(t))
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := yaml.UnmarshalStrict(data, mwc); err != nil {
		t.Fatal(err)
	}
	if err := c.Create(ctx, mwc); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	bin := filepath.Join(dir, "apm-csi-webhook")
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..", "..")
	build := exec.Command("go", "build", "-o", bin, "./webhook/cmd/apm-csi-webhook")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	kubeconfig := filepath.Join(dir, "kubeconfig")
	configFile := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(kubeconfig, env.KubeConfig, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(configFile, []byte("languages: [{name: java, version: v1.45.0}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	webhookPort, metricsPort, probePort := freePort(t), freePort(t), freePort(t)
	var logs syncBuffer
	cmd := exec.Command(bin,
		"--kubeconfig", kubeconfig, "--config", configFile, "--namespace", "apm-csi-system",
		"--cert-mode", "self-managed", "--cert-dir", filepath.Join(dir, "certs"),
		"--webhook-host", "127.0.0.1", "--webhook-port", fmt.Sprint(webhookPort),
		"--metrics-bind-address", fmt.Sprintf("127.0.0.1:%d", metricsPort),
		"--health-probe-bind-address", fmt.Sprintf("127.0.0.1:%d", probePort),
		"--shutdown-timeout", "10s")
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
		}
		if t.Failed() {
			t.Logf("webhook logs:\n%s", logs.String())
		}
	})

	get := func(port int, path string) (int, string) {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if !testenv.Step(t, "becomes ready and healthy", func(t *testing.T) {
		eventually.Require(t, ctx, time.Minute, 100*time.Millisecond, "the webhook's /readyz to answer 200", func(context.Context) error {
			select {
			case err := <-exited:
				return eventually.Stop(fmt.Errorf("the webhook exited before becoming ready: %v", err))
			default:
			}
			if code, body := get(probePort, "/readyz"); code != http.StatusOK {
				return fmt.Errorf("/readyz = %d %s", code, body)
			}
			return nil
		})
		if code, body := get(probePort, "/healthz"); code != http.StatusOK {
			t.Errorf("/healthz = %d %s", code, body)
		}
	}) {
		return
	}

	// The caBundle the binary put into the configuration is what a client trusts.
	if !testenv.Step(t, "serves admission over TLS that verifies against the caBundle it set", func(t *testing.T) {
		if err := c.Get(ctx, client.ObjectKey{Name: mwc.Name}, mwc); err != nil {
			t.Fatal(err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(mwc.Webhooks[0].ClientConfig.CABundle) {
			t.Fatal("caBundle not set")
		}
		review := admissionv1.AdmissionReview{
			TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
			Request: &admissionv1.AdmissionRequest{
				UID: "1", Kind: metav1.GroupVersionKind{Version: "v1", Kind: "Pod"}, Resource: metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
				Namespace: "shop", Operation: admissionv1.Create,
				Object: k8sruntime.RawExtension{Raw: []byte(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web"},"spec":{"containers":[{"name":"app","image":"x:1"}]}}`)},
			},
		}
		body, _ := json.Marshal(review)
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: pool, ServerName: "apm-csi-webhook.apm-csi-system.svc"}}}
		resp, err := hc.Post(fmt.Sprintf("https://127.0.0.1:%d/mutate-v1-pod", webhookPort), "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatalf("admission request over TLS verified against the caBundle: %v", err)
		}
		var out admissionv1.AdmissionReview
		err = json.NewDecoder(resp.Body).Decode(&out)
		resp.Body.Close()
		if err != nil || out.Response == nil || !out.Response.Allowed || !strings.Contains(string(out.Response.Patch), "dd-lib-java-init:v1.45.0") {
			t.Fatalf("response %+v, %v", out.Response, err)
		}
	}) {
		return
	}

	t.Run("counts the mutation in its metrics", func(t *testing.T) {
		if code, body := get(metricsPort, "/metrics"); code != http.StatusOK ||
			!strings.Contains(body, `apm_csi_webhook_mutations_total{mode="csi",result="injected"} 1`) ||
			!strings.Contains(body, "apm_csi_webhook_mutation_duration_seconds_bucket") {
			t.Errorf("metrics (%d) lack the mutation counter or histogram", code)
		}
	})

	if !testenv.Step(t, "exits cleanly on SIGTERM", func(t *testing.T) {
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("exit after SIGTERM: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("no exit within 30s of SIGTERM")
		}
	}) {
		return
	}

	// Every line is a JSON log record; the admission is logged with the pod's coordinates.
	t.Run("logs JSON records, the admission with the pod's namespace and name", func(t *testing.T) {
		found := false
		sc := bufio.NewScanner(strings.NewReader(logs.String()))
		for sc.Scan() {
			var rec map[string]any
			if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
				t.Errorf("log line is not JSON: %s", sc.Text())
				continue
			}
			if rec["msg"] == "pod admission" && rec["namespace"] == "shop" && rec["pod"] == "web" && rec["result"] == "injected" {
				found = true
			}
		}
		if !found {
			t.Error("no structured log record for the admission")
		}
	})
}
