package mutation

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
)

func TestWhoIsMutated(t *testing.T) {
	inNS := func(p *corev1.Pod, ns string) *corev1.Pod { p = p.DeepCopy(); p.Namespace = ns; return p }
	tests := []struct {
		name    string
		pod     *corev1.Pod
		ns      *corev1.Namespace
		nsErr   error
		cfg     func(*config.Config)
		want    Outcome
		changed bool
	}{
		{name: "SSI namespace", pod: webPod(), ns: ssiNamespace(), want: OutcomeInjected, changed: true},
		{name: "plain namespace, unlabelled pod", pod: webPod(), ns: plainNamespace(), want: OutcomeIgnored},
		{name: "plain namespace, labelled pod", pod: withLabels(webPod(), annotations.DatadogEnabled, "true"), ns: plainNamespace(), want: OutcomeInjected, changed: true},
		{name: "opt-out inside SSI namespace", pod: withLabels(webPod(), annotations.DatadogEnabled, "false"), ns: ssiNamespace(), want: OutcomeIgnored},
		{name: "label value other than true", pod: withLabels(webPod(), annotations.DatadogEnabled, "yes"), ns: plainNamespace(), want: OutcomeIgnored},
		{name: "kube-system even when labelled", pod: inNS(withLabels(webPod(), annotations.DatadogEnabled, "true"), "kube-system"), ns: ssiNamespace(), want: OutcomeIgnored},
		{name: "own namespace even when labelled", pod: inNS(withLabels(webPod(), annotations.DatadogEnabled, "true"), systemNS), ns: ssiNamespace(), want: OutcomeIgnored},
		{name: "configured excluded namespace", pod: withLabels(webPod(), annotations.DatadogEnabled, "true"), ns: ssiNamespace(),
			cfg: func(c *config.Config) { c.ExcludedNamespaces = []string{testNS} }, want: OutcomeIgnored},
		{name: "custom SSI label", pod: webPod(), ns: withNSLabel(plainNamespace(), "example.com/apm", "enabled"),
			cfg: func(c *config.Config) { c.SSINamespaceLabel = "example.com/apm" }, want: OutcomeInjected, changed: true},
		{name: "rewrite namespace, plain pod: nothing recorded, so a later injector can be rewritten on reinvocation",
			pod: webPod(), ns: withNSLabel(plainNamespace(), config.DefaultSSINamespaceLabel, "rewrite"), want: OutcomeIgnored},
		{name: "rewrite-only configuration, labelled pod", pod: withLabels(webPod(), annotations.DatadogEnabled, "true"), ns: plainNamespace(),
			cfg: func(c *config.Config) { c.RewriteOnly = true }, want: OutcomeIgnored},
		{name: "rewrite namespace, Datadog-injected pod", pod: datadogInjectedPod(), ns: withNSLabel(plainNamespace(), config.DefaultSSINamespaceLabel, "rewrite"),
			want: OutcomeRewritten, changed: true},
		{name: "unreadable namespace, labelled pod still instrumented", pod: withLabels(webPod(), annotations.DatadogEnabled, "true"), nsErr: errors.New("timeout"),
			want: OutcomeInjected, changed: true},
		{name: "unreadable namespace, unlabelled pod: error recorded", pod: webPod(), nsErr: errors.New("timeout"), want: OutcomeError, changed: true},
		{name: "mirror pod of a static pod in an SSI namespace", pod: withAnnotations(webPod(), corev1.MirrorPodAnnotationKey, "3f2a9c"), ns: ssiNamespace(), want: OutcomeIgnored},
		{name: "mirror pod labelled for SSI", pod: withAnnotations(withLabels(webPod(), annotations.DatadogEnabled, "true"), corev1.MirrorPodAnnotationKey, "3f2a9c"),
			ns: plainNamespace(), want: OutcomeIgnored},
		{name: "mirror pod with manual volumes, even an invalid one", pod: withAnnotations(withLabels(webPod(), annotations.Volumes, "enabled"),
			corev1.MirrorPodAnnotationKey, "3f2a9c", annotations.VolumePrefix+"sock", "hostdir=apm-socket; mountPath=/var/run/datadog", annotations.VolumePrefix+"bad", "libraries=jav"),
			ns: plainNamespace(), want: OutcomeIgnored},
		{name: "mirror pod already carrying Datadog's init-container injection", pod: withAnnotations(datadogInjectedPod(), corev1.MirrorPodAnnotationKey, "3f2a9c"),
			ns: ssiNamespace(), want: OutcomeIgnored},
		{name: "unreadable namespace, manual volumes only", pod: withAnnotations(withLabels(webPod(), annotations.Volumes, "enabled"),
			annotations.VolumePrefix+"sock", "hostdir=apm-socket; mountPath=/var/run/datadog"), nsErr: errors.New("timeout"), want: OutcomeInjected, changed: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var opts []func(*config.Config)
			if tt.cfg != nil {
				opts = append(opts, tt.cfg)
			}
			m := newTestMutator(t, opts...)
			in := input(tt.pod, tt.ns)
			in.NamespaceError = tt.nsErr
			before := tt.pod.DeepCopy()
			res := m.Mutate(in)
			if res.Outcome != tt.want {
				t.Fatalf("outcome = %s (%s), want %s", res.Outcome, res.Reason, tt.want)
			}
			if (res.Pod != nil) != tt.changed {
				t.Fatalf("changed = %v, want %v", res.Pod != nil, tt.changed)
			}
			if !equality.Semantic.DeepEqual(before, tt.pod) {
				t.Fatal("Mutate modified its input pod")
			}
			if res.Pod != nil {
				if _, ok := res.Pod.Annotations[annotations.InjectionStatus]; !ok {
					t.Error("a changed pod must carry the status annotation")
				}
			}
		})
	}
}

func withNSLabel(ns *corev1.Namespace, k, v string) *corev1.Namespace {
	ns = ns.DeepCopy()
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	ns.Labels[k] = v
	return ns
}

func TestInjectorLayoutCSI(t *testing.T) {
	m := newTestMutator(t)
	res := m.Mutate(input(webPod(), ssiNamespace()))
	if res.Outcome != OutcomeInjected || res.Mode != config.ModeCSI || res.Layout != config.LayoutInjector {
		t.Fatalf("got %s %s %s: %s", res.Outcome, res.Mode, res.Layout, res.Reason)
	}
	pod := res.Pod

	spec := csiSpec(t, pod, VolumeName)
	want := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Type: volumeattrs.TypeLibrary, Preload: libref.LauncherPath,
		Libraries: []volumeattrs.Library{{Image: "gcr.io/datadoghq/apm-inject:0", Source: libref.InjectorSource, Target: libref.InjectorTarget}}}
	for _, l := range libref.Languages {
		want.Libraries = append(want.Libraries, volumeattrs.Library{Image: m.cfg.DefaultImage(l), Source: libref.LibrarySource, Target: "opt/datadog/apm/library/" + l})
	}
	if !reflect.DeepEqual(spec, want) {
		t.Errorf("volume spec\n got %+v\nwant %+v", spec, want)
	}
	if len(pod.Spec.InitContainers) != 2 {
		t.Errorf("CSI mode must add no init container; have %d", len(pod.Spec.InitContainers))
	}

	wantMounts := []corev1.VolumeMount{
		{Name: VolumeName, MountPath: "/opt/datadog-packages/datadog-apm-inject", SubPath: "opt/datadog-packages/datadog-apm-inject"},
		{Name: VolumeName, MountPath: "/opt/datadog/apm/library", SubPath: "opt/datadog/apm/library"},
		{Name: VolumeName, MountPath: "/etc/ld.so.preload", SubPath: "etc/ld.so.preload", ReadOnly: true},
	}
	for _, name := range []string{"app", "worker", "log-shipper"} {
		c := container(t, pod, name)
		var ours []corev1.VolumeMount
		for _, vm := range c.VolumeMounts {
			if vm.Name == VolumeName {
				ours = append(ours, vm)
			}
		}
		if !reflect.DeepEqual(ours, wantMounts) {
			t.Errorf("%s mounts\n got %+v\nwant %+v", name, ours, wantMounts)
		}
		if v, _ := envValue(c, "DD_INJECT_SENDER_TYPE"); v != "k8s" {
			t.Errorf("%s DD_INJECT_SENDER_TYPE = %q", name, v)
		}
		if v, _ := envValue(c, "DD_INJECT_START_TIME"); v != "1700000000" {
			t.Errorf("%s DD_INJECT_START_TIME = %q", name, v)
		}
	}
	if v, _ := envValue(container(t, pod, "app"), "LD_PRELOAD"); v != "/usr/lib/libjemalloc.so:"+launcherLD {
		t.Errorf("existing LD_PRELOAD must be appended to with ':'; got %q", v)
	}
	if v, _ := envValue(container(t, pod, "worker"), "LD_PRELOAD"); v != launcherLD {
		t.Errorf("worker LD_PRELOAD = %q", v)
	}
	if v, _ := envValue(container(t, pod, "app"), "JAVA_TOOL_OPTIONS"); v != "-Xmx512m" {
		t.Errorf("the injector layout must leave JAVA_TOOL_OPTIONS alone; got %q", v)
	}
	for _, untouched := range []string{"istio-proxy", "migrate"} {
		if !equality.Semantic.DeepEqual(container(t, pod, untouched), container(t, webPod(), untouched)) {
			t.Errorf("container %s must not change", untouched)
		}
	}
	if got := pod.Annotations[annotations.InjectionStatus]; !strings.HasPrefix(got, "injected: csi mode, injector layout") {
		t.Errorf("status = %q", got)
	}
	libs := pod.Annotations[annotations.InjectedLibraries]
	if !strings.HasPrefix(libs, "injector=gcr.io/datadoghq/apm-inject:0,java=gcr.io/datadoghq/dd-lib-java-init:v1,") {
		t.Errorf("injected libraries = %q", libs)
	}
}

func TestDirectLayoutEnv(t *testing.T) {
	vf := &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{Key: "opts"}}
	tests := []struct {
		name    string
		langs   string
		env     []corev1.EnvVar
		want    map[string]string
		skipped string // reason fragment when the container is left alone
	}{
		{name: "java appends to JAVA_TOOL_OPTIONS", langs: "java", env: []corev1.EnvVar{{Name: "JAVA_TOOL_OPTIONS", Value: "-Xmx1g"}},
			want: map[string]string{"JAVA_TOOL_OPTIONS": "-Xmx1g -javaagent:/datadog-lib/dd-java-agent.jar"}},
		{name: "java sets an absent JAVA_TOOL_OPTIONS", langs: "java",
			want: map[string]string{"JAVA_TOOL_OPTIONS": "-javaagent:/datadog-lib/dd-java-agent.jar"}},
		{name: "js appends to NODE_OPTIONS", langs: "js", env: []corev1.EnvVar{{Name: "NODE_OPTIONS", Value: "--max-old-space-size=256"}},
			want: map[string]string{"NODE_OPTIONS": "--max-old-space-size=256 --require=/datadog-lib/node_modules/dd-trace/init"}},
		{name: "python prepends to PYTHONPATH", langs: "python", env: []corev1.EnvVar{{Name: "PYTHONPATH", Value: "/app/lib"}},
			want: map[string]string{"PYTHONPATH": "/datadog-lib/:/app/lib"}},
		{name: "ruby appends to RUBYOPT", langs: "ruby", env: []corev1.EnvVar{{Name: "RUBYOPT", Value: "-W0"}},
			want: map[string]string{"RUBYOPT": "-W0 -r/datadog-lib/auto_inject"}},
		{name: "dotnet sets the profiler", langs: "dotnet", want: map[string]string{
			"CORECLR_ENABLE_PROFILING": "1", "CORECLR_PROFILER": "{846F5F1C-F9AE-4B07-969E-05C26BC060D8}",
			"CORECLR_PROFILER_PATH": "/datadog-lib/Datadog.Trace.ClrProfiler.Native.so", "DD_DOTNET_TRACER_HOME": "/datadog-lib",
			"DD_TRACE_LOG_DIRECTORY": "/datadog-lib/logs"}},
		{name: "dotnet keeps the user's log directory", langs: "dotnet", env: []corev1.EnvVar{{Name: "DD_TRACE_LOG_DIRECTORY", Value: "/var/log/dd"}},
			want: map[string]string{"DD_TRACE_LOG_DIRECTORY": "/var/log/dd", "CORECLR_ENABLE_PROFILING": "1"}},
		{name: "dotnet refuses another profiler", langs: "dotnet", env: []corev1.EnvVar{{Name: "CORECLR_PROFILER", Value: "{other}"}},
			skipped: `CORECLR_PROFILER is already set to "{other}"`},
		{name: "valueFrom JAVA_TOOL_OPTIONS skips the container", langs: "java", env: []corev1.EnvVar{{Name: "JAVA_TOOL_OPTIONS", ValueFrom: vf}},
			skipped: "JAVA_TOOL_OPTIONS is set with valueFrom"},
		{name: "the last definition wins", langs: "java", env: []corev1.EnvVar{{Name: "JAVA_TOOL_OPTIONS", Value: "-Xa"}, {Name: "JAVA_TOOL_OPTIONS", Value: "-Xb"}},
			want: map[string]string{"JAVA_TOOL_OPTIONS": "-Xb -javaagent:/datadog-lib/dd-java-agent.jar"}},
		{name: "already wired is not added twice", langs: "java", env: []corev1.EnvVar{{Name: "JAVA_TOOL_OPTIONS", Value: "-javaagent:/datadog-lib/dd-java-agent.jar"}},
			want: map[string]string{"JAVA_TOOL_OPTIONS": "-javaagent:/datadog-lib/dd-java-agent.jar"}},
		{name: "several languages", langs: "java,python", env: []corev1.EnvVar{{Name: "PYTHONPATH", Value: "/a"}},
			want: map[string]string{"JAVA_TOOL_OPTIONS": "-javaagent:/datadog-lib/dd-java-agent.jar", "PYTHONPATH": "/datadog-lib/:/a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newTestMutator(t, directLayout)
			pod := withAnnotations(webPod(), annotations.Libraries, tt.langs)
			pod.Spec.Containers[0].Env = tt.env
			pod.Spec.Containers = pod.Spec.Containers[:1]
			pod.Spec.InitContainers = nil
			res := m.Mutate(input(pod, ssiNamespace()))
			if tt.skipped != "" {
				if res.Outcome != OutcomeSkipped || !strings.Contains(res.Reason, tt.skipped) {
					t.Fatalf("want skipped with %q; got %s: %s", tt.skipped, res.Outcome, res.Reason)
				}
				if volume(res.Pod, VolumeName) != nil || !equality.Semantic.DeepEqual(res.Pod.Spec, pod.Spec) {
					t.Fatal("a skipped pod must be admitted unmutated (only the status annotation)")
				}
				if !strings.Contains(res.Pod.Annotations[annotations.InjectionStatus], tt.skipped) {
					t.Errorf("status must record why: %q", res.Pod.Annotations[annotations.InjectionStatus])
				}
				return
			}
			if res.Outcome != OutcomeInjected || res.Layout != config.LayoutDirect {
				t.Fatalf("got %s %s: %s", res.Outcome, res.Layout, res.Reason)
			}
			c := container(t, res.Pod, "app")
			for k, v := range tt.want {
				if got, _ := envValue(c, k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if !hasMount(c, corev1.VolumeMount{Name: VolumeName, MountPath: "/datadog-lib"}) {
				t.Errorf("mounts = %+v", c.VolumeMounts)
			}
			spec := csiSpec(t, res.Pod, VolumeName)
			if spec.Preload != "" || len(spec.Libraries) != len(strings.Split(tt.langs, ",")) {
				t.Errorf("direct layout volume = %+v", spec)
			}
			for _, l := range spec.Libraries {
				if l.Target != "" || l.Source != libref.LibrarySource {
					t.Errorf("direct layout library %+v must sit at the volume root", l)
				}
			}
		})
	}
}

func TestDirectLayoutDropsPHP(t *testing.T) {
	m := newTestMutator(t, directLayout)
	res := m.Mutate(input(withAnnotations(webPod(), annotations.Libraries, "php"), ssiNamespace()))
	if res.Outcome != OutcomeSkipped || !strings.Contains(res.Reason, "php needs the injector layout") {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	res = m.Mutate(input(withAnnotations(webPod(), annotations.Libraries, "php,ruby"), ssiNamespace()))
	spec := csiSpec(t, res.Pod, VolumeName)
	if len(spec.Libraries) != 1 || !strings.Contains(spec.Libraries[0].Image, "dd-lib-ruby-init") {
		t.Errorf("libraries = %+v", spec.Libraries)
	}
}

func TestValueFromSkipsOnlyThatContainer(t *testing.T) {
	pod := webPod()
	pod.Spec.Containers[1].Env = append(pod.Spec.Containers[1].Env, corev1.EnvVar{Name: "LD_PRELOAD",
		ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{Key: "preload"}}})
	res := newTestMutator(t).Mutate(input(pod, ssiNamespace()))
	if res.Outcome != OutcomeInjected {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	if !equality.Semantic.DeepEqual(container(t, res.Pod, "worker"), &pod.Spec.Containers[1]) {
		t.Error("worker uses valueFrom for LD_PRELOAD and must be left alone")
	}
	if !strings.Contains(res.Pod.Annotations[annotations.InjectionStatus], "container worker not instrumented: LD_PRELOAD is set with valueFrom") {
		t.Errorf("status = %q", res.Pod.Annotations[annotations.InjectionStatus])
	}
	if _, ok := envValue(container(t, res.Pod, "app"), "DD_INJECT_SENDER_TYPE"); !ok {
		t.Error("app must still be instrumented")
	}
}

// TestEnvFromSkipsContainer: a variable the webhook writes may come from a ConfigMap or Secret
// through envFrom, whose value it cannot read; an env entry wins over envFrom, so writing one
// would replace the user's value. Such a container is left alone with the reason, unless the
// source's prefix cannot produce the name or env defines the variable (then it is extended).
func TestEnvFromSkipsContainer(t *testing.T) {
	injectorVars := "LD_PRELOAD, DD_INJECT_SENDER_TYPE, DD_INJECT_START_TIME may be set by envFrom"
	tests := []struct {
		name    string
		direct  bool
		langs   string
		env     []corev1.EnvVar
		envFrom []corev1.EnvFromSource
		skipped string            // reason fragment when the container is left alone
		want    map[string]string // env of the instrumented container otherwise
	}{
		{name: "injector layout, configMapRef", envFrom: []corev1.EnvFromSource{envFromConfigMap("app-env", "")},
			skipped: injectorVars + " (configMapRef app-env), whose value the webhook cannot read and would override; define them in env to have them extended"},
		{name: "injector layout, secretRef", envFrom: []corev1.EnvFromSource{envFromSecret("app-secrets", "")},
			skipped: injectorVars + " (secretRef app-secrets)"},
		{name: "injector layout, both", envFrom: []corev1.EnvFromSource{envFromConfigMap("app-env", ""), envFromSecret("app-secrets", "")},
			skipped: injectorVars + " (configMapRef app-env, secretRef app-secrets)"},
		{name: "a prefix that can produce LD_PRELOAD", envFrom: []corev1.EnvFromSource{envFromConfigMap("ld", "LD_")},
			skipped: `LD_PRELOAD may be set by envFrom (configMapRef ld with prefix "LD_")`},
		{name: "a prefix that cannot produce any variable written", envFrom: []corev1.EnvFromSource{envFromConfigMap("app-env", "APP_")},
			want: map[string]string{"LD_PRELOAD": launcherLD, "DD_INJECT_SENDER_TYPE": "k8s"}},
		{name: "env defines the variables: env wins over envFrom and is extended",
			env:     []corev1.EnvVar{{Name: "LD_PRELOAD", Value: "/lib/jemalloc.so"}, {Name: "DD_INJECT_SENDER_TYPE", Value: "k8s"}, {Name: "DD_INJECT_START_TIME", Value: "1"}},
			envFrom: []corev1.EnvFromSource{envFromConfigMap("app-env", "")},
			want:    map[string]string{"LD_PRELOAD": "/lib/jemalloc.so:" + launcherLD, "DD_INJECT_START_TIME": "1"}},
		{name: "env defines only LD_PRELOAD", env: []corev1.EnvVar{{Name: "LD_PRELOAD", Value: "/lib/jemalloc.so"}},
			envFrom: []corev1.EnvFromSource{envFromConfigMap("app-env", "")},
			skipped: "DD_INJECT_SENDER_TYPE, DD_INJECT_START_TIME may be set by envFrom (configMapRef app-env)"},
		{name: "direct java", direct: true, langs: "java", envFrom: []corev1.EnvFromSource{envFromConfigMap("jvm", "")},
			skipped: "JAVA_TOOL_OPTIONS may be set by envFrom (configMapRef jvm), whose value the webhook cannot read and would override; define it in env to have it extended"},
		{name: "direct js", direct: true, langs: "js", envFrom: []corev1.EnvFromSource{envFromSecret("node", "")}, skipped: "NODE_OPTIONS may be set by envFrom (secretRef node)"},
		{name: "direct python", direct: true, langs: "python", envFrom: []corev1.EnvFromSource{envFromConfigMap("py", "")}, skipped: "PYTHONPATH may be set by envFrom"},
		{name: "direct ruby", direct: true, langs: "ruby", envFrom: []corev1.EnvFromSource{envFromConfigMap("rb", "")}, skipped: "RUBYOPT may be set by envFrom"},
		{name: "direct dotnet", direct: true, langs: "dotnet", envFrom: []corev1.EnvFromSource{envFromConfigMap("clr", "CORECLR_")},
			skipped: "CORECLR_ENABLE_PROFILING, CORECLR_PROFILER, CORECLR_PROFILER_PATH may be set by envFrom"},
		{name: "direct java, the source's prefix cannot produce JAVA_TOOL_OPTIONS", direct: true, langs: "java",
			envFrom: []corev1.EnvFromSource{envFromConfigMap("py", "PYTHON")},
			want:    map[string]string{"JAVA_TOOL_OPTIONS": "-javaagent:/datadog-lib/dd-java-agent.jar"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newTestMutator(t)
			pod := webPod()
			if tt.direct {
				m = newTestMutator(t, directLayout)
				pod = withAnnotations(pod, annotations.Libraries, tt.langs)
			}
			pod.Spec.InitContainers = nil
			pod.Spec.Containers = pod.Spec.Containers[:2]
			pod.Spec.Containers[0].Env = tt.env
			pod.Spec.Containers[0].EnvFrom = tt.envFrom
			pod.Spec.Containers[1].Env = nil
			res := m.Mutate(input(pod, ssiNamespace()))
			if res.Outcome != OutcomeInjected {
				t.Fatalf("the worker has no envFrom and must be instrumented; got %s: %s", res.Outcome, res.Reason)
			}
			status := res.Pod.Annotations[annotations.InjectionStatus]
			app := container(t, res.Pod, "app")
			if tt.skipped != "" {
				if !equality.Semantic.DeepEqual(app, &pod.Spec.Containers[0]) {
					t.Errorf("app takes its environment from envFrom and must be left alone: env %+v", app.Env)
				}
				if !strings.Contains(status, "container app not instrumented: "+tt.skipped) {
					t.Errorf("status = %q, want %q", status, tt.skipped)
				}
				return
			}
			if strings.Contains(status, "not instrumented") {
				t.Errorf("status = %q", status)
			}
			for k, v := range tt.want {
				if got, _ := envValue(app, k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
		})
	}
}

// TestReservedVolumeNameTaken: a pod that already has a volume named apm-csi-libraries (and no
// status) cannot get the webhook's volume. It is left as it is; a pod the webhook would act on
// gets the reason in its status, any other pod is not touched. A copy of an instrumented pod's
// spec carries apm-csi's own volume: it is already wired and comes out unchanged.
func TestReservedVolumeNameTaken(t *testing.T) {
	userVolume := func(p *corev1.Pod) *corev1.Pod {
		p = p.DeepCopy()
		p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: VolumeName, VolumeSource: corev1.VolumeSource{
			ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "libraries"}}}})
		p.Spec.Containers[0].VolumeMounts = append(p.Spec.Containers[0].VolumeMounts, corev1.VolumeMount{Name: VolumeName, MountPath: "/usr/share/app/lib"})
		return p
	}
	// copiedSpec is an instrumented pod's spec without its annotations, as a pod made from a
	// copy of it (kubectl get -o yaml, edited) arrives.
	copiedSpec := func(t *testing.T, mode string) *corev1.Pod {
		res := newTestMutator(t).Mutate(input(withAnnotations(webPod(), annotations.InjectionMode, mode), ssiNamespace()))
		if res.Outcome != OutcomeInjected {
			t.Fatalf("setup: %s %s", res.Outcome, res.Reason)
		}
		p := res.Pod
		p.Annotations = nil
		return p
	}
	const userReason = "skipped: the pod already has a volume named apm-csi-libraries that apm-csi did not add; rename that volume to have the pod instrumented"
	tests := []struct {
		name   string
		pod    func(t *testing.T) *corev1.Pod
		ns     *corev1.Namespace
		status string // "" means ignored: no change at all
	}{
		{name: "SSI namespace", pod: func(*testing.T) *corev1.Pod { return userVolume(webPod()) }, ns: ssiNamespace(), status: userReason},
		{name: "labelled pod in a plain namespace", pod: func(*testing.T) *corev1.Pod {
			return userVolume(withLabels(webPod(), annotations.DatadogEnabled, "true"))
		}, ns: plainNamespace(), status: userReason},
		{name: "rewrite namespace", pod: func(*testing.T) *corev1.Pod { return userVolume(webPod()) },
			ns: withNSLabel(plainNamespace(), config.DefaultSSINamespaceLabel, "rewrite"), status: userReason},
		{name: "manual volume annotations", pod: func(*testing.T) *corev1.Pod {
			return userVolume(withAnnotations(withLabels(webPod(), annotations.Volumes, "enabled"), annotations.VolumePrefix+"sock", "hostdir=apm-socket; mountPath=/var/run/datadog"))
		}, ns: plainNamespace(), status: userReason},
		{name: "copy of a CSI-instrumented pod's spec: already wired, unchanged", pod: func(t *testing.T) *corev1.Pod { return copiedSpec(t, "csi") }, ns: ssiNamespace()},
		{name: "copy of an init-container-instrumented pod's spec: already wired, unchanged", pod: func(t *testing.T) *corev1.Pod { return copiedSpec(t, "init-container") }, ns: ssiNamespace()},
		{name: "user emptyDir with our name and no apm-csi init container", pod: func(*testing.T) *corev1.Pod {
			p := webPod()
			p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: VolumeName, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
			return p
		}, ns: ssiNamespace(), status: userReason},
		{name: "opted out", pod: func(*testing.T) *corev1.Pod {
			return userVolume(withLabels(webPod(), annotations.DatadogEnabled, "false"))
		}, ns: ssiNamespace()},
		{name: "not a target", pod: func(*testing.T) *corev1.Pod { return userVolume(webPod()) }, ns: plainNamespace()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := tt.pod(t)
			m := newTestMutator(t)
			res := m.Mutate(input(pod, tt.ns))
			if tt.status == "" {
				if res.Outcome != OutcomeIgnored || res.Pod != nil {
					t.Fatalf("got %s (%s), want the pod ignored", res.Outcome, res.Reason)
				}
				return
			}
			if res.Outcome != OutcomeSkipped || res.Pod == nil {
				t.Fatalf("got %s (%s), want skipped with a status", res.Outcome, res.Reason)
			}
			if got := res.Pod.Annotations[annotations.InjectionStatus]; got != tt.status {
				t.Errorf("status = %q\nwant     %q", got, tt.status)
			}
			if !equality.Semantic.DeepEqual(res.Pod.Spec, pod.Spec) {
				t.Error("the pod's spec must be left as it is")
			}
			again := m.Mutate(input(res.Pod, tt.ns))
			if again.Outcome != OutcomeIgnored || again.Pod != nil {
				t.Errorf("reinvocation: got %s (%s), want an unchanged pod", again.Outcome, again.Reason)
			}
		})
	}
}

func TestMountConflictSkipsContainer(t *testing.T) {
	pod := webPod()
	pod.Spec.Containers[0].VolumeMounts = append(pod.Spec.Containers[0].VolumeMounts, corev1.VolumeMount{Name: "logs", MountPath: "/etc/ld.so.preload"})
	res := newTestMutator(t).Mutate(input(pod, ssiNamespace()))
	if !strings.Contains(res.Reason, "container app not instrumented: it already mounts volume logs at /etc/ld.so.preload") {
		t.Errorf("reason = %q", res.Reason)
	}
}

func TestNoContainerToInstrument(t *testing.T) {
	pod := webPod()
	pod.Spec.InitContainers = nil
	pod.Spec.Containers = pod.Spec.Containers[2:] // istio-proxy only
	res := newTestMutator(t).Mutate(input(pod, ssiNamespace()))
	if res.Outcome != OutcomeSkipped || res.Pod == nil || volume(res.Pod, VolumeName) != nil {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	if got := res.Pod.Annotations[annotations.InjectionStatus]; got != "skipped: no container to instrument" {
		t.Errorf("status = %q", got)
	}
}

// TestWindowsPodSkipped: every way a pod can be pinned to Windows nodes (where the node plugin
// does not run and the Linux libraries cannot load) leaves the pod uninstrumented with the
// reason; a pod that may still land on Linux is instrumented.
func TestWindowsPodSkipped(t *testing.T) {
	osReq := func(op corev1.NodeSelectorOperator, values ...string) corev1.NodeSelectorTerm {
		return corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{{Key: corev1.LabelOSStable, Operator: op, Values: values}}}
	}
	zone := corev1.NodeSelectorRequirement{Key: corev1.LabelTopologyZone, Operator: corev1.NodeSelectorOpIn, Values: []string{"a"}}
	required := func(terms ...corev1.NodeSelectorTerm) func(*corev1.Pod) {
		return func(p *corev1.Pod) {
			p.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
				RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: terms}}}
		}
	}
	tests := []struct {
		name    string
		shape   func(*corev1.Pod)
		windows string // status fragment; "" means the pod may run on Linux and is instrumented
	}{
		{name: "spec.os windows", shape: func(p *corev1.Pod) { p.Spec.OS = &corev1.PodOS{Name: corev1.Windows} }, windows: "(spec.os.name: windows)"},
		{name: "nodeSelector windows", shape: func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{corev1.LabelOSStable: "windows"} },
			windows: "(nodeSelector kubernetes.io/os: windows)"},
		{name: "deprecated beta nodeSelector windows", shape: func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{"beta.kubernetes.io/os": "windows"} },
			windows: "(nodeSelector beta.kubernetes.io/os: windows)"},
		{name: "required affinity, one term In [windows]", shape: required(osReq(corev1.NodeSelectorOpIn, "windows")),
			windows: "(required node affinity kubernetes.io/os In [windows])"},
		{name: "required affinity, a zone term ANDed with windows", shape: required(corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{
			zone, {Key: corev1.LabelOSStable, Operator: corev1.NodeSelectorOpIn, Values: []string{"windows"}}}}),
			windows: "kubernetes.io/os In [windows]"},
		{name: "required affinity, every term windows", shape: required(osReq(corev1.NodeSelectorOpIn, "windows"), osReq(corev1.NodeSelectorOpNotIn, "linux")),
			windows: "(required node affinity kubernetes.io/os In [windows] or kubernetes.io/os NotIn [linux])"},
		{name: "nodeSelector linux", shape: func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{corev1.LabelOSStable: "linux"} }},
		{name: "required affinity, one term linux and one windows: not Windows-only",
			shape: required(osReq(corev1.NodeSelectorOpIn, "linux"), osReq(corev1.NodeSelectorOpIn, "windows"))},
		{name: "required affinity, one term windows and one without an OS: not Windows-only",
			shape: required(osReq(corev1.NodeSelectorOpIn, "windows"), corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{zone}})},
		{name: "required affinity In [linux, windows]", shape: required(osReq(corev1.NodeSelectorOpIn, "linux", "windows"))},
		{name: "preferred windows affinity only", shape: func(p *corev1.Pod) {
			p.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{PreferredDuringSchedulingIgnoredDuringExecution: []corev1.PreferredSchedulingTerm{
				{Weight: 1, Preference: osReq(corev1.NodeSelectorOpIn, "windows")}}}}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := webPod()
			tt.shape(pod)
			res := newTestMutator(t).Mutate(input(pod, ssiNamespace()))
			if tt.windows == "" {
				if res.Outcome != OutcomeInjected {
					t.Fatalf("a pod that may run on Linux must be instrumented; got %s: %s", res.Outcome, res.Reason)
				}
				return
			}
			if res.Outcome != OutcomeSkipped || res.Pod == nil || volume(res.Pod, VolumeName) != nil {
				t.Fatalf("got %s: %s", res.Outcome, res.Reason)
			}
			if !equality.Semantic.DeepEqual(res.Pod.Spec, pod.Spec) {
				t.Error("a Windows pod must keep its spec (no volume, mounts or LD_PRELOAD)")
			}
			status := res.Pod.Annotations[annotations.InjectionStatus]
			if !strings.HasPrefix(status, "skipped: Windows pods cannot load the Linux tracer libraries") || !strings.Contains(status, tt.windows) {
				t.Errorf("status = %q, want the Windows reason with %q", status, tt.windows)
			}
		})
	}
}

func TestExcludedContainersConfigurable(t *testing.T) {
	m := newTestMutator(t, func(c *config.Config) { c.ExcludedContainers = []string{"worker", "linkerd-proxy"} })
	res := m.Mutate(input(webPod(), ssiNamespace()))
	if _, ok := envValue(container(t, res.Pod, "worker"), "DD_INJECT_SENDER_TYPE"); ok {
		t.Error("worker is excluded")
	}
	if _, ok := envValue(container(t, res.Pod, "istio-proxy"), "DD_INJECT_SENDER_TYPE"); !ok {
		t.Error("istio-proxy is not in this configuration's exclusion list")
	}
}

func TestInitContainerMode(t *testing.T) {
	tests := []struct {
		name     string
		pod      *corev1.Pod
		ns       *corev1.Namespace
		cfg      func(*config.Config)
		noDriver bool
		note     string
	}{
		{name: "pod annotation", pod: withAnnotations(webPod(), annotations.InjectionMode, "init-container"), ns: ssiNamespace()},
		{name: "namespace annotation", pod: webPod(), ns: nsWith(ssiNamespace(), annotations.InjectionMode, "init-container")},
		{name: "configuration", pod: webPod(), ns: ssiNamespace(), cfg: func(c *config.Config) { c.Mode = config.ModeInitContainer }},
		{name: "driver not installed", pod: webPod(), ns: ssiNamespace(), noDriver: true, note: "CSI driver csi.apm-csi.io is not installed, fell back to init-container mode"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var opts []func(*config.Config)
			if tt.cfg != nil {
				opts = append(opts, tt.cfg)
			}
			in := input(tt.pod, tt.ns)
			in.DriverInstalled = !tt.noDriver
			res := newTestMutator(t, opts...).Mutate(in)
			if res.Outcome != OutcomeInjected || res.Mode != config.ModeInitContainer {
				t.Fatalf("got %s %s: %s", res.Outcome, res.Mode, res.Reason)
			}
			if !strings.Contains(res.Reason, tt.note) {
				t.Errorf("reason %q lacks %q", res.Reason, tt.note)
			}
			pod := res.Pod
			v := volume(pod, VolumeName)
			if v == nil || v.EmptyDir == nil {
				t.Fatalf("want emptyDir %s; volumes %+v", VolumeName, pod.Spec.Volumes)
			}
			var names []string
			for _, c := range pod.Spec.InitContainers {
				names = append(names, c.Name)
			}
			want := []string{"apm-csi-init-injector", "apm-csi-init-java", "apm-csi-init-js", "apm-csi-init-python",
				"apm-csi-init-dotnet", "apm-csi-init-ruby", "apm-csi-init-php", "migrate", "log-shipper"}
			if !slices.Equal(names, want) {
				t.Fatalf("init containers = %v, want %v (ours first, so the native sidecar sees the libraries)", names, want)
			}
			inj := pod.Spec.InitContainers[0]
			if inj.Image != "gcr.io/datadoghq/apm-inject:0" || !slices.Equal(inj.Args[2:], []string{
				libref.InjectorSource, "/apm-csi/opt/datadog-packages/datadog-apm-inject", "/apm-csi/etc/ld.so.preload", libref.LauncherPath}) {
				t.Errorf("injector init container = %+v", inj)
			}
			java := pod.Spec.InitContainers[1]
			if !slices.Equal(java.Args[2:], []string{libref.LibrarySource, "/apm-csi/opt/datadog/apm/library/java"}) {
				t.Errorf("java init container args = %q", java.Args)
			}
			for _, c := range pod.Spec.InitContainers[:7] {
				sc := c.SecurityContext
				if sc == nil || !*sc.RunAsNonRoot || *sc.AllowPrivilegeEscalation || sc.Capabilities == nil ||
					!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || sc.SeccompProfile == nil ||
					sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
					t.Errorf("%s security context is not restricted-compatible: %+v", c.Name, sc)
				}
				if c.Resources.Requests.Memory().IsZero() || c.Resources.Requests.Cpu().IsZero() {
					t.Errorf("%s has no resource requests", c.Name)
				}
			}
			// Containers mount the emptyDir with the same subPaths as the CSI volume.
			app := container(t, pod, "app")
			if !hasMount(app, corev1.VolumeMount{Name: VolumeName, MountPath: "/etc/ld.so.preload", SubPath: "etc/ld.so.preload", ReadOnly: true}) {
				t.Errorf("app mounts = %+v", app.VolumeMounts)
			}
		})
	}
}

func TestInvalidModeIsAnSSIError(t *testing.T) {
	res := newTestMutator(t).Mutate(input(withAnnotations(webPod(), annotations.InjectionMode, "sidecar"), ssiNamespace()))
	if res.Outcome != OutcomeError || !strings.Contains(res.Reason, `unknown injection mode "sidecar"`) {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	if !equality.Semantic.DeepEqual(res.Pod.Spec, webPod().Spec) {
		t.Error("an SSI error must admit the pod unmutated")
	}
	if len(res.Warnings) == 0 {
		t.Error("an SSI error must warn the client")
	}
}

func TestLibrarySelection(t *testing.T) {
	tests := []struct {
		name  string
		pod   *corev1.Pod
		ns    *corev1.Namespace
		cfg   func(*config.Config)
		want  []string // images, in volume order after the injector
		error string
	}{
		{name: "configuration default: every language", pod: webPod(), ns: ssiNamespace(), want: []string{
			"gcr.io/datadoghq/dd-lib-java-init:v1", "gcr.io/datadoghq/dd-lib-js-init:v5", "gcr.io/datadoghq/dd-lib-python-init:v3",
			"gcr.io/datadoghq/dd-lib-dotnet-init:v3", "gcr.io/datadoghq/dd-lib-ruby-init:v2", "gcr.io/datadoghq/dd-lib-php-init:v1"}},
		{name: "configured languages, registry and custom image", pod: webPod(), ns: ssiNamespace(), cfg: func(c *config.Config) {
			c.Registry = "registry.example.com/mirror"
			c.Languages = []config.Language{{Name: "python", Version: "v3.2.0"}, {Name: "java", Image: "registry.example.com/java-tracer:7"}}
		}, want: []string{"registry.example.com/java-tracer:7", "registry.example.com/mirror/dd-lib-python-init:v3.2.0"}},
		{name: "Datadog per-language versions", pod: withAnnotations(webPod(), annotations.DatadogVersion("java"), "v1.45.0", annotations.DatadogVersion("js"), "v5.30.0"),
			ns: ssiNamespace(), want: []string{"gcr.io/datadoghq/dd-lib-java-init:v1.45.0", "gcr.io/datadoghq/dd-lib-js-init:v5.30.0"}},
		{name: "Datadog custom image wins over version", pod: withAnnotations(webPod(), annotations.DatadogVersion("java"), "v1.45.0",
			annotations.DatadogCustomImage("java"), "registry.example.com/dd-java@sha256:"+strings.Repeat("a", 64)),
			ns: ssiNamespace(), want: []string{"registry.example.com/dd-java@sha256:" + strings.Repeat("a", 64)}},
		{name: "Datadog all-lib.version", pod: withAnnotations(webPod(), annotations.DatadogAllVersion, "latest"), ns: ssiNamespace(),
			want: []string{"gcr.io/datadoghq/dd-lib-java-init:latest", "gcr.io/datadoghq/dd-lib-js-init:latest", "gcr.io/datadoghq/dd-lib-python-init:latest",
				"gcr.io/datadoghq/dd-lib-dotnet-init:latest", "gcr.io/datadoghq/dd-lib-ruby-init:latest", "gcr.io/datadoghq/dd-lib-php-init:latest"}},
		{name: "per-language wins over all-lib", pod: withAnnotations(webPod(), annotations.DatadogAllVersion, "latest", annotations.DatadogVersion("ruby"), "v2.1.0"),
			ns: ssiNamespace(), want: []string{"gcr.io/datadoghq/dd-lib-ruby-init:v2.1.0"}},
		{name: "apm-csi.io/libraries on the pod", pod: withAnnotations(webPod(), annotations.Libraries, "python:v3.1.0, java=registry.example.com/j:1"),
			ns: ssiNamespace(), want: []string{"registry.example.com/j:1", "gcr.io/datadoghq/dd-lib-python-init:v3.1.0"}},
		{name: "namespace default", pod: webPod(), ns: nsWith(ssiNamespace(), annotations.Libraries, "js:v5.1.0"),
			want: []string{"gcr.io/datadoghq/dd-lib-js-init:v5.1.0"}},
		{name: "pod wins over namespace", pod: withAnnotations(webPod(), annotations.DatadogVersion("dotnet"), "v3.5.0"), ns: nsWith(ssiNamespace(), annotations.Libraries, "js"),
			want: []string{"gcr.io/datadoghq/dd-lib-dotnet-init:v3.5.0"}},
		{name: "bad version", pod: withAnnotations(webPod(), annotations.DatadogVersion("java"), "v1 beta"), ns: ssiNamespace(),
			error: `annotation admission.datadoghq.com/java-lib.version: invalid version "v1 beta"`},
		{name: "unsupported language", pod: withAnnotations(webPod(), annotations.DatadogVersion("go"), "v1"), ns: ssiNamespace(),
			error: `"go" is not a supported language`},
		{name: "bad custom image", pod: withAnnotations(webPod(), annotations.DatadogCustomImage("java"), "registry.example.com/java"), ns: ssiNamespace(),
			error: "names no tag or digest"},
		{name: "language chosen twice", pod: withAnnotations(webPod(), annotations.DatadogVersion("java"), "v1", annotations.Libraries, "java:v2"), ns: ssiNamespace(),
			error: "language java is chosen twice"},
		{name: "bad namespace default", pod: webPod(), ns: nsWith(ssiNamespace(), annotations.Libraries, "cobol"), error: `unknown language "cobol"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var opts []func(*config.Config)
			if tt.cfg != nil {
				opts = append(opts, tt.cfg)
			}
			res := newTestMutator(t, opts...).Mutate(input(tt.pod, tt.ns))
			if tt.error != "" {
				if res.Outcome != OutcomeError || !strings.Contains(res.Reason, tt.error) {
					t.Fatalf("want error %q; got %s: %s", tt.error, res.Outcome, res.Reason)
				}
				if volume(res.Pod, VolumeName) != nil {
					t.Error("SSI errors admit the pod uninstrumented")
				}
				return
			}
			spec := csiSpec(t, res.Pod, VolumeName)
			var got []string
			for _, l := range spec.Libraries[1:] {
				got = append(got, l.Image)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("images\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestContainerLanguages(t *testing.T) {
	pod := withAnnotations(webPod(), annotations.ContainerLanguages, "app=java,python; worker=js")
	res := newTestMutator(t).Mutate(input(pod, ssiNamespace()))
	if res.Outcome != OutcomeInjected {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	spec := csiSpec(t, res.Pod, VolumeName)
	var targets []string
	for _, l := range spec.Libraries {
		targets = append(targets, l.Target)
	}
	if want := []string{libref.InjectorTarget, "opt/datadog/apm/library/java", "opt/datadog/apm/library/js", "opt/datadog/apm/library/python"}; !slices.Equal(targets, want) {
		t.Errorf("the volume holds only the languages used: %v, want %v", targets, want)
	}
	app := container(t, res.Pod, "app")
	for _, want := range []corev1.VolumeMount{
		{Name: VolumeName, MountPath: "/opt/datadog/apm/library/java", SubPath: "opt/datadog/apm/library/java"},
		{Name: VolumeName, MountPath: "/opt/datadog/apm/library/python", SubPath: "opt/datadog/apm/library/python"},
	} {
		if !hasMount(app, want) {
			t.Errorf("app lacks %+v", want)
		}
	}
	worker := container(t, res.Pod, "worker")
	if slices.ContainsFunc(worker.VolumeMounts, func(m corev1.VolumeMount) bool { return strings.HasSuffix(m.MountPath, "/java") }) {
		t.Error("worker must see only js")
	}
	if _, ok := envValue(container(t, res.Pod, "log-shipper"), "LD_PRELOAD"); ok {
		t.Error("a container not listed gets no language")
	}

	for _, tt := range []struct{ value, err string }{
		{"db=java", "names container db, which the pod does not have"},
		{"app=java", ""},
		{"app=cobol", `unknown language "cobol"`},
	} {
		res := newTestMutator(t).Mutate(input(withAnnotations(webPod(), annotations.ContainerLanguages, tt.value, annotations.Libraries, "java"), ssiNamespace()))
		if tt.err == "" {
			if res.Outcome != OutcomeInjected {
				t.Errorf("%q: got %s: %s", tt.value, res.Outcome, res.Reason)
			}
			continue
		}
		if res.Outcome != OutcomeError || !strings.Contains(res.Reason, tt.err) {
			t.Errorf("%q: want error %q, got %s: %s", tt.value, tt.err, res.Outcome, res.Reason)
		}
	}
	res = newTestMutator(t).Mutate(input(withAnnotations(webPod(), annotations.ContainerLanguages, "app=ruby", annotations.Libraries, "java"), ssiNamespace()))
	if res.Outcome != OutcomeError || !strings.Contains(res.Reason, "ruby is not among the pod's libraries (java)") {
		t.Errorf("got %s: %s", res.Outcome, res.Reason)
	}
}

func TestManyContainers(t *testing.T) {
	res := newTestMutator(t).Mutate(input(manyContainersPod(200), ssiNamespace()))
	if res.Outcome != OutcomeInjected {
		t.Fatalf("got %s", res.Outcome)
	}
	for i := range res.Pod.Spec.Containers {
		c := &res.Pod.Spec.Containers[i]
		if v, _ := envValue(c, "LD_PRELOAD"); !strings.HasSuffix(v, ":"+launcherLD) {
			t.Fatalf("%s LD_PRELOAD = %q", c.Name, v)
		}
	}
	if n := len(res.Pod.Annotations[annotations.InjectionStatus]); n > maxReason+len("injected: ...") {
		t.Errorf("status annotation is %d bytes; it must stay bounded", n)
	}
	if n := len(res.Pod.Spec.Volumes); n != 2 {
		t.Errorf("one volume for all containers; pod has %d volumes", n)
	}
}

// TestReinvocation: whatever the webhook produced, calling it again on its own output (as the
// API server does with reinvocationPolicy IfNeeded) changes nothing; and the same input always
// gives the same pod.
func TestReinvocation(t *testing.T) {
	cases := map[string]Input{
		"csi":            input(webPod(), ssiNamespace()),
		"direct":         input(withAnnotations(webPod(), annotations.Libraries, "java,python"), ssiNamespace()),
		"init-container": input(withAnnotations(webPod(), annotations.InjectionMode, "init-container"), ssiNamespace()),
		"rewrite":        input(datadogInjectedPod(), ssiNamespace()),
		"otel":           input(otelInjectedPod(), ssiNamespace()),
		"skipped":        input(withAnnotations(webPod(), annotations.ContainerLanguages, "istio-proxy=java"), ssiNamespace()),
		"error":          input(withAnnotations(webPod(), annotations.InjectionMode, "x"), ssiNamespace()),
		"manual":         input(withAnnotations(webPod(), annotations.VolumePrefix+"t", "libraries=java; mountPath=/dd"), plainNamespace()),
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			m := newTestMutator(t)
			if name == "direct" {
				m = newTestMutator(t, directLayout)
			}
			first := m.Mutate(in)
			if first.Pod == nil {
				t.Fatalf("first pass changed nothing: %s %s", first.Outcome, first.Reason)
			}
			again := m.Mutate(in)
			if !equality.Semantic.DeepEqual(first.Pod, again.Pod) {
				t.Fatal("the same input gave different pods")
			}
			second := m.Mutate(Input{Pod: first.Pod, Namespace: in.Namespace, DriverInstalled: true, Now: testNow.Add(5)})
			if second.Outcome != OutcomeIgnored || second.Pod != nil {
				t.Fatalf("reinvocation: got %s (%s), want an unchanged pod", second.Outcome, second.Reason)
			}
		})
	}
}
