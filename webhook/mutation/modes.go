package mutation

import (
	"fmt"
	"strings"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/version"
	schedulingcorev1 "k8s.io/component-helpers/scheduling/corev1"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"

	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
)

// modeRequest is the mode asked for, before the cluster is looked at, and who asked.
type modeRequest struct {
	mode config.Mode
	// source is "" for the configuration, else the annotation that chose the mode.
	source string
}

// requestedMode reads the mode a pod asks for: the pod's annotations (apm-csi's or Datadog's;
// both set to different modes is an error), else its namespace's annotation, else the
// configuration.
func (m *Mutator) requestedMode(pod *corev1.Pod, nsAnnotations map[string]string) (modeRequest, error) {
	req := modeRequest{mode: m.cfg.Mode}
	if v, ok := nsAnnotations[annotations.InjectionMode]; ok {
		parsed, err := config.ParseMode(v)
		if err != nil {
			return modeRequest{}, fmt.Errorf("namespace annotation %s: %v", annotations.InjectionMode, err)
		}
		req = modeRequest{mode: parsed, source: "namespace annotation " + annotations.InjectionMode}
	}
	var fromPod []modeRequest
	for _, key := range []string{annotations.InjectionMode, annotations.DatadogInjectionMode} {
		v, ok := pod.Annotations[key]
		if !ok {
			continue
		}
		parsed, err := config.ParseMode(v)
		if err != nil {
			return modeRequest{}, fmt.Errorf("pod annotation %s: %v", key, err)
		}
		fromPod = append(fromPod, modeRequest{mode: parsed, source: "pod annotation " + key})
	}
	switch {
	case len(fromPod) == 2 && fromPod[0].mode != fromPod[1].mode:
		return modeRequest{}, fmt.Errorf("pod annotations %s=%q and %s=%q ask for different injection modes; keep one",
			annotations.InjectionMode, pod.Annotations[annotations.InjectionMode],
			annotations.DatadogInjectionMode, pod.Annotations[annotations.DatadogInjectionMode])
	case len(fromPod) > 0:
		req = fromPod[0]
	}
	return req, nil
}

// NeedsNodes reports whether deciding about pod reads the cluster's nodes (Input.Nodes): when
// it asks for image volumes, or for auto while the CSI driver is not installed. The admission
// handler lists nodes only then.
func (m *Mutator) NeedsNodes(pod *corev1.Pod, ns *corev1.Namespace, driverInstalled bool) bool {
	var nsAnnotations map[string]string
	if ns != nil {
		nsAnnotations = ns.Annotations
	}
	req, err := m.requestedMode(pod, nsAnnotations)
	if err != nil {
		return false
	}
	return req.mode == config.ModeImageVolume || (req.mode == config.ModeAuto && !driverInstalled)
}

// resolveMode picks the injection mode and says why when it is not simply the one asked for:
// CSI falls back to init containers when the driver is not installed, image-volume when the
// cluster cannot serve image volumes to this pod, and auto tries CSI, image volumes and init
// containers in that order.
func (m *Mutator) resolveMode(pod *corev1.Pod, nsAnnotations map[string]string, in Input) (config.Mode, string, error) {
	req, err := m.requestedMode(pod, nsAnnotations)
	if err != nil {
		return "", "", err
	}
	noDriver := fmt.Sprintf("CSI driver %s is not installed", m.cfg.DriverName)
	switch req.mode {
	case config.ModeCSI:
		if !in.DriverInstalled {
			return config.ModeInitContainer, noDriver + ", fell back to init-container mode", nil
		}
		return config.ModeCSI, "", nil
	case config.ModeImageVolume:
		ok, why := m.imageVolumeSupport(pod, in)
		if !ok {
			return config.ModeInitContainer, "image volumes cannot be used: " + why + "; fell back to init-container mode", nil
		}
		return config.ModeImageVolume, "image volumes: " + why, nil
	case config.ModeAuto:
		auto := "auto mode"
		if req.source != "" {
			auto += " (" + req.source + ")"
		}
		if in.DriverInstalled {
			return config.ModeCSI, fmt.Sprintf("%s chose csi: CSI driver %s is installed", auto, m.cfg.DriverName), nil
		}
		if ok, why := m.imageVolumeSupport(pod, in); ok {
			return config.ModeImageVolume, fmt.Sprintf("%s chose image-volume: %s; image volumes: %s", auto, noDriver, why), nil
		} else {
			return config.ModeInitContainer, fmt.Sprintf("%s chose init-container: %s; image volumes cannot be used: %s", auto, noDriver, why), nil
		}
	}
	return req.mode, "", nil
}

// imageVolumeSupport decides whether the pod can get image volumes, and says why (or why not)
// in words for the status. Supported means: the API server is at least
// imageVolumes.minKubernetesVersion, and there is at least one Linux node the pod can be
// scheduled to (spec.nodeName, nodeSelector, required node affinity, NoSchedule/NoExecute
// taints it does not tolerate) and every such node runs a kubelet of at least that version and
// a container runtime of at least its imageVolumes.runtimes version. Nodes that join later are
// unknown: a pod admitted with image volumes and scheduled to an older node does not start.
//
// Each node's capability is judged first (versions parsed once per distinct string); the
// scheduling constraints, the costly part on a large cluster, are then evaluated only for the
// nodes that cannot serve image volumes, and for the others until one is found.
func (m *Mutator) imageVolumeSupport(pod *corev1.Pod, in Input) (bool, string) {
	iv := m.cfg.ImageVolumes
	minVersion, err := version.ParseGeneric(iv.MinKubernetesVersion)
	if err != nil {
		return false, fmt.Sprintf("imageVolumes.minKubernetesVersion %q is invalid", iv.MinKubernetesVersion)
	}
	if in.ServerVersion == "" {
		return false, "the API server version is not known yet"
	}
	server, err := version.ParseGeneric(in.ServerVersion)
	if err != nil {
		return false, fmt.Sprintf("the API server version %q cannot be read", in.ServerVersion)
	}
	if server.LessThan(minVersion) {
		return false, fmt.Sprintf("API server %s is older than %s (configuration imageVolumes.minKubernetesVersion)", in.ServerVersion, iv.MinKubernetesVersion)
	}
	if in.NodesError != nil {
		return false, fmt.Sprintf("the nodes could not be read: %v", in.NodesError)
	}
	judge := m.nodeJudge(minVersion)
	schedulable := false
	runtimes := map[string]bool{}
	sched := newSchedulability(pod)
	for i := range in.Nodes {
		n := &in.Nodes[i]
		if !linuxNode(n) {
			continue
		}
		if why := judge(n.Status.NodeInfo); why != "" {
			if sched.admits(n) {
				return false, fmt.Sprintf("node %s %s", n.Name, why)
			}
			continue
		}
		if !schedulable {
			schedulable = sched.admits(n)
		}
		runtimes[n.Status.NodeInfo.ContainerRuntimeVersion] = true
	}
	if !schedulable {
		return false, "no Linux node the pod can be scheduled to is known"
	}
	var seen []string
	for _, rt := range sortedKeys(runtimes) {
		seen = append(seen, strings.Replace(rt, "://", " ", 1))
	}
	if len(seen) > 3 {
		seen = append(seen[:3], "...")
	}
	return true, fmt.Sprintf("API server %s, and every Linux node the pod can be scheduled to serves them (capable nodes run %s)", in.ServerVersion, strings.Join(seen, ", "))
}

// nodeJudge returns a function that says why a node cannot serve image volumes with subPath,
// or "", parsing each distinct version string once.
func (m *Mutator) nodeJudge(minKubelet *version.Version) func(corev1.NodeSystemInfo) string {
	parsed := map[string]*version.Version{}
	parse := func(s string) *version.Version {
		v, ok := parsed[s]
		if !ok {
			v, _ = version.ParseGeneric(s)
			parsed[s] = v
		}
		return v
	}
	verdicts := map[[2]string]string{}
	return func(info corev1.NodeSystemInfo) string {
		key := [2]string{info.KubeletVersion, info.ContainerRuntimeVersion}
		if why, ok := verdicts[key]; ok {
			return why
		}
		why := m.nodeImageVolumeProblem(info, minKubelet, parse)
		verdicts[key] = why
		return why
	}
}

// nodeImageVolumeProblem says why a node cannot serve image volumes with subPath, or "".
func (m *Mutator) nodeImageVolumeProblem(info corev1.NodeSystemInfo, minKubelet *version.Version, parse func(string) *version.Version) string {
	kubelet := parse(info.KubeletVersion)
	if kubelet == nil {
		return fmt.Sprintf("reports no readable kubelet version (%q)", info.KubeletVersion)
	}
	if kubelet.LessThan(minKubelet) {
		return fmt.Sprintf("runs kubelet %s, older than %s", info.KubeletVersion, m.cfg.ImageVolumes.MinKubernetesVersion)
	}
	name, ver, ok := strings.Cut(info.ContainerRuntimeVersion, "://")
	if !ok {
		return fmt.Sprintf("reports no readable container runtime (%q)", info.ContainerRuntimeVersion)
	}
	want, known := m.cfg.ImageVolumes.Runtimes[name]
	if !known {
		return fmt.Sprintf("runs %s %s, not a runtime configured to serve image volumes (imageVolumes.runtimes: %s)", name, ver, runtimeList(m.cfg.ImageVolumes.Runtimes))
	}
	have := parse(ver)
	if have == nil {
		return fmt.Sprintf("reports an unreadable %s version %q", name, ver)
	}
	if minRuntime := parse(want); minRuntime == nil || have.LessThan(minRuntime) {
		return fmt.Sprintf("runs %s %s (image volumes with subPath need %s %s or newer)", name, ver, name, want)
	}
	return ""
}

func runtimeList(r map[string]string) string {
	var out []string
	for _, k := range sortedKeys(r) {
		out = append(out, k+" "+r[k])
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ", ")
}

// transientTaintPrefix starts the taints Kubernetes sets from a node's condition or cordon.
const transientTaintPrefix = "node.kubernetes.io/"

// schedulability says whether the scheduler could put the pod on a node, judged by what the
// pod says at admission: spec.nodeName, its nodeSelector and required node affinity, and the
// NoSchedule and NoExecute taints it does not tolerate, except the node.kubernetes.io/ taints
// of a node that is not ready, under pressure or cordoned, which it can lose at any time.
type schedulability struct {
	pod      *corev1.Pod
	affinity nodeaffinity.RequiredNodeAffinity
}

func newSchedulability(pod *corev1.Pod) schedulability {
	return schedulability{pod: pod, affinity: nodeaffinity.GetRequiredNodeAffinity(pod)}
}

func (s schedulability) admits(n *corev1.Node) bool {
	if s.pod.Spec.NodeName != "" {
		return n.Name == s.pod.Spec.NodeName
	}
	if ok, err := s.affinity.Match(n); err != nil || !ok {
		return false
	}
	_, untolerated := schedulingcorev1.FindMatchingUntoleratedTaint(logr.Discard(), n.Spec.Taints, s.pod.Spec.Tolerations, func(t *corev1.Taint) bool {
		return (t.Effect == corev1.TaintEffectNoSchedule || t.Effect == corev1.TaintEffectNoExecute) && !strings.HasPrefix(t.Key, transientTaintPrefix)
	}, false)
	return !untolerated
}

// linuxNode reports whether a node runs Linux, by its kubernetes.io/os label or, without it,
// by what kubelet reports.
func linuxNode(n *corev1.Node) bool {
	if osName, ok := n.Labels[corev1.LabelOSStable]; ok {
		return osName == string(corev1.Linux)
	}
	return n.Status.NodeInfo.OperatingSystem == "" || n.Status.NodeInfo.OperatingSystem == string(corev1.Linux)
}
