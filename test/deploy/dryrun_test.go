package deploy

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/apm-csi/apm-csi/test/testenv"
)

// warnings collects the warnings the API server returns (deprecated APIs, unknown fields
// outside strict validation, Pod Security "warn" results): a manifest that draws one fails.
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) HandleWarningHeader(code int, agent, text string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, text)
}

func (w *warnings) take() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	m := w.msgs
	w.msgs = nil
	return m
}

// kubeAPI is a supported Kubernetes version and the directory holding its kube-apiserver
// (and etcd).
type kubeAPI struct {
	Version string
	Assets  string
}

// kubeAPIs are the newest and the oldest supported Kubernetes versions: KUBEBUILDER_ASSETS and
// KUBEBUILDER_ASSETS_MIN (the Makefile sets both).
func kubeAPIs(t *testing.T) []kubeAPI {
	t.Helper()
	newest := kubeAPI{Version: KubeVersion, Assets: testenv.KubebuilderAssets(t)}
	oldest := kubeAPI{Version: MinKubeVersion, Assets: os.Getenv("KUBEBUILDER_ASSETS_MIN")}
	if oldest.Assets == "" {
		testenv.Missing(t, "KUBEBUILDER_ASSETS_MIN is not set (kube-apiserver v%s, the oldest supported version); run through `make test-deploy`", MinKubeVersion)
	}
	if _, err := os.Stat(filepath.Join(oldest.Assets, "kube-apiserver")); err != nil {
		testenv.Missing(t, "kube-apiserver not found in KUBEBUILDER_ASSETS_MIN=%s; run `make deps`", oldest.Assets)
	}
	return []kubeAPI{newest, oldest}
}

// startAPIServer starts the kube-apiserver (and etcd) in assets with the cert-manager's own
// CRDs installed, stopped when the test ends, and returns its admin configuration.
func startAPIServer(t *testing.T, assets string) *rest.Config {
	t.Helper()
	env := &envtest.Environment{
		BinaryAssetsDirectory: assets,
		CRDDirectoryPaths:     []string{certManagerCRDs(t)},
		ErrorIfCRDPathMissing: true,
	}
	// envtest prefers KUBEBUILDER_ASSETS over BinaryAssetsDirectory; the version asked for
	// must win, so its binaries are named explicitly.
	env.ControlPlane.GetAPIServer().Path = filepath.Join(assets, "kube-apiserver")
	if _, err := os.Stat(filepath.Join(assets, "etcd")); err == nil {
		env.ControlPlane.Etcd = &envtest.Etcd{Path: filepath.Join(assets, "etcd")}
	}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("start kube-apiserver: %v", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("stop kube-apiserver: %v", err)
		}
	})
	return cfg
}

// apiServer starts a real kube-apiserver (and etcd) of the given version with the
// cert-manager's own CRDs installed, checks it is that version, and returns a client with a
// warning collector.
func apiServer(t *testing.T, api kubeAPI) (client.Client, *warnings) {
	t.Helper()
	cfg := startAPIServer(t, api.Assets)
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sv, err := dc.ServerVersion()
	if err != nil {
		t.Fatalf("kube-apiserver version: %v", err)
	}
	if sv.GitVersion != "v"+api.Version {
		t.Fatalf("kube-apiserver in %s is %s, want v%s (rebuild with `make deps`)", api.Assets, sv.GitVersion, api.Version)
	}
	w := &warnings{}
	cfg = rest.CopyConfig(cfg)
	cfg.WarningHandler = w
	c, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return c, w
}

// dryRun submits obj with a server-side dry run and strict field validation: unknown or
// duplicated fields are errors, not warnings.
func dryRun(ctx context.Context, c client.Client, obj *unstructured.Unstructured) error {
	return c.Create(ctx, obj.DeepCopy(), client.DryRunAll, client.FieldValidation("Strict"))
}

// TestDryRun submits every object of every variant, rendered for that version, to a real
// kube-apiserver of the newest and of the oldest supported Kubernetes version. Namespaces are
// created for real first (a namespaced dry run needs its namespace), everything else is a
// server-side dry run, so variants do not collide.
func TestDryRun(t *testing.T) {
	for _, api := range kubeAPIs(t) {
		t.Run("v"+api.Version, func(t *testing.T) { testDryRun(t, api) })
	}
}

func testDryRun(t *testing.T, api kubeAPI) {
	variants := Variants(t)
	c, w := apiServer(t, api)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// Negative control: the same path must reject a broken object, or the test proves nothing.
	t.Run("rejects-broken-object", func(t *testing.T) {
		bad := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "storage.k8s.io/v1",
			"kind":       "CSIDriver",
			"metadata":   map[string]any{"name": "csi.apm-csi.io"},
			"spec":       map[string]any{"volumeLifecycleModes": []any{"Ephemeral"}, "podInfoOnMount": true, "noSuchField": true},
		}}
		if err := dryRun(ctx, c, bad); err == nil || !strings.Contains(err.Error(), "noSuchField") {
			t.Fatalf("a CSIDriver with an unknown field was not rejected by strict validation: %v", err)
		}
		badCert := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "cert-manager.io/v1",
			"kind":       "Certificate",
			"metadata":   map[string]any{"name": "x", "namespace": "default"},
			"spec":       map[string]any{"secretName": "x"},
		}}
		if err := dryRun(ctx, c, badCert); err == nil || !strings.Contains(err.Error(), "issuerRef") {
			t.Fatalf("a Certificate without issuerRef was not rejected by cert-manager's CRD: %v", err)
		}
		w.take()
	})

	for _, v := range variants {
		v.KubeVersion = api.Version
		t.Run(v.Name, func(t *testing.T) {
			objs := Objects(t, v)
			// Namespaces first, for real: the variant's own Namespace objects, then any other
			// namespace an object lives in (helm installs into an existing namespace).
			nss := map[string]bool{}
			for _, o := range objs {
				if o.GetKind() == "Namespace" {
					if err := c.Create(ctx, o.DeepCopy(), client.FieldValidation("Strict")); err != nil && !apierrors.IsAlreadyExists(err) {
						t.Errorf("create %s: %v", describe(o), err)
					}
					nss[o.GetName()] = true
				}
			}
			for _, o := range objs {
				if ns := o.GetNamespace(); ns != "" && !nss[ns] {
					nsObj := &unstructured.Unstructured{Object: map[string]any{
						"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": ns},
					}}
					if err := c.Create(ctx, nsObj); err != nil && !apierrors.IsAlreadyExists(err) {
						t.Fatalf("create namespace %s: %v", ns, err)
					}
					nss[ns] = true
				}
			}
			w.take()
			for _, o := range objs {
				if o.GetKind() == "Namespace" {
					continue
				}
				if err := dryRun(ctx, c, o); err != nil {
					t.Errorf("%s rejected: %v", describe(o), err)
				}
				for _, msg := range w.take() {
					t.Errorf("%s: API server warning: %s", describe(o), msg)
				}
			}
			t.Logf("%d objects accepted: %s", len(objs), strings.Join(Set{Objs: objs}.kinds(), ", "))
		})
	}
}

func describe(o *unstructured.Unstructured) string {
	if ns := o.GetNamespace(); ns != "" {
		return fmt.Sprintf("%s %s/%s", o.GetKind(), ns, o.GetName())
	}
	return fmt.Sprintf("%s %s", o.GetKind(), o.GetName())
}
