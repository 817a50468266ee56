package deploy

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// TestChartPullSecretsReachTheKeychain renders the chart with a namespace-scoped pull secret,
// lays the rendered projected volume out on disk as kubelet does (a ..data symlink and a
// symlink per top-level entry), reads the rendered node config and flags, and pulls a private
// image from an auth-requiring registry with the real library cache: the secret's namespace
// gets the image, another namespace gets the registry's refusal.
func TestChartPullSecretsReachTheKeychain(t *testing.T) {
	reg := libimages.Start(t)
	img, err := libimages.Library("java", "team-a-private")
	if err != nil {
		t.Fatal(err)
	}
	lib := nodeplugintest.Push(t, reg, "team-a/dd-lib-java-init", "v1", img)
	reg.RequireBasicAuth("team-a-puller", "s3cret")

	values := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(values, []byte(fmt.Sprintf(`
libraries:
  registry: %[1]s/datadoghq
  allowedRepositories: [%[1]s/team-a]
  insecureRegistries: [%[1]q]
  pullSecrets:
  - shared-registry
  - name: team-a
    repositories: [%[1]s/team-a]
    namespaces: [team-a]
`, reg.Addr())), 0o600); err != nil {
		t.Fatal(err)
	}
	v := Variant{Name: "helm-pull-secrets", Helm: true, Values: values, Namespace: names.SystemNamespace}
	out, err := run(t, helm(t), helmTemplateArgs(v)...)
	if err != nil {
		t.Fatalf("helm template: %v", err)
	}
	objs, err := Decode(out)
	if err != nil {
		t.Fatal(err)
	}
	in := install(t, Set{Objs: objs})
	c, spec := in.NodeContainer, &in.Node.Spec.Template.Spec

	dir := FlagValue(t, c, "pull-secret-dir", "")
	if dir == "" {
		t.Fatal("the chart with pullSecrets passes no --pull-secret-dir")
	}
	m, _ := MountFor(c, dir)
	if m == nil || Volume(spec, m.Name) == nil || Volume(spec, m.Name).Projected == nil {
		t.Fatalf("--pull-secret-dir %s is not on a projected volume", dir)
	}
	// The Secrets' data, as the cluster would hold it (base64 of team-a-puller:s3cret).
	secretData := map[string]string{
		"team-a":          fmt.Sprintf(`{"auths":{%q:{"auth":"dGVhbS1hLXB1bGxlcjpzM2NyZXQ="}}}`, reg.Addr()),
		"shared-registry": `{"auths":{"registry.example":{"auth":"eDp5"}}}`,
	}
	mounted := t.TempDir()
	payload := filepath.Join(mounted, "..2026_01_01_00_00_00.000000000")
	tops := map[string]bool{}
	for _, src := range Volume(spec, m.Name).Projected.Sources {
		if src.Secret == nil {
			continue
		}
		data, ok := secretData[src.Secret.Name]
		if !ok {
			t.Fatalf("the chart mounts an unexpected secret %s", src.Secret.Name)
		}
		for _, item := range src.Secret.Items {
			if item.Key != ".dockerconfigjson" {
				t.Errorf("secret %s: key %s mounted, want .dockerconfigjson", src.Secret.Name, item.Key)
			}
			p := filepath.Join(payload, item.Path)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
				t.Fatal(err)
			}
			top, _, _ := strings.Cut(item.Path, "/")
			tops[top] = true
		}
	}
	if err := os.Symlink(filepath.Base(payload), filepath.Join(mounted, "..data")); err != nil {
		t.Fatal(err)
	}
	for top := range tops {
		if err := os.Symlink(filepath.Join("..data", top), filepath.Join(mounted, top)); err != nil {
			t.Fatal(err)
		}
	}

	cfgFile := FlagValue(t, c, "config", "")
	data, err := FileFromConfigMap(t, in.Set, names.SystemNamespace, spec, c, cfgFile)
	if err != nil {
		t.Fatal(err)
	}
	nodeCfg, err := hostdir.ParseConfig([]byte(data))
	if err != nil {
		t.Fatalf("rendered node config: %v", err)
	}
	cache, err := librarycache.New(librarycache.Config{
		StoreDir:            filepath.Join(t.TempDir(), "store"),
		PullSecretDir:       mounted,
		PullSecretScopes:    nodeCfg.PullSecretScopes,
		AllowedRepositories: nodeCfg.AllowedRepositories,
		InsecureRegistries:  FlagValues(t, c, "insecure-registry"),
		Logger:              slog.New(slog.DiscardHandler),
		Registerer:          prometheus.NewRegistry(),
	})
	if err != nil {
		t.Fatalf("library cache from the rendered configuration: %v", err)
	}
	t.Cleanup(func() { _ = cache.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := cache.LayerFor(ctx, "team-b", volumeattrs.Library{Image: lib.Ref}); err == nil || !strings.Contains(err.Error(), "refused access") {
		t.Errorf("namespace team-b pulled team-a's private image: %v", err)
	}
	layer, err := cache.LayerFor(ctx, "team-a", volumeattrs.Library{Image: lib.Ref})
	if err != nil {
		t.Fatalf("namespace team-a, with the secret the chart mounted: %v", err)
	}
	if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, layer.Dir), libimages.LibraryFiles("java", "team-a-private")); d != "" {
		t.Errorf("pulled library: %s", d)
	}
}
