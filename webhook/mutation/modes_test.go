package mutation

import (
	"errors"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
)

// testNode is a node as kubelet reports it (only what the mode decision reads).
func testNode(name, kubelet, runtime string, labels map[string]string, taints ...corev1.Taint) corev1.Node {
	l := map[string]string{corev1.LabelOSStable: "linux", corev1.LabelHostname: name}
	for k, v := range labels {
		l[k] = v
	}
	return corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l},
		Spec:       corev1.NodeSpec{Taints: taints},
		Status: corev1.NodeStatus{NodeInfo: corev1.NodeSystemInfo{
			KubeletVersion: kubelet, ContainerRuntimeVersion: runtime, OperatingSystem: "linux",
		}},
	}
}

// ivInput is a cluster that serves image volumes: a 1.35 API server, two containerd 2.2 nodes
// and one CRI-O node, no CSI driver.
func ivInput(pod *corev1.Pod, ns *corev1.Namespace) Input {
	in := input(pod, ns)
	in.DriverInstalled = false
	in.ServerVersion = "v1.35.2"
	in.Nodes = []corev1.Node{
		testNode("n1", "v1.35.2", "containerd://2.2.1", nil),
		testNode("n2", "v1.35.2", "containerd://2.3.0", nil),
		testNode("n3", "v1.35.1", "cri-o://1.35.0", nil),
	}
	return in
}

func TestImageVolumeModeInjectorLayout(t *testing.T) {
	pod := withAnnotations(webPod(), annotations.InjectionMode, "image-volume")
	res := newTestMutator(t).Mutate(ivInput(pod, ssiNamespace()))
	if res.Outcome != OutcomeInjected || res.Mode != config.ModeImageVolume {
		t.Fatalf("got %s %s: %s", res.Outcome, res.Mode, res.Reason)
	}
	p := res.Pod
	if len(p.Spec.InitContainers) != 2 || volume(p, VolumeName) != nil {
		t.Errorf("image-volume mode adds no init container and no CSI volume: init %d, volumes %+v", len(p.Spec.InitContainers), p.Spec.Volumes)
	}
	wantImages := map[string]string{
		"apm-csi-lib-injector": "gcr.io/datadoghq/apm-inject:0",
		"apm-csi-lib-java":     "gcr.io/datadoghq/dd-lib-java-init:v1",
		"apm-csi-lib-js":       "gcr.io/datadoghq/dd-lib-js-init:v5",
		"apm-csi-lib-python":   "gcr.io/datadoghq/dd-lib-python-init:v3",
		"apm-csi-lib-dotnet":   "gcr.io/datadoghq/dd-lib-dotnet-init:v3",
		"apm-csi-lib-ruby":     "gcr.io/datadoghq/dd-lib-ruby-init:v2",
		"apm-csi-lib-php":      "gcr.io/datadoghq/dd-lib-php-init:v1",
	}
	for name, ref := range wantImages {
		v := volume(p, name)
		if v == nil || v.Image == nil || v.Image.Reference != ref || v.Image.PullPolicy != corev1.PullIfNotPresent {
			t.Errorf("volume %s = %+v, want image %s pulled IfNotPresent", name, v, ref)
		}
	}
	pre := volume(p, PreloadVolumeName)
	if pre == nil || pre.DownwardAPI == nil || len(pre.DownwardAPI.Items) != 1 ||
		pre.DownwardAPI.Items[0].FieldRef.FieldPath != "metadata.annotations['apm-csi.io/ld.so.preload']" {
		t.Fatalf("preload volume = %+v", pre)
	}
	if got := p.Annotations[annotations.Preload]; got != launcherLD+"\n" {
		t.Errorf("preload annotation = %q", got)
	}
	if len(p.Spec.Volumes) != 1+7+1 {
		t.Errorf("volumes = %d, want the pod's own, 7 image volumes and the preload file", len(p.Spec.Volumes))
	}
	for _, name := range []string{"app", "worker", "log-shipper"} {
		c := container(t, p, name)
		want := []corev1.VolumeMount{
			{Name: "apm-csi-lib-injector", MountPath: "/opt/datadog-packages/datadog-apm-inject", SubPath: "opt/datadog-packages/datadog-apm-inject", ReadOnly: true},
			{Name: "apm-csi-lib-java", MountPath: "/opt/datadog/apm/library/java", SubPath: "datadog-init/package", ReadOnly: true},
			{Name: "apm-csi-lib-php", MountPath: "/opt/datadog/apm/library/php", SubPath: "datadog-init/package", ReadOnly: true},
			{Name: PreloadVolumeName, MountPath: "/etc/ld.so.preload", SubPath: "ld.so.preload", ReadOnly: true},
		}
		for _, m := range want {
			if !hasMount(c, m) {
				t.Errorf("container %s lacks mount %+v; has %+v", name, m, c.VolumeMounts)
			}
		}
	}
	// The same environment as in CSI mode.
	csi := newTestMutator(t).Mutate(input(webPod(), ssiNamespace()))
	for _, name := range []string{"app", "worker", "log-shipper"} {
		if got, want := container(t, p, name).Env, container(t, csi.Pod, name).Env; !slices.Equal(envNames(got), envNames(want)) {
			t.Errorf("container %s env %v, CSI mode gives %v", name, envNames(got), envNames(want))
		}
	}
	if v, _ := envValue(container(t, p, "app"), "LD_PRELOAD"); v != "/usr/lib/libjemalloc.so:"+launcherLD {
		t.Errorf("LD_PRELOAD = %q", v)
	}
	if len(container(t, p, "istio-proxy").VolumeMounts) != 0 || len(container(t, p, "migrate").VolumeMounts) != 0 {
		t.Error("istio-proxy and one-shot init containers are not instrumented")
	}
	if !strings.HasPrefix(p.Annotations[annotations.InjectionStatus], "injected: image-volume mode, injector layout, containers log-shipper,app,worker; image volumes: API server v1.35.2, and every Linux node the pod can be scheduled to serves them (capable nodes run containerd 2.2.1, containerd 2.3.0, cri-o 1.35.0)") {
		t.Errorf("status = %q", p.Annotations[annotations.InjectionStatus])
	}
	if !slices.Contains(res.Libraries, "injector=gcr.io/datadoghq/apm-inject:0") || len(res.Libraries) != 7 {
		t.Errorf("libraries = %v", res.Libraries)
	}

	// Reinvocation, and a copy of the instrumented pod without the status: unchanged.
	again := newTestMutator(t).Mutate(ivInput(p, ssiNamespace()))
	if again.Outcome != OutcomeIgnored || again.Pod != nil {
		t.Errorf("reinvocation: %s %s", again.Outcome, again.Reason)
	}
	copied := p.DeepCopy()
	delete(copied.Annotations, annotations.InjectionStatus)
	if again := newTestMutator(t).Mutate(ivInput(copied, ssiNamespace())); again.Outcome != OutcomeIgnored {
		t.Errorf("copy of an instrumented pod: %s %s", again.Outcome, again.Reason)
	}
}

func envNames(env []corev1.EnvVar) []string {
	var out []string
	for _, e := range env {
		out = append(out, e.Name)
	}
	return out
}

func TestImageVolumeModePerContainerLanguages(t *testing.T) {
	pod := withAnnotations(webPod(), annotations.DatadogInjectionMode, "image_volume", annotations.ContainerLanguages, "app=java; worker=js,python")
	res := newTestMutator(t).Mutate(ivInput(pod, ssiNamespace()))
	if res.Mode != config.ModeImageVolume {
		t.Fatalf("got %s %s: %s", res.Outcome, res.Mode, res.Reason)
	}
	var images []string
	for _, v := range res.Pod.Spec.Volumes {
		if v.Image != nil {
			images = append(images, v.Name)
		}
	}
	if want := []string{"apm-csi-lib-injector", "apm-csi-lib-java", "apm-csi-lib-js", "apm-csi-lib-python"}; !slices.Equal(images, want) {
		t.Errorf("image volumes = %v, want only the languages used: %v", images, want)
	}
	var worker []string
	for _, m := range container(t, res.Pod, "worker").VolumeMounts {
		worker = append(worker, m.MountPath)
	}
	if want := []string{"/opt/datadog-packages/datadog-apm-inject", "/opt/datadog/apm/library/js", "/opt/datadog/apm/library/python", "/etc/ld.so.preload"}; !slices.Equal(worker, want) {
		t.Errorf("worker mounts = %v, want %v", worker, want)
	}
}

func TestImageVolumeModeDirectLayout(t *testing.T) {
	t.Run("one language per container", func(t *testing.T) {
		pod := withAnnotations(webPod(), annotations.InjectionMode, "image-volume", annotations.ContainerLanguages, "app=dotnet; worker=js")
		res := newTestMutator(t, directLayout).Mutate(ivInput(pod, ssiNamespace()))
		if res.Mode != config.ModeImageVolume {
			t.Fatalf("got %s %s: %s", res.Outcome, res.Mode, res.Reason)
		}
		app := container(t, res.Pod, "app")
		if !hasMount(app, corev1.VolumeMount{Name: "apm-csi-lib-dotnet", MountPath: "/datadog-lib", SubPath: "datadog-init/package", ReadOnly: true}) {
			t.Errorf("app mounts = %+v", app.VolumeMounts)
		}
		// The image is read-only: the .NET tracer logs to an emptyDir, not next to itself.
		if !hasMount(app, corev1.VolumeMount{Name: TracerLogsVolumeName, MountPath: TracerLogsMountPath}) {
			t.Errorf("app has no writable log directory: %+v", app.VolumeMounts)
		}
		if v, _ := envValue(app, "DD_TRACE_LOG_DIRECTORY"); v != "/var/log/apm-csi/dotnet" {
			t.Errorf("DD_TRACE_LOG_DIRECTORY = %q", v)
		}
		if v, _ := envValue(app, "CORECLR_PROFILER_PATH"); v != "/datadog-lib/Datadog.Trace.ClrProfiler.Native.so" {
			t.Errorf("CORECLR_PROFILER_PATH = %q", v)
		}
		if v := volume(res.Pod, TracerLogsVolumeName); v == nil || v.EmptyDir == nil {
			t.Errorf("no emptyDir %s", TracerLogsVolumeName)
		}
		if volume(res.Pod, PreloadVolumeName) != nil || res.Pod.Annotations[annotations.Preload] != "" {
			t.Error("the direct layout has no preload file")
		}
		worker := container(t, res.Pod, "worker")
		if !hasMount(worker, corev1.VolumeMount{Name: "apm-csi-lib-js", MountPath: "/datadog-lib", SubPath: "datadog-init/package", ReadOnly: true}) || len(worker.VolumeMounts) != 1 {
			t.Errorf("worker mounts = %+v", worker.VolumeMounts)
		}
	})
	t.Run("several languages in one container fall back to init containers", func(t *testing.T) {
		pod := withAnnotations(webPod(), annotations.InjectionMode, "image-volume")
		res := newTestMutator(t, directLayout).Mutate(ivInput(pod, ssiNamespace()))
		if res.Mode != config.ModeInitContainer || res.Outcome != OutcomeInjected {
			t.Fatalf("got %s %s: %s", res.Outcome, res.Mode, res.Reason)
		}
		if !strings.Contains(res.Reason, "one image volume per mount cannot serve: fell back to init-container mode") {
			t.Errorf("reason = %q", res.Reason)
		}
		if v, _ := envValue(container(t, res.Pod, "app"), "DD_TRACE_LOG_DIRECTORY"); v != "/datadog-lib/logs" {
			t.Errorf("init-container mode keeps the log directory in the writable emptyDir: %q", v)
		}
	})
}

func TestImageVolumeNameTaken(t *testing.T) {
	pod := withAnnotations(webPod(), annotations.InjectionMode, "image-volume")
	pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: PreloadVolumeName, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
	res := newTestMutator(t).Mutate(ivInput(pod, ssiNamespace()))
	if res.Outcome != OutcomeSkipped || !strings.Contains(res.Reason, "already has a volume named apm-csi-preload") {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
}

func TestModeSelection(t *testing.T) {
	taint := corev1.Taint{Key: "old-runtime", Value: "true", Effect: corev1.TaintEffectNoSchedule}
	tests := []struct {
		name string
		// pod annotations and namespace annotations
		pod, ns []string
		cfg     func(*config.Config)
		in      func(*Input)
		want    config.Mode
		reason  []string
	}{
		{name: "default configuration, driver installed", in: driver, want: config.ModeCSI},
		{name: "default configuration, no driver", want: config.ModeInitContainer,
			reason: []string{"CSI driver csi.apm-csi.io is not installed, fell back to init-container mode"}},
		{name: "configuration auto, driver installed", cfg: modeCfg(config.ModeAuto), in: driver, want: config.ModeCSI,
			reason: []string{"auto mode chose csi: CSI driver csi.apm-csi.io is installed"}},
		{name: "configuration auto, no driver, image volumes served", cfg: modeCfg(config.ModeAuto), want: config.ModeImageVolume,
			reason: []string{"auto mode chose image-volume: CSI driver csi.apm-csi.io is not installed; image volumes: API server v1.35.2"}},
		{name: "namespace auto", ns: []string{annotations.InjectionMode, "auto"}, want: config.ModeImageVolume,
			reason: []string{"auto mode (namespace annotation apm-csi.io/injection-mode) chose image-volume"}},
		{name: "pod auto wins over namespace", ns: []string{annotations.InjectionMode, "init-container"}, pod: []string{annotations.InjectionMode, "auto"},
			want: config.ModeImageVolume, reason: []string{"auto mode (pod annotation apm-csi.io/injection-mode) chose image-volume"}},
		{name: "Datadog annotation auto", pod: []string{annotations.DatadogInjectionMode, "auto"}, want: config.ModeImageVolume,
			reason: []string{"auto mode (pod annotation admission.datadoghq.com/apm-inject.injection-mode) chose image-volume"}},
		{name: "Datadog annotation csi", pod: []string{annotations.DatadogInjectionMode, "csi"}, cfg: modeCfg(config.ModeInitContainer), in: driver, want: config.ModeCSI},
		{name: "Datadog annotation init_container", pod: []string{annotations.DatadogInjectionMode, "init_container"}, in: driver, want: config.ModeInitContainer},
		{name: "Datadog annotation image_volume", pod: []string{annotations.DatadogInjectionMode, "image_volume"}, in: driver, want: config.ModeImageVolume},
		{name: "Datadog annotation wins over namespace", ns: []string{annotations.InjectionMode, "csi"}, pod: []string{annotations.DatadogInjectionMode, "image_volume"}, in: driver, want: config.ModeImageVolume},
		{name: "both pod annotations agree", pod: []string{annotations.DatadogInjectionMode, "image_volume", annotations.InjectionMode, "image-volume"}, want: config.ModeImageVolume},
		{name: "auto, API server too old", cfg: modeCfg(config.ModeAuto), in: func(in *Input) { in.ServerVersion = "v1.34.2" }, want: config.ModeInitContainer,
			reason: []string{"auto mode chose init-container: CSI driver csi.apm-csi.io is not installed; image volumes cannot be used: API server v1.34.2 is older than 1.35 (configuration imageVolumes.minKubernetesVersion)"}},
		{name: "auto, 1.34 with the feature gate on and the minimum lowered", cfg: func(c *config.Config) { c.Mode = config.ModeAuto; c.ImageVolumes.MinKubernetesVersion = "1.34" },
			in: func(in *Input) {
				in.ServerVersion = "v1.34.2"
				in.Nodes = []corev1.Node{testNode("n1", "v1.34.2", "containerd://2.2.0", nil)}
			}, want: config.ModeImageVolume},
		{name: "auto, API server version unknown", cfg: modeCfg(config.ModeAuto), in: func(in *Input) { in.ServerVersion = "" }, want: config.ModeInitContainer,
			reason: []string{"the API server version is not known yet"}},
		{name: "auto, one node on containerd 2.1 (subPath ignored)", cfg: modeCfg(config.ModeAuto),
			in: addNode(testNode("old", "v1.35.2", "containerd://2.1.4", nil)), want: config.ModeInitContainer,
			reason: []string{"image volumes cannot be used: node old runs containerd 2.1.4 (image volumes with subPath need containerd 2.2 or newer)"}},
		{name: "auto, CRI-O too old", cfg: modeCfg(config.ModeAuto),
			in: addNode(testNode("crio", "v1.35.2", "cri-o://1.32.5", nil)), want: config.ModeInitContainer,
			reason: []string{"node crio runs cri-o 1.32.5 (image volumes with subPath need cri-o 1.33 or newer)"}},
		{name: "auto, old kubelet", cfg: modeCfg(config.ModeAuto),
			in: addNode(testNode("skewed", "v1.33.5", "containerd://2.2.0", nil)), want: config.ModeInitContainer,
			reason: []string{"node skewed runs kubelet v1.33.5, older than 1.35"}},
		{name: "auto, unknown runtime", cfg: modeCfg(config.ModeAuto),
			in: addNode(testNode("docker", "v1.35.2", "docker://28.0.1", nil)), want: config.ModeInitContainer,
			reason: []string{"node docker runs docker 28.0.1, not a runtime configured to serve image volumes (imageVolumes.runtimes: containerd 2.2, cri-o 1.33)"}},
		{name: "auto, the first bad node is named", cfg: modeCfg(config.ModeAuto),
			in: addNode(testNode("a", "v1.35.2", "containerd://1.7.27", nil), testNode("b", "v1.35.2", "containerd://1.7.27", nil)), want: config.ModeInitContainer,
			reason: []string{"node a runs containerd 1.7.27"}},
		{name: "auto, runtimes {} turns image volumes off", cfg: func(c *config.Config) { c.Mode = config.ModeAuto; c.ImageVolumes.Runtimes = map[string]string{} },
			want: config.ModeInitContainer, reason: []string{"not a runtime configured to serve image volumes (imageVolumes.runtimes: none)"}},
		{name: "auto, an old node the pod's nodeSelector avoids", cfg: modeCfg(config.ModeAuto), pod: []string{"nodeSelector", "pool=new"},
			in: func(in *Input) {
				in.Nodes = []corev1.Node{
					testNode("new", "v1.35.2", "containerd://2.2.1", map[string]string{"pool": "new"}),
					testNode("old", "v1.35.2", "containerd://1.7.27", map[string]string{"pool": "old"}),
				}
			}, want: config.ModeImageVolume, reason: []string{"every Linux node the pod can be scheduled to serves them (capable nodes run containerd 2.2.1)"}},
		{name: "auto, an old node tainted against the pod", cfg: modeCfg(config.ModeAuto),
			in: addNode(testNode("old", "v1.35.2", "containerd://1.7.27", nil, taint)), want: config.ModeImageVolume},
		{name: "auto, an old node whose taint the pod tolerates", cfg: modeCfg(config.ModeAuto), pod: []string{"toleration", "old-runtime"},
			in: addNode(testNode("old", "v1.35.2", "containerd://1.7.27", nil, taint)), want: config.ModeInitContainer,
			reason: []string{"node old runs containerd 1.7.27"}},
		{name: "auto, an old node that is not ready or cordoned still counts", cfg: modeCfg(config.ModeAuto),
			in: addNode(testNode("old", "v1.35.2", "containerd://1.7.27", nil,
				corev1.Taint{Key: corev1.TaintNodeNotReady, Effect: corev1.TaintEffectNoSchedule},
				corev1.Taint{Key: corev1.TaintNodeUnschedulable, Effect: corev1.TaintEffectNoSchedule})),
			want: config.ModeInitContainer, reason: []string{"node old runs containerd 1.7.27"}},
		{name: "auto, a PreferNoSchedule taint does not keep the pod away", cfg: modeCfg(config.ModeAuto),
			in:   addNode(testNode("old", "v1.35.2", "containerd://1.7.27", nil, corev1.Taint{Key: "x", Effect: corev1.TaintEffectPreferNoSchedule})),
			want: config.ModeInitContainer},
		{name: "auto, Windows nodes do not count", cfg: modeCfg(config.ModeAuto),
			in: addNode(testNode("win", "v1.35.2", "containerd://1.7.27", map[string]string{corev1.LabelOSStable: "windows"})), want: config.ModeImageVolume},
		{name: "auto, pod bound to a node by spec.nodeName", cfg: modeCfg(config.ModeAuto), pod: []string{"nodeName", "old"},
			in: addNode(testNode("old", "v1.35.2", "containerd://1.7.27", nil)), want: config.ModeInitContainer, reason: []string{"node old runs containerd 1.7.27"}},
		{name: "auto, no node known", cfg: modeCfg(config.ModeAuto), in: func(in *Input) { in.Nodes = nil }, want: config.ModeInitContainer,
			reason: []string{"no Linux node the pod can be scheduled to is known"}},
		{name: "auto, nodes unreadable", cfg: modeCfg(config.ModeAuto), in: func(in *Input) { in.Nodes, in.NodesError = nil, errors.New("forbidden") }, want: config.ModeInitContainer,
			reason: []string{"the nodes could not be read: forbidden"}},
		{name: "explicit image-volume on an old cluster falls back", pod: []string{annotations.InjectionMode, "image-volume"}, in: func(in *Input) { in.ServerVersion = "v1.34.2" },
			want: config.ModeInitContainer, reason: []string{"image volumes cannot be used: API server v1.34.2 is older than 1.35", "fell back to init-container mode"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := webPod()
			var podAnn []string
			for i := 0; i < len(tt.pod); i += 2 {
				switch tt.pod[i] {
				case "nodeSelector":
					k, v, _ := strings.Cut(tt.pod[i+1], "=")
					pod.Spec.NodeSelector = map[string]string{k: v}
				case "toleration":
					pod.Spec.Tolerations = []corev1.Toleration{{Key: tt.pod[i+1], Operator: corev1.TolerationOpExists}}
				case "nodeName":
					pod.Spec.NodeName = tt.pod[i+1]
				default:
					podAnn = append(podAnn, tt.pod[i], tt.pod[i+1])
				}
			}
			if len(podAnn) > 0 {
				pod = withAnnotations(pod, podAnn...)
			}
			ns := ssiNamespace()
			if len(tt.ns) > 0 {
				ns = nsWith(ns, tt.ns...)
			}
			in := ivInput(pod, ns)
			if tt.in != nil {
				tt.in(&in)
			}
			var opts []func(*config.Config)
			if tt.cfg != nil {
				opts = append(opts, tt.cfg)
			}
			m := newTestMutator(t, opts...)
			res := m.Mutate(in)
			if res.Outcome != OutcomeInjected || res.Mode != tt.want {
				t.Fatalf("got %s %s, want %s: %s", res.Outcome, res.Mode, tt.want, res.Reason)
			}
			status := res.Pod.Annotations[annotations.InjectionStatus]
			if !strings.HasPrefix(status, "injected: "+string(tt.want)+" mode") {
				t.Errorf("status = %q", status)
			}
			for _, frag := range tt.reason {
				if !strings.Contains(status, frag) {
					t.Errorf("status %q lacks %q", status, frag)
				}
			}
		})
	}
}

func driver(in *Input) { in.DriverInstalled = true }

func modeCfg(m config.Mode) func(*config.Config) { return func(c *config.Config) { c.Mode = m } }

func addNode(nodes ...corev1.Node) func(*Input) {
	return func(in *Input) { in.Nodes = append(slices.Clone(in.Nodes), nodes...) }
}

func TestInvalidModeAnnotations(t *testing.T) {
	tests := []struct {
		name string
		ann  []string
		want []string
	}{
		{"unknown Datadog value", []string{annotations.DatadogInjectionMode, "sidecar"},
			[]string{`pod annotation admission.datadoghq.com/apm-inject.injection-mode: unknown injection mode "sidecar": use csi, image-volume, init-container or auto`}},
		{"pod annotations disagree", []string{annotations.DatadogInjectionMode, "csi", annotations.InjectionMode, "init-container"},
			[]string{`pod annotations apm-csi.io/injection-mode="init-container" and admission.datadoghq.com/apm-inject.injection-mode="csi" ask for different injection modes; keep one`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := newTestMutator(t).Mutate(ivInput(withAnnotations(webPod(), tt.ann...), ssiNamespace()))
			if res.Outcome != OutcomeError || len(res.Warnings) == 0 {
				t.Fatalf("got %s: %s", res.Outcome, res.Reason)
			}
			for _, frag := range tt.want {
				if !strings.Contains(res.Pod.Annotations[annotations.InjectionStatus], frag) {
					t.Errorf("status %q lacks %q", res.Pod.Annotations[annotations.InjectionStatus], frag)
				}
			}
			if volume(res.Pod, "apm-csi-lib-injector") != nil || volume(res.Pod, VolumeName) != nil {
				t.Error("an invalid mode admits the pod uninstrumented")
			}
		})
	}
}

func TestNeedsNodes(t *testing.T) {
	m := newTestMutator(t)
	auto := newTestMutator(t, modeCfg(config.ModeAuto))
	tests := []struct {
		name   string
		m      *Mutator
		pod    *corev1.Pod
		driver bool
		want   bool
	}{
		{"csi", m, webPod(), false, false},
		{"auto with the driver", auto, webPod(), true, false},
		{"auto without the driver", auto, webPod(), false, true},
		{"image-volume annotation", m, withAnnotations(webPod(), annotations.DatadogInjectionMode, "image_volume"), true, true},
		{"invalid annotation", m, withAnnotations(webPod(), annotations.InjectionMode, "x"), false, false},
	}
	for _, tt := range tests {
		if got := tt.m.NeedsNodes(tt.pod, ssiNamespace(), tt.driver); got != tt.want {
			t.Errorf("%s: NeedsNodes = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestRewriteNotInImageVolumeMode(t *testing.T) {
	pod := withAnnotations(datadogInjectedPod(), annotations.InjectionMode, "image-volume")
	res := newTestMutator(t).Mutate(ivInput(pod, plainNamespace()))
	if res.Outcome != OutcomeSkipped || !strings.Contains(res.Reason, "image-volume mode keeps them") {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
}
