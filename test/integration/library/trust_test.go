package library

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/repoallow"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// datadogVolume is what a pod author writes for the Datadog "csi" mode: a package from a
// registry of their choice.
func datadogVolume(registry, pkg, version, pod, namespace string) map[string]string {
	attrs := nodeplugintest.Ephemeral(map[string]string{
		"type": volumeattrs.TypeDatadogLibrary, volumeattrs.DDKeyPackage: pkg,
		volumeattrs.DDKeyRegistry: registry, volumeattrs.DDKeyVersion: version,
	}, pod)
	attrs["csi.storage.k8s.io/pod.namespace"] = namespace
	return attrs
}

// TestVolumeFromRepositoryOutsideAllowlist: an inline volume naming an image outside the
// node's allowed repositories is refused with PermissionDenied naming the image and the flag,
// before any registry is contacted; nothing is mounted.
func TestVolumeFromRepositoryOutsideAllowlist(t *testing.T) {
	reg := libimages.Start(t)
	p := startPlugin(t, options{trust: librarycache.Config{AllowedRepositories: []string{reg.Addr() + "/datadoghq"}, InsecureRegistries: []string{reg.Addr()}}})
	img, err := libimages.Library("java", "v1")
	if err != nil {
		t.Fatal(err)
	}
	nodeplugintest.Push(t, reg, "datadoghq/dd-lib-java-init", "v1", img)
	nodeplugintest.Push(t, reg, "datadoghq-evil/dd-lib-java-init", "v1", img)
	reg.ResetCounts()

	target := p.Target("evil", "apm")
	err = p.Publish("csi-evil", target, datadogVolume(reg.Addr()+"/datadoghq-evil", "dd-lib-java-init", "v1", "evil", "team-b"), true)
	st := status.Convert(err)
	image := reg.Addr() + "/datadoghq-evil/dd-lib-java-init:v1"
	if st.Code() != codes.PermissionDenied || !strings.Contains(st.Message(), image) || !strings.Contains(st.Message(), repoallow.Flag) {
		t.Fatalf("publish of %s = %v, want PermissionDenied naming the image and %s", image, err, repoallow.Flag)
	}
	if n := len(reg.Requests()); n != 0 {
		t.Errorf("the registry saw %d requests for a refused image", n)
	}
	p.assertNothingAllocated(t)

	good := p.Target("good", "apm")
	p.MustPublish("csi-good", good, datadogVolume(reg.Addr()+"/datadoghq", "dd-lib-java-init", "v1", "good", "team-b"), true)
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, good), libimages.LibraryFiles("java", "v1")); d != "" {
		t.Errorf("allowed volume: %s", d)
	}
	p.MustUnpublish("csi-good", good)
}

// TestRegistryErrorBodyNeverReachesThePod: a volume pointing the plugin at an internal
// service (allowed by a careless administrator) gets a message saying what failed, never what
// the service answered: kubelet shows the message in the pod's Events.
func TestRegistryErrorBodyNeverReachesThePod(t *testing.T) {
	const secret = "ADMIN_PASSWORD=correct-horse-battery"
	var hits atomic.Int64
	internal := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.WriteHeader(http.StatusInternalServerError)
		_, _ = io.WriteString(w, "<h1>Internal error</h1><pre>"+secret+"</pre>")
	}))
	t.Cleanup(internal.Close)
	addr := strings.TrimPrefix(internal.URL, "http://")
	p := startPlugin(t, options{trust: librarycache.Config{AllowedRepositories: []string{addr}, InsecureRegistries: []string{addr}}})
	for i, version := range []string{"v1", "sha256:" + strings.Repeat("0f", 32)} {
		target := p.Target(fmt.Sprintf("ssrf%d", i), "apm")
		err := p.Publish(fmt.Sprintf("csi-ssrf%d", i), target, datadogVolume(addr+"/admin", libref.PackageName("java"), version, fmt.Sprintf("ssrf%d", i), "default"), true)
		st := status.Convert(err)
		if st.Code() != codes.Unavailable {
			t.Fatalf("publish = %v, want Unavailable", err)
		}
		if strings.Contains(st.Message(), "correct-horse") || strings.Contains(st.Message(), "Internal error") {
			t.Errorf("the pod's event would show the server's response: %q", st.Message())
		}
		if !strings.Contains(st.Message(), "HTTP 500") || !strings.Contains(st.Message(), addr) {
			t.Errorf("message %q does not say which registry failed and how", st.Message())
		}
	}
	if hits.Load() == 0 {
		t.Fatal("the internal service was never asked")
	}
	p.assertNothingAllocated(t)
}

// TestPullSecretScopedToNamespace: team-a's pull secret is used for pods of namespace team-a
// only; a pod of team-b naming team-a's private image gets the registry's refusal, before and
// after team-a's pod cached it.
func TestPullSecretScopedToNamespace(t *testing.T) {
	reg := libimages.Start(t)
	img, err := libimages.Library("java", "team-a-private")
	if err != nil {
		t.Fatal(err)
	}
	nodeplugintest.Push(t, reg, "team-a/dd-lib-java-init", "v1", img)
	reg.RequireBasicAuth("team-a-puller", "s3cret")
	secrets := t.TempDir()
	if err := os.MkdirAll(filepath.Join(secrets, "team-a"), 0o755); err != nil {
		t.Fatal(err)
	}
	// base64("team-a-puller:s3cret")
	if err := os.WriteFile(filepath.Join(secrets, "team-a", ".dockerconfigjson"), []byte(fmt.Sprintf(`{"auths":{%q:{"auth":"dGVhbS1hLXB1bGxlcjpzM2NyZXQ="}}}`, reg.Addr())), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startPlugin(t, options{registry: reg, trust: librarycache.Config{
		PullSecretDir:    secrets,
		PullSecretScopes: []repoallow.SecretScope{{Secret: "team-a", Repositories: []string{reg.Addr() + "/team-a"}, Namespaces: []string{"team-a"}}},
	}})
	publishAs := func(pod, namespace string) error {
		return p.Publish("csi-"+pod, p.Target(pod, "apm"), datadogVolume(reg.Addr()+"/team-a", "dd-lib-java-init", "v1", pod, namespace), true)
	}
	if err := publishAs("b1", "team-b"); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "refused access") {
		t.Fatalf("team-b pod with team-a's private image = %v, want the registry's refusal", err)
	}
	if err := publishAs("a1", "team-a"); err != nil {
		t.Fatalf("team-a pod: %v", err)
	}
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, p.Target("a1", "apm")), libimages.LibraryFiles("java", "team-a-private")); d != "" {
		t.Errorf("team-a volume: %s", d)
	}
	if err := publishAs("b2", "team-b"); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "refused access") {
		t.Fatalf("team-b pod after team-a cached the image = %v, want the registry's refusal", err)
	}
	p.MustUnpublish("csi-a1", p.Target("a1", "apm"))
	p.assertNothingAllocated(t)
}
