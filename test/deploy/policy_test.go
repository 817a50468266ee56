package deploy

import (
	"fmt"
	"path"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Checks on the rendered objects: the security properties of the deployment (the webhook never selects
// its own namespace or kube-system; the node plugin mounts kubelet's pods dir with
// Bidirectional propagation; the webhook runs as non-root with a read-only root filesystem;
// images are pinned) and the wiring that a dry run cannot see (a Service that selects no pod,
// a probe on a port nothing listens on, a hostPath that is not the kubelet dir).
//
// Each check returns its findings, so that TestPolicyChecksCatch can prove every check fails
// on a broken copy.

// nameLabel is the label the API server sets on every namespace (immutable, equal to its name).
const nameLabel = "kubernetes.io/metadata.name"

// checkWebhookSelectors: no webhook of any MutatingWebhookConfiguration can select a pod in
// kube-system or in the namespace apm-csi runs in, whatever labels those namespaces carry.
func checkWebhookSelectors(cfgs []*admissionregistrationv1.MutatingWebhookConfiguration, systemNamespace string) []error {
	var errs []error
	if len(cfgs) == 0 {
		return []error{fmt.Errorf("no MutatingWebhookConfiguration rendered")}
	}
	for _, cfg := range cfgs {
		// Every label key/value any selector of this configuration mentions: the worst case a
		// namespace could carry.
		worst := labels.Set{}
		for _, w := range cfg.Webhooks {
			for _, sel := range []*metav1.LabelSelector{w.NamespaceSelector, w.ObjectSelector} {
				if sel == nil {
					continue
				}
				for k, v := range sel.MatchLabels {
					worst[k] = v
				}
				for _, r := range sel.MatchExpressions {
					if r.Key == nameLabel {
						continue
					}
					worst[r.Key] = "true"
					if len(r.Values) > 0 && r.Operator == metav1.LabelSelectorOpIn {
						worst[r.Key] = r.Values[0]
					}
				}
			}
		}
		for _, w := range cfg.Webhooks {
			where := fmt.Sprintf("MutatingWebhookConfiguration %s webhook %s", cfg.Name, w.Name)
			if w.NamespaceSelector == nil {
				errs = append(errs, fmt.Errorf("%s: no namespaceSelector: it selects every namespace", where))
				continue
			}
			sel, err := metav1.LabelSelectorAsSelector(w.NamespaceSelector)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %v", where, err))
				continue
			}
			own := systemNamespace
			if w.ClientConfig.Service != nil {
				own = w.ClientConfig.Service.Namespace
			}
			for _, ns := range []string{metav1.NamespaceSystem, systemNamespace, own} {
				// With only its name label, and with every label the selectors ask for.
				bare := labels.Set{nameLabel: ns}
				full := labels.Merge(worst, bare)
				if sel.Matches(bare) || sel.Matches(full) {
					errs = append(errs, fmt.Errorf("%s: namespaceSelector %s selects namespace %s; exclude it with %s NotIn", where, sel, ns, nameLabel))
				}
			}
		}
	}
	return errs
}

// checkWebhookConfig: failure and reinvocation policies, side effects, and that the
// configuration points at a rendered Service that selects the webhook pods on a port the
// webhook container exposes.
func checkWebhookConfig(in *Install) []error {
	var errs []error
	for _, cfg := range in.WebhookConfigs {
		for _, w := range cfg.Webhooks {
			where := fmt.Sprintf("MutatingWebhookConfiguration %s webhook %s", cfg.Name, w.Name)
			if w.FailurePolicy == nil || *w.FailurePolicy != admissionregistrationv1.Ignore {
				errs = append(errs, fmt.Errorf("%s: failurePolicy must be Ignore (an unavailable webhook must not block pod creation)", where))
			}
			if w.ReinvocationPolicy == nil || *w.ReinvocationPolicy != admissionregistrationv1.IfNeededReinvocationPolicy {
				errs = append(errs, fmt.Errorf("%s: reinvocationPolicy must be IfNeeded", where))
			}
			if w.SideEffects == nil || *w.SideEffects != admissionregistrationv1.SideEffectClassNone {
				errs = append(errs, fmt.Errorf("%s: sideEffects must be None (the webhook is pure; dry-run requests must work)", where))
			}
			svc := w.ClientConfig.Service
			if svc == nil {
				errs = append(errs, fmt.Errorf("%s: clientConfig must name the in-cluster Service", where))
				continue
			}
			errs = append(errs, checkServiceReaches(in, svc.Namespace, svc.Name, svc.Port, where)...)
		}
	}
	return errs
}

// checkServiceReaches: Service ns/name exists, has port (default 443), selects the webhook
// pods, and its targetPort is a port of the webhook container.
func checkServiceReaches(in *Install, ns, svcName string, port *int32, where string) []error {
	var svc *corev1.Service
	for _, s := range in.Services {
		if s.Namespace == ns && s.Name == svcName {
			svc = s
		}
	}
	if svc == nil {
		return []error{fmt.Errorf("%s: Service %s/%s is not rendered", where, ns, svcName)}
	}
	want := int32(443)
	if port != nil {
		want = *port
	}
	var sp *corev1.ServicePort
	for i := range svc.Spec.Ports {
		if svc.Spec.Ports[i].Port == want {
			sp = &svc.Spec.Ports[i]
		}
	}
	if sp == nil {
		return []error{fmt.Errorf("%s: Service %s has no port %d", where, svcName, want)}
	}
	var errs []error
	if svc.Namespace != in.Webhook.Namespace || len(svc.Spec.Selector) == 0 ||
		!labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(in.Webhook.Spec.Template.Labels)) {
		errs = append(errs, fmt.Errorf("%s: Service %s (selector %v) does not select the webhook pods (labels %v)", where, svcName, svc.Spec.Selector, in.Webhook.Spec.Template.Labels))
	}
	if !containerHasPort(in.WebhookCont, sp.TargetPort) {
		errs = append(errs, fmt.Errorf("%s: Service %s targetPort %s is not a port of container %s", where, svcName, sp.TargetPort.String(), in.WebhookCont.Name))
	}
	return errs
}

func containerHasPort(c *corev1.Container, p intstr.IntOrString) bool {
	for _, cp := range c.Ports {
		if (p.Type == intstr.String && cp.Name == p.StrVal) || (p.Type == intstr.Int && cp.ContainerPort == p.IntVal) {
			return true
		}
	}
	return false
}

// portOf returns the port number of an address flag ("host:port" or ":port").
func portOf(addr string) string {
	if i := strings.LastIndex(addr, ":"); i >= 0 {
		return addr[i+1:]
	}
	return ""
}

// probeTargets: an HTTP probe targets a port that the container declares and whose number is
// the port of the address flag that serves health.
func checkProbePort(c *corev1.Container, p *corev1.Probe, wantPath, healthPort, what string) []error {
	if p == nil || p.HTTPGet == nil {
		return []error{fmt.Errorf("container %s: %s must be an httpGet probe on %s", c.Name, what, wantPath)}
	}
	var errs []error
	if p.HTTPGet.Path != wantPath {
		errs = append(errs, fmt.Errorf("container %s: %s path %q, want %q", c.Name, what, p.HTTPGet.Path, wantPath))
	}
	port := p.HTTPGet.Port
	num := ""
	if port.Type == intstr.Int {
		num = port.String()
	}
	for _, cp := range c.Ports {
		if port.Type == intstr.String && cp.Name == port.StrVal {
			num = fmt.Sprint(cp.ContainerPort)
		}
	}
	if num == "" {
		errs = append(errs, fmt.Errorf("container %s: %s port %s is not a declared port", c.Name, what, port.String()))
	} else if num != healthPort {
		errs = append(errs, fmt.Errorf("container %s: %s goes to port %s but the health server listens on port %q", c.Name, what, num, healthPort))
	}
	return errs
}

// checkNodePlugin: privilege, kubelet dir wiring, probes, scheduling.
func checkNodePlugin(t testing.TB, in *Install) []error {
	t.Helper()
	var errs []error
	ds, c := in.Node, in.NodeContainer
	spec := &ds.Spec.Template.Spec
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("DaemonSet %s: "+format, append([]any{ds.Name}, args...)...))
	}
	if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		bad("container %s must be privileged (it mounts into kubelet's pods dir)", c.Name)
	}

	kubeletDir := FlagValue(t, c, "kubelet-dir", "/var/lib/kubelet")
	pods := path.Join(kubeletDir, "pods")
	m, rel := MountFor(c, pods)
	switch {
	case m == nil:
		bad("%s (kubelet's pods dir) is not mounted", pods)
	case m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional:
		bad("mount %s holds %s but its propagation is not Bidirectional: overlay mounts would stay invisible to kubelet and the pods", m.MountPath, pods)
	case HostPathOf(spec, c, pods) != pods:
		bad("%s inside the container is host path %q; kubelet hands the node plugin host paths, so it must be the same path", pods, HostPathOf(spec, c, pods))
	default:
		_ = rel
	}

	// Every hostPath under a kubelet dir is under the configured one (a custom kubelet dir
	// must not leave a /var/lib/kubelet path behind), and mounted at the same path.
	for _, v := range spec.Volumes {
		if v.HostPath == nil {
			continue
		}
		hp := v.HostPath.Path
		if strings.Contains(hp, "kubelet") && hp != kubeletDir && !strings.HasPrefix(hp, kubeletDir+"/") {
			bad("hostPath volume %s is %s, outside --kubelet-dir %s", v.Name, hp, kubeletDir)
		}
	}

	// The CSI socket is in the kubelet plugins dir, on a hostPath, at the conventional path.
	endpoint := FlagValue(t, c, "endpoint", "")
	sock := strings.TrimPrefix(strings.TrimPrefix(endpoint, "unix://"), "unix:")
	wantSock := path.Join(kubeletDir, "plugins", driverName(in), "csi.sock")
	if hp := HostPathOf(spec, c, sock); hp != wantSock {
		bad("--endpoint %q is host path %q, want %s (kubelet dials the path it was registered with)", endpoint, hp, wantSock)
	}

	// The state dir (cache, overlay upper/work dirs) is on a hostPath: overlayfs refuses an
	// overlayfs upper dir, and the cache must outlive the container.
	stateDir := FlagValue(t, c, "state-dir", "")
	if stateDir == "" {
		bad("no --state-dir")
	} else if HostPathOf(spec, c, stateDir) == "" {
		bad("--state-dir %s is not on a hostPath volume", stateDir)
	}

	// Registration: built-in (registration dir mounted) or the sidecar.
	regDir := path.Join(kubeletDir, "plugins_registry")
	registrar := sidecar(spec, "csi-node-driver-registrar")
	if registrar == nil {
		if HostPathOf(spec, c, regDir) != regDir {
			bad("built-in registration needs %s mounted at the same path", regDir)
		}
	} else {
		if got := FlagValue(t, registrar, "kubelet-registration-path", ""); got != wantSock {
			bad("registrar --kubelet-registration-path %q, want %s", got, wantSock)
		}
		if hp := HostPathOf(spec, registrar, "/registration"); hp != regDir {
			bad("registrar /registration is host path %q, want %s", hp, regDir)
		}
		addr := FlagValue(t, registrar, "csi-address", "")
		if hp := HostPathOf(spec, registrar, addr); hp != wantSock {
			bad("registrar --csi-address %s is host path %q, want %s", addr, hp, wantSock)
		}
	}

	// Probes: readiness on the node plugin's own /readyz; liveness on its /healthz, or on the
	// livenessprobe sidecar's /healthz when that sidecar is present.
	healthPort := portOf(FlagValue(t, c, "health-addr", ""))
	if healthPort == "" {
		bad("no --health-addr: the probes have nothing to reach")
	}
	errs = append(errs, checkProbePort(c, c.ReadinessProbe, "/readyz", healthPort, "readinessProbe")...)
	if lp := sidecar(spec, "livenessprobe"); lp != nil {
		lpPort := portOf(FlagValue(t, lp, "http-endpoint", ""))
		errs = append(errs, checkProbePort(c, c.LivenessProbe, "/healthz", lpPort, "livenessProbe (via the livenessprobe sidecar)")...)
		addr := FlagValue(t, lp, "csi-address", "")
		if hp := HostPathOf(spec, lp, addr); hp != wantSock {
			bad("livenessprobe --csi-address %s is host path %q, want %s", addr, hp, wantSock)
		}
	} else {
		errs = append(errs, checkProbePort(c, c.LivenessProbe, "/healthz", healthPort, "livenessProbe")...)
	}

	if spec.PriorityClassName != "system-node-critical" {
		bad("priorityClassName %q, want system-node-critical", spec.PriorityClassName)
	}
	tolerateAll := slices.ContainsFunc(spec.Tolerations, func(t corev1.Toleration) bool {
		return t.Key == "" && t.Operator == corev1.TolerationOpExists
	})
	if !tolerateAll {
		bad("must tolerate every taint (operator Exists, no key) to run on every node; got %v", spec.Tolerations)
	}
	if ds.Spec.UpdateStrategy.Type != "RollingUpdate" {
		bad("updateStrategy %q, want RollingUpdate", ds.Spec.UpdateStrategy.Type)
	}
	return errs
}

func sidecar(spec *corev1.PodSpec, image string) *corev1.Container {
	for i := range spec.Containers {
		c := &spec.Containers[i]
		if imageBase(c.Image) == image {
			return c
		}
	}
	return nil
}

// checkWebhookWorkload: replicas, disruption budget, spreading, restricted security context,
// resources.
func checkWebhookWorkload(in *Install) []error {
	var errs []error
	d, c := in.Webhook, in.WebhookCont
	spec := &d.Spec.Template.Spec
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("Deployment %s: "+format, append([]any{d.Name}, args...)...))
	}
	if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
		bad("want at least 2 replicas")
	}
	covered := false
	for _, p := range in.PDBs {
		sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
		if err == nil && p.Namespace == d.Namespace && !sel.Empty() && sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			covered = p.Spec.MinAvailable != nil || p.Spec.MaxUnavailable != nil
		}
	}
	if !covered {
		bad("no PodDisruptionBudget selects its pods")
	}
	spread := slices.ContainsFunc(spec.TopologySpreadConstraints, func(c corev1.TopologySpreadConstraint) bool {
		return c.TopologyKey == "kubernetes.io/hostname"
	})
	if a := spec.Affinity; a != nil && a.PodAntiAffinity != nil {
		for _, w := range a.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution {
			spread = spread || w.PodAffinityTerm.TopologyKey == "kubernetes.io/hostname"
		}
	}
	if !spread {
		bad("replicas are not spread across nodes (topologySpreadConstraints on kubernetes.io/hostname)")
	}

	psc := spec.SecurityContext
	sc := c.SecurityContext
	if sc == nil {
		sc = &corev1.SecurityContext{}
	}
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	nonRoot := (sc.RunAsNonRoot != nil && *sc.RunAsNonRoot) || (sc.RunAsNonRoot == nil && psc.RunAsNonRoot != nil && *psc.RunAsNonRoot)
	if !nonRoot {
		bad("container %s must set runAsNonRoot: true", c.Name)
	}
	for _, uid := range []*int64{sc.RunAsUser, psc.RunAsUser} {
		if uid != nil && *uid == 0 {
			bad("runs as uid 0")
		}
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		bad("container %s must have a read-only root filesystem", c.Name)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		bad("container %s must set allowPrivilegeEscalation: false", c.Name)
	}
	if sc.Privileged != nil && *sc.Privileged {
		bad("container %s is privileged", c.Name)
	}
	if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0 {
		bad("container %s must drop ALL capabilities and add none", c.Name)
	}
	seccomp := sc.SeccompProfile
	if seccomp == nil {
		seccomp = psc.SeccompProfile
	}
	if seccomp == nil || (seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault && seccomp.Type != corev1.SeccompProfileTypeLocalhost) {
		bad("container %s must run with the RuntimeDefault seccomp profile", c.Name)
	}
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		bad("uses host namespaces")
	}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			bad("mounts hostPath %s", v.HostPath.Path)
		}
	}
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if _, ok := c.Resources.Requests[r]; !ok {
			bad("container %s has no %s request", c.Name, r)
		}
	}
	if _, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok {
		bad("container %s has no memory limit", c.Name)
	}
	return errs
}

// checkImagesPinned: every image of every workload names a fixed tag (not latest) or a digest.
func checkImagesPinned(in *Install) []error {
	var errs []error
	for _, spec := range podSpecs(in) {
		all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
		for _, c := range all {
			if err := imagePinned(c.Image); err != nil {
				errs = append(errs, fmt.Errorf("container %s: %v", c.Name, err))
			}
		}
	}
	return errs
}

func imagePinned(image string) error {
	return imagePinnedOpts(image, name.StrictValidation)
}

// imagePinnedOpts is imagePinned with a choice of validation: manifests name the registry
// (StrictValidation: a short name means different registries to different runtimes),
// Dockerfiles may use Docker Hub short names (WeakValidation).
func imagePinnedOpts(image string, opt name.Option) error {
	if strings.Contains(image, "@") {
		if _, err := name.NewDigest(image, opt); err != nil {
			return fmt.Errorf("image %q: bad digest reference: %v", image, err)
		}
		return nil
	}
	tag, err := name.NewTag(image, opt)
	if err != nil {
		return fmt.Errorf("image %q is not pinned: it needs an explicit tag or digest (%v)", image, err)
	}
	if tag.TagStr() == "latest" {
		return fmt.Errorf("image %q uses the mutable tag latest", image)
	}
	return nil
}

// checkRBAC: every workload's ServiceAccount is rendered; bindings point at rendered roles and
// accounts; no wildcard; Secrets only through a namespaced Role; mutating verbs on webhook
// configurations only on named objects.
func checkRBAC(t testing.TB, in *Install) []error {
	t.Helper()
	var errs []error
	roles, croles, rbs, crbs := rbac(t, in.Set)
	type workload struct {
		ns, sa, what string
	}
	workloads := []workload{{in.Node.Namespace, in.Node.Spec.Template.Spec.ServiceAccountName, "DaemonSet " + in.Node.Name}}
	if in.Webhook != nil {
		workloads = append(workloads, workload{in.Webhook.Namespace, in.Webhook.Spec.Template.Spec.ServiceAccountName, "Deployment " + in.Webhook.Name})
	}
	for _, w := range workloads {
		if w.sa == "" || w.sa == "default" {
			errs = append(errs, fmt.Errorf("%s must run under its own ServiceAccount, not %q", w.what, w.sa))
		} else if in.Get("ServiceAccount", w.ns, w.sa) == nil {
			errs = append(errs, fmt.Errorf("%s: ServiceAccount %s/%s is not rendered", w.what, w.ns, w.sa))
		}
	}
	checkRules := func(where string, rules []rbacv1.PolicyRule, clusterWide bool) {
		for _, r := range rules {
			for _, list := range [][]string{r.Verbs, r.Resources, r.APIGroups} {
				if slices.Contains(list, "*") {
					errs = append(errs, fmt.Errorf("%s: wildcard in rule %v", where, r))
				}
			}
			if slices.Contains(r.Resources, "secrets") && clusterWide {
				errs = append(errs, fmt.Errorf("%s: Secrets must only be granted in the install namespace (Role), not cluster-wide", where))
			}
			writes := slices.ContainsFunc(r.Verbs, func(v string) bool { return v == "update" || v == "patch" || v == "delete" })
			if slices.Contains(r.Resources, "mutatingwebhookconfigurations") && writes && len(r.ResourceNames) == 0 {
				errs = append(errs, fmt.Errorf("%s: writing webhook configurations must be limited to named objects", where))
			}
		}
	}
	for _, r := range roles {
		checkRules("Role "+r.Name, r.Rules, false)
	}
	for _, r := range croles {
		checkRules("ClusterRole "+r.Name, r.Rules, true)
	}
	checkSubjects := func(where string, subjects []rbacv1.Subject) {
		for _, s := range subjects {
			if s.Kind != "ServiceAccount" || in.Get("ServiceAccount", s.Namespace, s.Name) == nil {
				errs = append(errs, fmt.Errorf("%s: subject %s %s/%s is not a rendered ServiceAccount", where, s.Kind, s.Namespace, s.Name))
			}
		}
	}
	for _, b := range rbs {
		if in.Get(b.RoleRef.Kind, map[bool]string{true: b.Namespace, false: ""}[b.RoleRef.Kind == "Role"], b.RoleRef.Name) == nil {
			errs = append(errs, fmt.Errorf("RoleBinding %s: %s %s is not rendered", b.Name, b.RoleRef.Kind, b.RoleRef.Name))
		}
		checkSubjects("RoleBinding "+b.Name, b.Subjects)
	}
	for _, b := range crbs {
		if in.Get("ClusterRole", "", b.RoleRef.Name) == nil {
			errs = append(errs, fmt.Errorf("ClusterRoleBinding %s: ClusterRole %s is not rendered", b.Name, b.RoleRef.Name))
		}
		checkSubjects("ClusterRoleBinding "+b.Name, b.Subjects)
	}
	return errs
}

// checkNamespaces: every namespaced object is in the install namespace.
func checkNamespaces(in *Install, v Variant) []error {
	var errs []error
	for _, o := range in.Objs {
		switch o.GetKind() {
		case "Namespace", "CSIDriver", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
			"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding":
			if o.GetNamespace() != "" {
				errs = append(errs, fmt.Errorf("%s is cluster-scoped but has a namespace", describe(o)))
			}
		default:
			if o.GetNamespace() != v.Namespace {
				errs = append(errs, fmt.Errorf("%s: namespace %q, want %q", describe(o), o.GetNamespace(), v.Namespace))
			}
		}
	}
	return errs
}

// checkCSIDriver: the CSIDriver object of the design brief, section 2.
func checkCSIDriver(t testing.TB, in *Install) []error {
	u := in.Get("CSIDriver", "", driverName(in))
	if u == nil {
		return []error{fmt.Errorf("CSIDriver %s is not rendered", driverName(in))}
	}
	spec, _ := u.Object["spec"].(map[string]any)
	var errs []error
	want := map[string]any{"attachRequired": false, "podInfoOnMount": true, "fsGroupPolicy": "None", "seLinuxMount": false}
	for k, v := range want {
		if spec[k] != v {
			errs = append(errs, fmt.Errorf("CSIDriver: spec.%s = %v, want %v", k, spec[k], v))
		}
	}
	if got := u.GetLabels()[openShiftProfileLabel]; got != "restricted" {
		errs = append(errs, fmt.Errorf("CSIDriver: label %s = %q, want restricted", openShiftProfileLabel, got))
	}
	modes := fmt.Sprint(spec["volumeLifecycleModes"])
	if !strings.Contains(modes, "Ephemeral") || !strings.Contains(modes, "Persistent") {
		errs = append(errs, fmt.Errorf("CSIDriver: volumeLifecycleModes %s, want Ephemeral and Persistent", modes))
	}
	return errs
}

func report(t *testing.T, errs []error) {
	t.Helper()
	for _, err := range errs {
		t.Error(err)
	}
}

// TestPolicy runs every check on every variant.
func TestPolicy(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant, s Set) {
		in := install(t, s)
		report(t, checkNodePlugin(t, in))
		report(t, checkImagesPinned(in))
		report(t, checkRBAC(t, in))
		report(t, checkNamespaces(in, v))
		report(t, checkCSIDriver(t, in))
		if in.DropIn {
			report(t, checkDatadogDropIn(t, in))
			return
		}
		report(t, checkWebhookSelectors(in.WebhookConfigs, v.Namespace))
		report(t, checkWebhookConfig(in))
		report(t, checkWebhookWorkload(in))
		report(t, checkTLS(t, in))
	})
}
