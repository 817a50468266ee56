package deploy

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// The node plugin as Datadog's CSI driver (kustomize overlay datadog-csi-driver, chart value
// datadogDropIn.enabled): pods written by the Datadog Cluster Agent's "csi" injection mode name
// the driver k8s.csi.datadoghq.com, and its "auto" mode picks CSI only when that CSIDriver
// carries csi.datadoghq.com/apm-enabled: "true".
const (
	DatadogDriverName       = "k8s.csi.datadoghq.com"
	datadogAPMEnabledAnnot  = "csi.datadoghq.com/apm-enabled"
	datadogCSIDriverVariant = "datadog-csi-driver"
)

// driverName is the CSI driver name a variant's node plugin registers.
func driverName(in *Install) string {
	if in.DropIn {
		return DatadogDriverName
	}
	return names.DriverName
}

// podSpecs are the pod templates of the variant's apm-csi workloads.
func podSpecs(in *Install) []*corev1.PodSpec {
	specs := []*corev1.PodSpec{&in.Node.Spec.Template.Spec}
	if in.Webhook != nil {
		specs = append(specs, &in.Webhook.Spec.Template.Spec)
	}
	return specs
}

// checkDatadogDropIn: the node plugin registers as Datadog's driver, the CSIDriver advertises
// APM volumes to the Cluster Agent, nothing of the webhook is installed, every Datadog socket
// type maps to a read-only entry every namespace may use (the Cluster Agent writes socket
// volumes into pods of any namespace, all readOnly: true), and the admission policies guard the
// Datadog driver's volumes.
func checkDatadogDropIn(t *testing.T, in *Install) []error {
	t.Helper()
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf("datadog drop-in: "+format, args...)) }

	if got := FlagValue(t, in.NodeContainer, "driver-name", names.DriverName); got != DatadogDriverName {
		bad("node plugin --driver-name %q, want %s", got, DatadogDriverName)
	}
	if u := in.Get("CSIDriver", "", DatadogDriverName); u == nil {
		bad("no CSIDriver %s", DatadogDriverName)
	} else if got := u.GetAnnotations()[datadogAPMEnabledAnnot]; got != "true" {
		bad("CSIDriver %s: annotation %s = %q, want \"true\" (the Cluster Agent's auto mode falls back to init containers without it)", DatadogDriverName, datadogAPMEnabledAnnot, got)
	}
	if in.Get("CSIDriver", "", names.DriverName) != nil {
		bad("CSIDriver %s is rendered too, but no plugin serves it", names.DriverName)
	}
	for _, kind := range []string{"Deployment", "MutatingWebhookConfiguration", "Service", "PodDisruptionBudget", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Certificate", "Issuer"} {
		for _, u := range in.Kind(kind) {
			bad("%s is rendered, but the drop-in installs no webhook", describe(u))
		}
	}

	cfg := nodeConfig(t, in)
	mapping := hostdir.DefaultDatadogSockets()
	for typ, entry := range cfg.DatadogSockets {
		mapping[typ] = entry
	}
	for _, typ := range volumeattrs.DatadogSocketTypes {
		i := slices.IndexFunc(cfg.HostDirs, func(e hostdir.Entry) bool { return e.Name == mapping[typ] })
		if i < 0 {
			bad("socket type %s maps to entry %q, which the node plugin's configuration does not have", typ, mapping[typ])
			continue
		}
		e := cfg.HostDirs[i]
		if !e.ReadOnly {
			bad("socket entry %s (%s) is writable; the Cluster Agent's socket volumes are read-only", e.Name, e.Path)
		}
		if !slices.Equal(e.Namespaces, []string{"*"}) || len(e.ServiceAccounts) > 0 {
			bad("socket entry %s is limited to namespaces %v, service accounts %v; the Cluster Agent writes socket volumes into pods of every namespace", e.Name, e.Namespaces, e.ServiceAccounts)
		}
	}

	for _, u := range in.Kind("ValidatingAdmissionPolicy") {
		vars, _, _ := unstructured.NestedSlice(u.Object, "spec", "variables")
		if !strings.Contains(fmt.Sprint(vars), "'"+DatadogDriverName+"'") {
			bad("%s does not look at volumes of %s", describe(u), DatadogDriverName)
		}
	}
	return errs
}

// hostPathNames renames hostPath volumes (and their mounts) after their host path: the
// kustomize component and the chart give the Agent's socket directory different volume names.
func hostPathNames(spec corev1.PodSpec) corev1.PodSpec {
	spec = *spec.DeepCopy()
	renamed := map[string]string{}
	for i := range spec.Volumes {
		if hp := spec.Volumes[i].HostPath; hp != nil {
			renamed[spec.Volumes[i].Name] = "hostPath:" + hp.Path
			spec.Volumes[i].Name = renamed[spec.Volumes[i].Name]
		}
	}
	for i := range spec.Containers {
		for j := range spec.Containers[i].VolumeMounts {
			if n, ok := renamed[spec.Containers[i].VolumeMounts[j].Name]; ok {
				spec.Containers[i].VolumeMounts[j].Name = n
			}
		}
	}
	return spec
}

// TestDatadogDropInChartMatchesKustomize: the overlay and the chart value install the same
// node plugin, CSIDriver and node configuration.
func TestDatadogDropInChartMatchesKustomize(t *testing.T) {
	k := install(t, Set{Objs: Objects(t, variantByName(t, "kustomize-"+datadogCSIDriverVariant))})
	h := install(t, Set{Objs: Objects(t, variantByName(t, "helm-"+datadogCSIDriverVariant))})
	if !k.DropIn || !h.DropIn {
		t.Fatalf("want both variants to be the drop-in (no webhook, CSIDriver %s): kustomize %t, helm %t", DatadogDriverName, k.DropIn, h.DropIn)
	}
	comparePods(t, "node plugin pod", hostPathNames(k.Node.Spec.Template.Spec), hostPathNames(h.Node.Spec.Template.Spec))
	ku, hu := k.Get("CSIDriver", "", DatadogDriverName), h.Get("CSIDriver", "", DatadogDriverName)
	if d := cmp.Diff(ku.Object["spec"], hu.Object["spec"]); d != "" {
		t.Errorf("CSIDriver spec differs (-kustomize +helm):\n%s", d)
	}
	if d := cmp.Diff(ku.GetAnnotations(), hu.GetAnnotations()); d != "" {
		t.Errorf("CSIDriver annotations differ (-kustomize +helm):\n%s", d)
	}
	// apm-csi's own CSIDriver and Datadog's name differ in nothing but the name and annotation.
	own := install(t, Set{Objs: Objects(t, variantByName(t, "helm-defaults"))}).Get("CSIDriver", "", names.DriverName)
	if d := cmp.Diff(own.Object["spec"], ku.Object["spec"]); d != "" {
		t.Errorf("the drop-in's CSIDriver spec differs from apm-csi's own (-own +drop-in):\n%s", d)
	}
	if d := cmp.Diff(nodeConfig(t, k), nodeConfig(t, h)); d != "" {
		t.Errorf("node plugin configuration differs (-kustomize +helm):\n%s", d)
	}
}

// TestDatadogDropInCheckCatches: the drop-in check fails a render without the CSIDriver
// annotation the Cluster Agent looks for, and one whose node plugin registers apm-csi's name.
func TestDatadogDropInCheckCatches(t *testing.T) {
	for _, c := range []struct {
		name   string
		break_ func(in *Install)
	}{
		{"no apm-enabled annotation", func(in *Install) {
			in.Get("CSIDriver", "", DatadogDriverName).SetAnnotations(nil)
		}},
		{"plugin registers apm-csi's name", func(in *Install) {
			for i, a := range in.NodeContainer.Args {
				if strings.HasPrefix(a, "--driver-name=") {
					in.NodeContainer.Args[i] = "--driver-name=" + names.DriverName
				}
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := install(t, Set{Objs: Objects(t, variantByName(t, "helm-"+datadogCSIDriverVariant))})
			if errs := checkDatadogDropIn(t, in); len(errs) != 0 {
				t.Fatalf("the unbroken render fails the check: %v", errs)
			}
			c.break_(in)
			if errs := checkDatadogDropIn(t, in); len(errs) == 0 {
				t.Error("the check missed it")
			}
		})
	}
}
