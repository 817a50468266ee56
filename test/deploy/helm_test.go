package deploy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestHelmLint runs `helm lint --strict` with the chart's defaults and with every values file.
func TestHelmLint(t *testing.T) {
	h := helm(t)
	for _, v := range Variants(t) {
		if !v.Helm {
			continue
		}
		t.Run(v.Name, func(t *testing.T) {
			args := []string{"lint", chartDir, "--strict", "--kube-version", KubeVersion, "--namespace", v.Namespace}
			if v.Values != "" {
				args = append(args, "--values", v.Values)
			}
			out, err := run(t, h, args...)
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			if !strings.Contains(string(out), "0 chart(s) failed") {
				t.Fatalf("helm lint did not report success:\n%s", out)
			}
		})
	}
}

// badValues are values a user may plausibly get wrong, and the words the error must contain
// for the user to find and fix the value: its path and what is expected.
var badValues = []struct {
	name   string
	values string
	want   []string
}{
	{"hostdir-without-path", "node:\n  hostDirs:\n  - name: apm-socket\n    namespaces: [a]\n", []string{"/node/hostDirs/0", "missing property 'path'"}},
	{"hostdir-without-namespaces", "node:\n  hostDirs:\n  - name: apm-socket\n    path: /var/run/datadog\n", []string{"/node/hostDirs/0", "missing property 'namespaces'"}},
	{"hostdir-empty-namespaces", "node:\n  hostDirs:\n  - name: data\n    path: /data\n    namespaces: []\n", []string{"/node/hostDirs/0/namespaces"}},
	{"hostdir-star-and-names", "node:\n  hostDirs:\n  - name: data\n    path: /data\n    namespaces: [\"*\", team-a]\n", []string{"/node/hostDirs/0/namespaces"}},
	{"hostdir-bad-service-account", "node:\n  hostDirs:\n  - name: data\n    path: /data\n    namespaces: [a]\n    serviceAccounts: [writer]\n", []string{"/node/hostDirs/0/serviceAccounts/0"}},
	{"admission-policy-bad-namespace", "admissionPolicy:\n  hostdirNamespaces: [Team_A]\n", []string{"/admissionPolicy/hostdirNamespaces/0"}},
	{"hostdir-relative-path", "node:\n  hostDirs:\n  - name: data\n    path: var/data\n    namespaces: [a]\n", []string{"/node/hostDirs/0/path", "does not match pattern"}},
	{"hostdir-parent-path", "node:\n  hostDirs:\n  - name: data\n    path: /var/../etc\n    namespaces: [a]\n", []string{"/node/hostDirs/0/path"}},
	{"hostdir-bad-name", "node:\n  hostDirs:\n  - name: Apm_Socket\n    path: /var/run/datadog\n    namespaces: [a]\n", []string{"/node/hostDirs/0/name"}},
	{"hostdir-unknown-option", "node:\n  hostDirs:\n  - name: data\n    path: /data\n    readonly: true\n    namespaces: [a]\n", []string{"/node/hostDirs/0", "'readonly' not allowed"}},
	{"tls-mode-typo", "webhook:\n  tls:\n    mode: certmanager\n", []string{"/webhook/tls/mode", "cert-manager", "self-managed"}},
	{"registration-typo", "node:\n  registration: sidecar\n", []string{"/node/registration", "builtin", "sidecars"}},
	{"injection-mode-typo", "webhook:\n  injectionMode: initcontainer\n", []string{"/webhook/injectionMode", "init-container"}},
	{"image-volumes-bad-version", "webhook:\n  imageVolumes:\n    runtimes: {containerd: latest}\n", []string{"/webhook/imageVolumes/runtimes/containerd"}},
	{"unknown-language", "libraries:\n  languages:\n  - name: golang\n", []string{"/libraries/languages/0/name", "java"}},
	{"layout-typo", "libraries:\n  layout: inject\n", []string{"/libraries/layout", "injector"}},
	{"kubelet-dir-relative", "kubeletDir: var/lib/kubelet\n", []string{"/kubeletDir"}},
	{"top-level-typo", "kubeletdir: /var/lib/kubelet\n", []string{"'kubeletdir' not allowed"}},
	{"image-latest", "images:\n  webhook:\n    tag: latest\n", []string{"images.webhook.tag", "latest", "not allowed"}},
	{"image-bad-digest", "images:\n  node:\n    digest: sha256:abc\n", []string{"/images/node/digest"}},
	{"mirror-without-mirror", "libraries:\n  registryMirrors:\n  - source: gcr.io/datadoghq\n", []string{"/libraries/registryMirrors/0", "missing property 'mirror'"}},
	{"duration-typo", "node:\n  libraryCache:\n    tagTTL: 10 minutes\n", []string{"/node/libraryCache/tagTTL"}},
	{"bad-quantity", "node:\n  libraryCache:\n    diskBudget: 20GB\n", []string{"/node/libraryCache/diskBudget"}},
	{"prefetch-without-tag-format", "libraries:\n  prefetch:\n  - 'https://gcr.io/datadoghq/apm-inject'\n", []string{"/libraries/prefetch/0"}},
	{"issuer-without-name", "webhook:\n  tls:\n    certManager:\n      issuerRef:\n        kind: ClusterIssuer\n", []string{"/webhook/tls/certManager/issuerRef", "missing property 'name'"}},
	{"replicas-zero", "webhook:\n  replicas: 0\n", []string{"/webhook/replicas"}},
	{"kept-grace-typo", "node:\n  writableLayer:\n    keep: true\n    keptGrace: 10 minutes\n", []string{"/node/writableLayer/keptGrace"}},
	{"max-kept-bytes-not-a-quantity", "node:\n  writableLayer:\n    keep: true\n    maxKeptBytes: 10GB\n", []string{"/node/writableLayer/maxKeptBytes"}},
	{"keep-with-tmpfs", "node:\n  writableLayer:\n    mechanism: tmpfs\n    keep: true\n", []string{"node.writableLayer.keep needs project-quota writable layers"}},
	{"kept-grace-without-keep", "node:\n  writableLayer:\n    keptGrace: 30m\n", []string{"only apply with node.writableLayer.keep: true"}},
}

// TestHelmSchemaRejectsBadValues: each bad value fails `helm template` (as it fails
// `helm install`) with a message that names the value.
func TestHelmSchemaRejectsBadValues(t *testing.T) {
	h := helm(t)
	dir := t.TempDir()
	for _, tc := range badValues {
		t.Run(tc.name, func(t *testing.T) {
			f := filepath.Join(dir, tc.name+".yaml")
			if err := os.WriteFile(f, []byte(tc.values), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := run(t, h, "template", "apm-csi", chartDir, "--kube-version", KubeVersion, "--values", f)
			if err == nil {
				t.Fatalf("values were accepted:\n%s\nrendered:\n%.600s", tc.values, out)
			}
			msg := err.Error()
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error does not contain %q:\n%s", w, msg)
				}
			}
			t.Logf("rejected as expected: %s", firstLines(msg, 6))
		})
	}
}

func firstLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}
