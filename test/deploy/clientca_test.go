package deploy

import (
	"path"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/shared/names"
)

// TestHelmClientCA: webhook.tls.clientCA.configMap renders a --client-ca flag the binary
// accepts, pointing at the key of that ConfigMap as mounted; without it the flag is absent
// (off by default).
func TestHelmClientCA(t *testing.T) {
	flags := BinaryFlags(t, names.WebhookBinary)
	webhookOf := func(t *testing.T, set ...string) (*appsv1.Deployment, *corev1.Container) {
		t.Helper()
		v := Variant{Name: "client-ca", Helm: true, Namespace: names.SystemNamespace}
		var extra []string
		for _, s := range set {
			extra = append(extra, "--set", s)
		}
		out, err := run(t, helm(t), helmTemplateArgs(v, extra...)...)
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		objs, err := Decode(out)
		if err != nil {
			t.Fatal(err)
		}
		for _, u := range objs {
			if u.GetKind() != "Deployment" {
				continue
			}
			d := typed[appsv1.Deployment](t, u)
			for i := range d.Spec.Template.Spec.Containers {
				if c := &d.Spec.Template.Spec.Containers[i]; Binary(c) == names.WebhookBinary {
					return d, c
				}
			}
		}
		t.Fatal("no webhook Deployment rendered")
		return nil, nil
	}

	t.Run("off by default", func(t *testing.T) {
		_, c := webhookOf(t)
		if slices.ContainsFunc(Args(c), func(a string) bool { return strings.HasPrefix(a, "--client-ca") }) {
			t.Errorf("--client-ca rendered by default: %v", Args(c))
		}
	})

	t.Run("a ConfigMap key mounted and passed", func(t *testing.T) {
		d, c := webhookOf(t, "webhook.tls.clientCA.configMap=apiserver-client-ca", "webhook.tls.clientCA.key=ca.pem")
		report(t, checkArgs(c, flags))
		i := slices.IndexFunc(Args(c), func(a string) bool { return strings.HasPrefix(a, "--client-ca=") })
		if i < 0 {
			t.Fatalf("no --client-ca flag: %v", Args(c))
		}
		file := strings.TrimPrefix(Args(c)[i], "--client-ca=")
		m := slices.IndexFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == path.Dir(file) })
		if m < 0 || !c.VolumeMounts[m].ReadOnly {
			t.Fatalf("%s is not in a read-only mount: %+v", file, c.VolumeMounts)
		}
		vol := slices.IndexFunc(d.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == c.VolumeMounts[m].Name })
		if vol < 0 {
			t.Fatalf("no volume %s", c.VolumeMounts[m].Name)
		}
		cm := d.Spec.Template.Spec.Volumes[vol].ConfigMap
		if cm == nil || cm.Name != "apiserver-client-ca" ||
			!slices.ContainsFunc(cm.Items, func(k corev1.KeyToPath) bool { return k.Key == "ca.pem" && k.Path == path.Base(file) }) {
			t.Errorf("volume %+v does not put key ca.pem of ConfigMap apiserver-client-ca at %s", d.Spec.Template.Spec.Volumes[vol], file)
		}
	})

	t.Run("a ConfigMap name that cannot exist is refused", func(t *testing.T) {
		v := Variant{Name: "client-ca-bad", Helm: true, Namespace: names.SystemNamespace}
		_, err := run(t, helm(t), helmTemplateArgs(v, "--set", "webhook.tls.clientCA.configMap=Client_CA")...)
		if err == nil || !strings.Contains(err.Error(), "/webhook/tls/clientCA/configMap") {
			t.Errorf("want a schema error naming the value; got %v", err)
		}
	})
}
