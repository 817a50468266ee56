// Package deploy validates everything under deploy/: the kustomize overlays and the Helm chart
// are rendered with the tools a platform team uses (kubectl's built-in kustomize, helm), every
// rendered object is submitted to a real kube-apiserver with a server-side dry run, the flags
// and config files the manifests pass to the two binaries are checked against the binaries
// built from this tree, and the properties that matter for safety are checked on the rendered
// objects.
//
// Prerequisites (kube-apiserver/etcd/kubectl in KUBEBUILDER_ASSETS, helm through
// hack/helm.sh) skip these tests on a developer machine and fail them under CI=true.
package deploy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// KubeVersion is the newest supported Kubernetes version, the one the chart is rendered for
// by default: the version of the kube-apiserver in KUBEBUILDER_ASSETS (hack/k8s-binaries.sh's
// default). MinKubeVersion is the oldest supported one: the dry run and the admission policy
// run on a kube-apiserver of each (KUBEBUILDER_ASSETS_MIN holds the oldest, from
// `hack/install-deps.sh --apiserver-only`).
const (
	KubeVersion    = "1.37.2"
	MinKubeVersion = "1.35.4"
)

// chartDir is the chart, relative to the repository root.
const chartDir = "deploy/helm/apm-csi"

// Variant is one way of installing apm-csi: a kustomize overlay, or the chart with a values
// file.
type Variant struct {
	// Name identifies the variant in test names and _output/ file names.
	Name string
	// Kustomize is an overlay directory relative to the repository root.
	Kustomize string
	// Values is a Helm values file relative to the repository root ("" = chart defaults).
	Values string
	// Helm is true for chart variants.
	Helm bool
	// Namespace is the install namespace (helm --namespace); kustomize overlays set their own.
	Namespace string
	// KubeVersion is the Kubernetes version the chart is rendered for (helm --kube-version);
	// "" is KubeVersion.
	KubeVersion string
}

func (v Variant) kubeVersion() string {
	if v.KubeVersion != "" {
		return v.KubeVersion
	}
	return KubeVersion
}

// Required variants: the documented deployment variants. Discovery below adds every other overlay and values
// file, so a new one is validated without editing this file, and removing one of these fails.
var (
	requiredOverlays = []string{"cert-manager", "self-managed", "sidecars", "datadog-csi-driver"}
	requiredValues   = []string{"cert-manager", "self-managed", "sidecars", "kubelet-dir", "datadog-csi-driver"}
)

// repoRoot returns the repository root (this file is test/deploy/render_test.go).
func repoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the test source file")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Variants lists the overlays under deploy/overlays and the values files under the chart's
// ci/ directory (the chart-testing convention), plus the chart with its defaults in the
// standard namespace and in another one.
func Variants(t testing.TB) []Variant {
	t.Helper()
	root := repoRoot(t)
	var vs []Variant
	overlays, err := filepath.Glob(filepath.Join(root, "deploy/overlays/*/kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, k := range overlays {
		name := filepath.Base(filepath.Dir(k))
		seen["kustomize/"+name] = true
		vs = append(vs, Variant{Name: "kustomize-" + name, Kustomize: filepath.Join("deploy/overlays", name), Namespace: names.SystemNamespace})
	}
	vs = append(vs,
		Variant{Name: "helm-defaults", Helm: true, Namespace: names.SystemNamespace},
		// Another namespace: the chart must follow .Release.Namespace everywhere (the
		// webhook's self-exclusion, the certificate's DNS names, the CA injection reference).
		Variant{Name: "helm-defaults-other-namespace", Helm: true, Namespace: "tracing"},
	)
	values, err := filepath.Glob(filepath.Join(root, chartDir, "ci/*-values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range values {
		name := strings.TrimSuffix(filepath.Base(v), "-values.yaml")
		seen["helm/"+name] = true
		vs = append(vs, Variant{Name: "helm-" + name, Helm: true, Values: filepath.Join(chartDir, "ci", filepath.Base(v)), Namespace: names.SystemNamespace})
	}
	for _, o := range requiredOverlays {
		if !seen["kustomize/"+o] {
			t.Errorf("required kustomize overlay deploy/overlays/%s is missing", o)
		}
	}
	for _, v := range requiredValues {
		if !seen["helm/"+v] {
			t.Errorf("required values file %s/ci/%s-values.yaml is missing", chartDir, v)
		}
	}
	return vs
}

// kubectl returns the kubectl built with the Kubernetes binaries (its kustomize is the one
// `kubectl apply -k` uses).
func kubectl(t testing.TB) string {
	t.Helper()
	p := filepath.Join(testenv.KubebuilderAssets(t), "kubectl")
	if _, err := os.Stat(p); err != nil {
		testenv.Missing(t, "kubectl not found next to kube-apiserver (%v); run `make deps`", err)
	}
	return p
}

var helmOnce struct {
	sync.Once
	path string
	err  error
}

// helm returns the helm binary: $HELM, or the one hack/helm.sh builds through the Go module
// proxy and caches.
func helm(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("HELM"); p != "" {
		return p
	}
	helmOnce.Do(func() {
		cmd := exec.Command(filepath.Join(repoRoot(t), "hack/helm.sh"))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			helmOnce.err = fmt.Errorf("hack/helm.sh: %v\n%s", err, stderr.String())
			return
		}
		helmOnce.path = strings.TrimSpace(string(out))
	})
	if helmOnce.err != nil {
		testenv.Missing(t, "helm: %v", helmOnce.err)
	}
	return helmOnce.path
}

// run runs a command in the repository root and returns its stdout; a failure includes stderr.
func run(t testing.TB, name string, args ...string) ([]byte, error) {
	t.Helper()
	return runEnv(t, nil, name, args...)
}

// runEnv is run with extra environment variables (KEY=value).
func runEnv(t testing.TB, env []string, name string, args ...string) ([]byte, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = repoRoot(t)
	// Keep helm away from the user's repositories, plugins and caches.
	home := t.TempDir()
	cmd.Env = append(append(os.Environ(), env...),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"),
	)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

// helmTemplateArgs are the arguments of `helm template` for a variant (plus extra ones).
func helmTemplateArgs(v Variant, extra ...string) []string {
	args := []string{"template", "apm-csi", chartDir, "--namespace", v.Namespace, "--kube-version", v.kubeVersion()}
	if v.Values != "" {
		args = append(args, "--values", v.Values)
	}
	return append(args, extra...)
}

var renders struct {
	sync.Mutex
	out map[string][]byte
}

// Render renders a variant once per test binary and returns the YAML stream.
func Render(t testing.TB, v Variant) []byte {
	t.Helper()
	renders.Lock()
	defer renders.Unlock()
	key := v.Name + "@" + v.kubeVersion()
	if out, ok := renders.out[key]; ok {
		return out
	}
	var (
		out []byte
		err error
	)
	if v.Helm {
		out, err = run(t, helm(t), helmTemplateArgs(v)...)
	} else {
		out, err = run(t, kubectl(t), "kustomize", v.Kustomize)
	}
	if err != nil {
		t.Fatalf("render %s: %v", v.Name, err)
	}
	if renders.out == nil {
		renders.out = map[string][]byte{}
	}
	renders.out[key] = out
	return out
}

// Decode splits a YAML stream into objects; empty documents are dropped.
func Decode(data []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var objs []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, err
		}
		if len(m) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: m}
		if u.GetKind() == "" || u.GetAPIVersion() == "" {
			return nil, fmt.Errorf("document without kind/apiVersion: %v", m)
		}
		objs = append(objs, u)
	}
	return objs, nil
}

// Objects renders and decodes a variant.
func Objects(t testing.TB, v Variant) []*unstructured.Unstructured {
	t.Helper()
	objs, err := Decode(Render(t, v))
	if err != nil {
		t.Fatalf("decode %s: %v", v.Name, err)
	}
	if len(objs) == 0 {
		t.Fatalf("%s renders no objects", v.Name)
	}
	return objs
}

// Set is a rendered variant indexed by kind and name.
type Set struct {
	Objs []*unstructured.Unstructured
}

// Kind returns the objects of a kind, sorted by name.
func (s Set) Kind(kind string) []*unstructured.Unstructured {
	var out []*unstructured.Unstructured
	for _, o := range s.Objs {
		if o.GetKind() == kind {
			out = append(out, o)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetName() < out[j].GetName() })
	return out
}

// Get returns the object of kind, namespace and name, or nil.
func (s Set) Get(kind, namespace, name string) *unstructured.Unstructured {
	for _, o := range s.Objs {
		if o.GetKind() == kind && o.GetNamespace() == namespace && o.GetName() == name {
			return o
		}
	}
	return nil
}

// kinds lists the kinds of a set, for error messages.
func (s Set) kinds() []string {
	var ks []string
	for _, o := range s.Objs {
		k := o.GetKind() + "/" + o.GetName()
		if !slices.Contains(ks, k) {
			ks = append(ks, k)
		}
	}
	return ks
}

// forEachVariant runs f as a parallel-safe subtest per variant.
func forEachVariant(t *testing.T, f func(t *testing.T, v Variant, s Set)) {
	t.Helper()
	for _, v := range Variants(t) {
		t.Run(v.Name, func(t *testing.T) {
			f(t, v, Set{Objs: Objects(t, v)})
		})
	}
}
