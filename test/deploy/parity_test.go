package deploy

import (
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	webhookconfig "github.com/apm-csi/apm-csi/webhook/config"
)

// The kustomize overlays and the chart are two spellings of the same install: with the chart's
// default release name ("apm-csi") they must render the same objects, except for what the
// tools themselves add (labels, generated ConfigMap names, checksums). The webhook
// configuration in the kustomize base is the webhook's canonical one, so this comparison is
// also what keeps the chart's copy of it honest.

func variantByName(t *testing.T, name string) Variant {
	t.Helper()
	for _, v := range Variants(t) {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("no variant %s", name)
	return Variant{}
}

// normalizePod removes what legitimately differs between the two renders.
func normalizePod(spec corev1.PodSpec) corev1.PodSpec {
	spec = *spec.DeepCopy()
	for i := range spec.Volumes {
		if cm := spec.Volumes[i].ConfigMap; cm != nil {
			cm.Name = "<config>"
		}
	}
	// Order of volumes and mounts means nothing.
	sort.Slice(spec.Volumes, func(i, j int) bool { return spec.Volumes[i].Name < spec.Volumes[j].Name })
	for i := range spec.TopologySpreadConstraints {
		spec.TopologySpreadConstraints[i].LabelSelector = nil
	}
	for _, cs := range [][]corev1.Container{spec.InitContainers, spec.Containers} {
		for i := range cs {
			sort.Strings(cs[i].Args)
			m := cs[i].VolumeMounts
			sort.Slice(m, func(a, b int) bool { return m[a].MountPath < m[b].MountPath })
		}
	}
	return spec
}

func comparePods(t *testing.T, what string, kustomize, helm corev1.PodSpec) {
	t.Helper()
	if d := cmp.Diff(normalizePod(kustomize), normalizePod(helm)); d != "" {
		t.Errorf("%s differs between kustomize and helm (-kustomize +helm):\n%s", what, d)
	}
}

func TestChartMatchesKustomize(t *testing.T) {
	pairs := []struct{ kustomize, helm string }{
		{"kustomize-cert-manager", "helm-defaults"},
		{"kustomize-self-managed", "helm-self-managed"},
	}
	for _, p := range pairs {
		t.Run(p.kustomize+"~"+p.helm, func(t *testing.T) {
			k := install(t, Set{Objs: Objects(t, variantByName(t, p.kustomize))})
			h := install(t, Set{Objs: Objects(t, variantByName(t, p.helm))})

			// Webhook configuration: same webhooks, same CA injection.
			if len(k.WebhookConfigs) != 1 || len(h.WebhookConfigs) != 1 {
				t.Fatalf("want one MutatingWebhookConfiguration each, got %d and %d", len(k.WebhookConfigs), len(h.WebhookConfigs))
			}
			kw, hw := k.WebhookConfigs[0], h.WebhookConfigs[0]
			if kw.Name != hw.Name {
				t.Errorf("MutatingWebhookConfiguration name %q (kustomize) vs %q (helm)", kw.Name, hw.Name)
			}
			if d := cmp.Diff(kw.Webhooks, hw.Webhooks); d != "" {
				t.Errorf("webhooks differ (-kustomize +helm):\n%s", d)
			}
			if a, b := kw.Annotations[injectCAAnnotation], hw.Annotations[injectCAAnnotation]; a != b {
				t.Errorf("%s: %q (kustomize) vs %q (helm)", injectCAAnnotation, a, b)
			}

			// Cluster-wide objects and RBAC: same rules under the same names.
			for _, kind := range []string{"CSIDriver", "ClusterRole", "Role"} {
				km, hm := rulesByName(t, k.Set, kind), rulesByName(t, h.Set, kind)
				if d := cmp.Diff(km, hm); d != "" {
					t.Errorf("%s differ (-kustomize +helm):\n%s", kind, d)
				}
			}

			// Workloads.
			comparePods(t, "node plugin pod", k.Node.Spec.Template.Spec, h.Node.Spec.Template.Spec)
			comparePods(t, "webhook pod", k.Webhook.Spec.Template.Spec, h.Webhook.Spec.Template.Spec)
			if *k.Webhook.Spec.Replicas != *h.Webhook.Spec.Replicas {
				t.Errorf("webhook replicas %d vs %d", *k.Webhook.Spec.Replicas, *h.Webhook.Spec.Replicas)
			}
			if d := cmp.Diff(k.Webhook.Spec.Strategy, h.Webhook.Spec.Strategy); d != "" {
				t.Errorf("webhook strategy differs:\n%s", d)
			}
			if d := cmp.Diff(k.Node.Spec.UpdateStrategy, h.Node.Spec.UpdateStrategy); d != "" {
				t.Errorf("node plugin update strategy differs:\n%s", d)
			}

			// Configuration files: equal once parsed by the programs that read them.
			kc, hc := webhookConfig(t, k), webhookConfig(t, h)
			if d := cmp.Diff(kc, hc); d != "" {
				t.Errorf("webhook configuration differs (-kustomize +helm):\n%s", d)
			}
			kn, hn := nodeConfig(t, k), nodeConfig(t, h)
			if !reflect.DeepEqual(kn, hn) {
				t.Errorf("node plugin configuration differs:\nkustomize: %+v\nhelm:      %+v", kn, hn)
			}
		})
	}

	t.Run("kustomize-sidecars~helm-sidecars", func(t *testing.T) {
		k := install(t, Set{Objs: Objects(t, variantByName(t, "kustomize-sidecars"))})
		h := install(t, Set{Objs: Objects(t, variantByName(t, "helm-sidecars"))})
		ks, hs := normalizePod(k.Node.Spec.Template.Spec), normalizePod(h.Node.Spec.Template.Spec)
		// The chart's sidecars values file pins the registrar by digest; compare the tags.
		for _, s := range []*corev1.PodSpec{&ks, &hs} {
			for i := range s.Containers {
				s.Containers[i].Image, _, _ = strings.Cut(s.Containers[i].Image, "@")
			}
		}
		if d := cmp.Diff(ks, hs); d != "" {
			t.Errorf("node plugin pod with sidecars differs (-kustomize +helm):\n%s", d)
		}
	})

	t.Run("image-tags", func(t *testing.T) {
		// The apm-csi image tag is set in two places, kustomize's images: and the chart's
		// appVersion: they must agree.
		var chart struct {
			AppVersion string `json:"appVersion"`
		}
		readYAML(t, filepath.Join(chartDir, "Chart.yaml"), &chart)
		var kust struct {
			Images []struct {
				Name   string `json:"name"`
				NewTag string `json:"newTag"`
			} `json:"images"`
		}
		readYAML(t, "deploy/base/kustomization.yaml", &kust)
		if len(kust.Images) == 0 {
			t.Fatal("deploy/base/kustomization.yaml sets no images")
		}
		for _, img := range kust.Images {
			if img.NewTag != chart.AppVersion {
				t.Errorf("kustomize image %s tag %q, chart appVersion %q", img.Name, img.NewTag, chart.AppVersion)
			}
		}
	})
}

func readYAML(t *testing.T, rel string, out any) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot(t), rel))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, out); err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
}

// rulesByName maps name -> rules (RBAC) or spec (CSIDriver) of a kind.
func rulesByName(t *testing.T, s Set, kind string) map[string]any {
	t.Helper()
	out := map[string]any{}
	for _, u := range s.Kind(kind) {
		switch kind {
		case "ClusterRole":
			out[u.GetName()] = typed[rbacv1.ClusterRole](t, u).Rules
		case "Role":
			out[u.GetName()] = typed[rbacv1.Role](t, u).Rules
		default:
			spec, _, _ := unstructured.NestedMap(u.Object, "spec")
			out[u.GetName()] = spec
		}
	}
	return out
}

func webhookConfig(t *testing.T, in *Install) *webhookconfig.Config {
	t.Helper()
	p := FlagValue(t, in.WebhookCont, "config", "")
	data, err := FileFromConfigMap(t, in.Set, in.Webhook.Namespace, &in.Webhook.Spec.Template.Spec, in.WebhookCont, p)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := webhookconfig.Parse([]byte(data))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func nodeConfig(t *testing.T, in *Install) hostdir.Config {
	t.Helper()
	p := FlagValue(t, in.NodeContainer, "config", "")
	data, err := FileFromConfigMap(t, in.Set, in.Node.Namespace, &in.Node.Spec.Template.Spec, in.NodeContainer, p)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := hostdir.ParseConfig([]byte(data))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}
