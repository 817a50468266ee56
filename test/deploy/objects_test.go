package deploy

import (
	"fmt"
	"path"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/apm-csi/apm-csi/shared/names"
)

// typed converts a rendered object into its Go type.
func typed[T any](t testing.TB, u *unstructured.Unstructured) *T {
	t.Helper()
	out := new(T)
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, out); err != nil {
		t.Fatalf("%s: %v", describe(u), err)
	}
	return out
}

// Install is a rendered variant, typed, with the two workloads found.
type Install struct {
	Set
	Node           *appsv1.DaemonSet
	NodeContainer  *corev1.Container
	Webhook        *appsv1.Deployment
	WebhookCont    *corev1.Container
	WebhookConfigs []*admissionregistrationv1.MutatingWebhookConfiguration
	Services       []*corev1.Service
	PDBs           []*policyv1.PodDisruptionBudget
	// DropIn is true for the node plugin running as Datadog's CSI driver (its CSIDriver is
	// DatadogDriverName): there is no webhook, Webhook and WebhookCont are nil.
	DropIn bool
}

// Binary returns the apm-csi binary a container runs ("" for others), from its image name:
// <any registry>/<any path>/apm-csi-node or apm-csi-webhook.
func Binary(c *corev1.Container) string {
	switch imageBase(c.Image) {
	case names.NodeBinary:
		return names.NodeBinary
	case names.WebhookBinary:
		return names.WebhookBinary
	}
	return ""
}

// imageBase returns the last path element of an image's repository: no registry, tag or digest.
func imageBase(image string) string {
	repo := image
	if i := strings.Index(repo, "@"); i >= 0 {
		repo = repo[:i]
	}
	if i := strings.LastIndex(repo, ":"); i > strings.LastIndex(repo, "/") {
		repo = repo[:i]
	}
	return path.Base(repo)
}

// install finds the node plugin DaemonSet and the webhook Deployment of a variant.
func install(t testing.TB, s Set) *Install {
	t.Helper()
	in := &Install{Set: s}
	for _, u := range s.Kind("DaemonSet") {
		ds := typed[appsv1.DaemonSet](t, u)
		for i := range ds.Spec.Template.Spec.Containers {
			if c := &ds.Spec.Template.Spec.Containers[i]; Binary(c) == names.NodeBinary {
				if in.Node != nil {
					t.Fatalf("two node plugin containers: %s and %s", in.Node.Name, ds.Name)
				}
				in.Node, in.NodeContainer = ds, c
			}
		}
	}
	for _, u := range s.Kind("Deployment") {
		d := typed[appsv1.Deployment](t, u)
		for i := range d.Spec.Template.Spec.Containers {
			if c := &d.Spec.Template.Spec.Containers[i]; Binary(c) == names.WebhookBinary {
				if in.Webhook != nil {
					t.Fatalf("two webhook containers: %s and %s", in.Webhook.Name, d.Name)
				}
				in.Webhook, in.WebhookCont = d, c
			}
		}
	}
	in.DropIn = in.Webhook == nil && s.Get("CSIDriver", "", DatadogDriverName) != nil
	if in.Node == nil || (in.Webhook == nil && !in.DropIn) {
		t.Fatalf("want a DaemonSet running %s and a Deployment running %s; rendered: %s",
			names.NodeBinary, names.WebhookBinary, strings.Join(s.kinds(), ", "))
	}
	for _, u := range s.Kind("MutatingWebhookConfiguration") {
		in.WebhookConfigs = append(in.WebhookConfigs, typed[admissionregistrationv1.MutatingWebhookConfiguration](t, u))
	}
	for _, u := range s.Kind("Service") {
		in.Services = append(in.Services, typed[corev1.Service](t, u))
	}
	for _, u := range s.Kind("PodDisruptionBudget") {
		in.PDBs = append(in.PDBs, typed[policyv1.PodDisruptionBudget](t, u))
	}
	return in
}

// Args returns a container's command line after its entrypoint, with $(VAR) references to the
// container's env left in place.
func Args(c *corev1.Container) []string {
	out := []string{}
	if len(c.Command) > 1 {
		out = append(out, c.Command[1:]...)
	}
	return append(out, c.Args...)
}

// Flag is one --name[=value] of a command line.
type Flag struct {
	Name, Value string
	HasValue    bool
}

// Flags parses a command line of --name=value / --name value / --bool words. Every word that
// is not a flag value must be a flag: the binaries take no positional arguments.
func Flags(args []string) ([]Flag, error) {
	var out []Flag
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			return nil, fmt.Errorf("positional argument %q", a)
		}
		name, value, ok := strings.Cut(strings.TrimLeft(a, "-"), "=")
		f := Flag{Name: name, Value: value, HasValue: ok}
		if !ok && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			f.Value, f.HasValue = args[i+1], true
			i++
		}
		out = append(out, f)
	}
	return out, nil
}

// FlagValues returns the values of a flag on a container's command line.
func FlagValues(t testing.TB, c *corev1.Container, name string) []string {
	t.Helper()
	fs, err := Flags(Args(c))
	if err != nil {
		t.Fatalf("container %s: %v", c.Name, err)
	}
	var vs []string
	for _, f := range fs {
		if f.Name == name {
			vs = append(vs, f.Value)
		}
	}
	return vs
}

// FlagValue returns the single value of a flag, or def when absent.
func FlagValue(t testing.TB, c *corev1.Container, name, def string) string {
	t.Helper()
	vs := FlagValues(t, c, name)
	switch len(vs) {
	case 0:
		return def
	case 1:
		return vs[0]
	}
	t.Fatalf("container %s: --%s given %d times", c.Name, name, len(vs))
	return ""
}

// Volume returns the pod volume of a name.
func Volume(spec *corev1.PodSpec, name string) *corev1.Volume {
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == name {
			return &spec.Volumes[i]
		}
	}
	return nil
}

// MountFor returns the volume mount of c whose mountPath holds p (the longest match) and the
// path of p relative to it.
func MountFor(c *corev1.Container, p string) (*corev1.VolumeMount, string) {
	var best *corev1.VolumeMount
	rel := ""
	for i := range c.VolumeMounts {
		m := &c.VolumeMounts[i]
		mp := strings.TrimSuffix(m.MountPath, "/")
		if p == mp || strings.HasPrefix(p, mp+"/") {
			if best == nil || len(mp) > len(strings.TrimSuffix(best.MountPath, "/")) {
				best = m
				rel = strings.TrimPrefix(strings.TrimPrefix(p, mp), "/")
			}
		}
	}
	return best, rel
}

// HostPathOf returns the host path that a container path p is on, or "" when p is not on a
// hostPath volume.
func HostPathOf(spec *corev1.PodSpec, c *corev1.Container, p string) string {
	m, rel := MountFor(c, p)
	if m == nil {
		return ""
	}
	v := Volume(spec, m.Name)
	if v == nil || v.HostPath == nil {
		return ""
	}
	return path.Join(v.HostPath.Path, m.SubPath, rel)
}

// FileFromConfigMap returns the content of the file at container path p when p is served by
// a ConfigMap volume of the set.
func FileFromConfigMap(t testing.TB, s Set, ns string, spec *corev1.PodSpec, c *corev1.Container, p string) (string, error) {
	t.Helper()
	m, rel := MountFor(c, p)
	if m == nil {
		return "", fmt.Errorf("%s is on no volume mount of container %s", p, c.Name)
	}
	v := Volume(spec, m.Name)
	if v == nil || v.ConfigMap == nil {
		return "", fmt.Errorf("%s: volume %s is not a ConfigMap", p, m.Name)
	}
	key := rel
	if m.SubPath != "" {
		key = path.Join(m.SubPath, rel)
	}
	for _, item := range v.ConfigMap.Items {
		if item.Path == key {
			key = item.Key
		}
	}
	u := s.Get("ConfigMap", ns, v.ConfigMap.Name)
	if u == nil {
		return "", fmt.Errorf("%s: ConfigMap %s/%s is not rendered", p, ns, v.ConfigMap.Name)
	}
	cm := typed[corev1.ConfigMap](t, u)
	data, ok := cm.Data[key]
	if !ok {
		return "", fmt.Errorf("%s: ConfigMap %s has no key %q", p, cm.Name, key)
	}
	return data, nil
}

// rbac returns the typed RBAC objects of a set.
func rbac(t testing.TB, s Set) (roles []*rbacv1.Role, croles []*rbacv1.ClusterRole, rbs []*rbacv1.RoleBinding, crbs []*rbacv1.ClusterRoleBinding) {
	t.Helper()
	for _, u := range s.Kind("Role") {
		roles = append(roles, typed[rbacv1.Role](t, u))
	}
	for _, u := range s.Kind("ClusterRole") {
		croles = append(croles, typed[rbacv1.ClusterRole](t, u))
	}
	for _, u := range s.Kind("RoleBinding") {
		rbs = append(rbs, typed[rbacv1.RoleBinding](t, u))
	}
	for _, u := range s.Kind("ClusterRoleBinding") {
		crbs = append(crbs, typed[rbacv1.ClusterRoleBinding](t, u))
	}
	return
}
