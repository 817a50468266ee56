package deploy

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
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

// apiServer starts a real kube-apiserver (and etcd) with the cert-manager CRD fixtures
// installed, and returns a client with a warning collector.
func apiServer(t *testing.T) (client.Client, *warnings) {
	t.Helper()
	env := &envtest.Environment{
		BinaryAssetsDirectory: testenv.KubebuilderAssets(t),
		CRDDirectoryPaths:     []string{filepath.Join(repoRoot(t), "test/deploy/testdata/crds")},
		ErrorIfCRDPathMissing: true,
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

// TestDryRun submits every object of every variant to a real kube-apiserver. Namespaces are
// created for real first (a namespaced dry run needs its namespace), everything else is a
// server-side dry run, so variants do not collide.
func TestDryRun(t *testing.T) {
	variants := Variants(t)
	c, w := apiServer(t)
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
			t.Fatalf("a Certificate without issuerRef was not rejected by the CRD fixture: %v", err)
		}
		w.take()
	})

	for _, v := range variants {
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
