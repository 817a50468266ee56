package mutation

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/webhook/annotations"
)

// expectRewrite checks that the only differences between before and after are: the foreign
// init containers and emptyDirs are gone, the CSI volume is there, the mounts of the emptyDirs
// point at it with the given subPaths, and the status annotations were added.
func expectRewrite(t *testing.T, before, after *corev1.Pod, removedInits []string, subPaths map[string]string) {
	t.Helper()
	want := before.DeepCopy()
	var inits []corev1.Container
	for _, c := range want.Spec.InitContainers {
		keep := true
		for _, r := range removedInits {
			keep = keep && c.Name != r
		}
		if keep {
			inits = append(inits, c)
		}
	}
	want.Spec.InitContainers = inits
	var vols []corev1.Volume
	for _, v := range want.Spec.Volumes {
		if !isForeignVolume(v) {
			vols = append(vols, v)
		}
	}
	want.Spec.Volumes = append(vols, *volume(after, VolumeName))
	for _, cs := range [][]corev1.Container{want.Spec.InitContainers, want.Spec.Containers} {
		for i := range cs {
			for j := range cs[i].VolumeMounts {
				vm := &cs[i].VolumeMounts[j]
				if sub, ok := subPaths[vm.Name+":"+vm.MountPath]; ok {
					vm.Name, vm.SubPath = VolumeName, sub
				}
			}
		}
	}
	want.Annotations = after.Annotations
	if !equality.Semantic.DeepEqual(want, after) {
		t.Errorf("rewritten pod differs from the expected one:\n got %+v\nwant %+v", after.Spec, want.Spec)
	}
}

func TestRewriteDatadogInjectorLayout(t *testing.T) {
	before := datadogInjectedPod()
	res := newTestMutator(t).Mutate(input(before, ssiNamespace()))
	if res.Outcome != OutcomeRewritten {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	spec := csiSpec(t, res.Pod, VolumeName)
	want := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Type: volumeattrs.TypeLibrary, Preload: libref.LauncherPath, Libraries: []volumeattrs.Library{
		{Image: "gcr.io/datadoghq/apm-inject:0.40.0", Source: libref.InjectorSource, Target: libref.InjectorTarget},
		{Image: "gcr.io/datadoghq/dd-lib-java-init:v1.45.0", Source: libref.LibrarySource, Target: "opt/datadog/apm/library/java"},
		{Image: "gcr.io/datadoghq/dd-lib-python-init:v3.1.0", Source: libref.LibrarySource, Target: "opt/datadog/apm/library/python"},
	}}
	if !reflect.DeepEqual(spec, want) {
		t.Errorf("spec\n got %+v\nwant %+v", spec, want)
	}
	expectRewrite(t, before, res.Pod, []string{DatadogInjectorInit, "datadog-lib-java-init", "datadog-lib-python-init"}, map[string]string{
		DatadogVolume + ":/opt/datadog-packages/datadog-apm-inject": "opt/datadog-packages/datadog-apm-inject",
		DatadogEtcVolume + ":/etc/ld.so.preload":                    "etc/ld.so.preload",
		DatadogVolume + ":/opt/datadog/apm/library":                 "opt/datadog/apm/library",
	})
	if got := res.Pod.Annotations[annotations.InjectedLibraries]; got != "injector=gcr.io/datadoghq/apm-inject:0.40.0,java=gcr.io/datadoghq/dd-lib-java-init:v1.45.0,python=gcr.io/datadoghq/dd-lib-python-init:v3.1.0" {
		t.Errorf("libraries = %q", got)
	}
	if !strings.HasPrefix(res.Pod.Annotations[annotations.InjectionStatus], "injected: csi mode, replaced init containers datadog-init-apm-inject, datadog-lib-java-init, datadog-lib-python-init") {
		t.Errorf("status = %q", res.Pod.Annotations[annotations.InjectionStatus])
	}
}

func TestRewriteDatadogLegacyLayout(t *testing.T) {
	before := withLabels(webPod(), annotations.DatadogEnabled, "true")
	before.Spec.InitContainers = append(before.Spec.InitContainers,
		corev1.Container{Name: "datadog-lib-js-init", Image: "gcr.io/datadoghq/dd-lib-js-init:v5", Command: []string{"sh", "copy-lib.sh", "/datadog-lib"},
			VolumeMounts: []corev1.VolumeMount{{Name: DatadogVolume, MountPath: "/datadog-lib"}}},
		corev1.Container{Name: "datadog-lib-ruby-init", Image: "gcr.io/datadoghq/dd-lib-ruby-init:v2", Command: []string{"sh", "copy-lib.sh", "/datadog-lib"},
			VolumeMounts: []corev1.VolumeMount{{Name: DatadogVolume, MountPath: "/datadog-lib"}}},
	)
	before.Spec.Volumes = append(before.Spec.Volumes, corev1.Volume{Name: DatadogVolume, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
	worker := &before.Spec.Containers[1]
	worker.VolumeMounts = append(worker.VolumeMounts, corev1.VolumeMount{Name: DatadogVolume, MountPath: "/datadog-lib"})
	worker.Env[0].Value += " --require=/datadog-lib/node_modules/dd-trace/init"

	res := newTestMutator(t).Mutate(input(before, plainNamespace()))
	if res.Outcome != OutcomeRewritten {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	spec := csiSpec(t, res.Pod, VolumeName)
	if spec.Preload != "" || len(spec.Libraries) != 2 || spec.Libraries[0].Target != "" || spec.Libraries[1].Target != "" {
		t.Errorf("legacy layout: both libraries merge at the volume root, no preload: %+v", spec)
	}
	expectRewrite(t, before, res.Pod, []string{"datadog-lib-js-init", "datadog-lib-ruby-init"}, map[string]string{DatadogVolume + ":/datadog-lib": ""})
}

func TestRewriteOpenTelemetry(t *testing.T) {
	before := otelInjectedPod()
	res := newTestMutator(t).Mutate(input(before, ssiNamespace()))
	if res.Outcome != OutcomeRewritten {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	spec := csiSpec(t, res.Pod, VolumeName)
	want := []volumeattrs.Library{
		{Image: "ghcr.io/open-telemetry/opentelemetry-operator/autoinstrumentation-java:2.10.0", Source: "/", Target: OTelPrefix + "java"},
		{Image: "ghcr.io/open-telemetry/opentelemetry-operator/autoinstrumentation-nodejs:0.53.0", Source: "/autoinstrumentation", Target: OTelPrefix + "nodejs"},
	}
	if !reflect.DeepEqual(spec.Libraries, want) {
		t.Errorf("libraries\n got %+v\nwant %+v", spec.Libraries, want)
	}
	expectRewrite(t, before, res.Pod, []string{OTelPrefix + "java", OTelPrefix + "nodejs"}, map[string]string{
		OTelPrefix + "java:/otel-auto-instrumentation-java":     OTelPrefix + "java",
		OTelPrefix + "nodejs:/otel-auto-instrumentation-nodejs": OTelPrefix + "nodejs",
	})
	if got := res.Pod.Annotations[annotations.InjectedLibraries]; !strings.Contains(got, "otel-java=ghcr.io/") {
		t.Errorf("libraries = %q", got)
	}
}

func TestRewriteRefusals(t *testing.T) {
	tests := []struct {
		name   string
		modify func(*corev1.Pod)
		reason string
	}{
		{name: "shell command the webhook cannot follow", modify: func(p *corev1.Pod) {
			c := findContainer(p, OTelPrefix+"nodejs")
			c.Command = []string{"/bin/sh", "-c", "cp -r /autoinstrumentation/. /otel-auto-instrumentation-nodejs && echo done"}
		}, reason: "init container opentelemetry-auto-instrumentation-nodejs: its command"},
		{name: "copy outside the emptyDir", modify: func(p *corev1.Pod) {
			c := findContainer(p, OTelPrefix+"nodejs")
			c.Command = []string{"cp", "-r", "/autoinstrumentation/.", "/elsewhere"}
		}, reason: "it copies to /elsewhere, which is not in a replaced emptyDir"},
		{name: "subPathExpr mount", modify: func(p *corev1.Pod) {
			p.Spec.Containers[0].VolumeMounts[1].SubPathExpr = "$(POD_NAME)"
		}, reason: "subPathExpr"},
		{name: "emptyDir nobody fills", modify: func(p *corev1.Pod) {
			p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: OTelPrefix + "python", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
		}, reason: "emptyDir opentelemetry-auto-instrumentation-python is filled by no init container"},
		{name: "cp option not understood", modify: func(p *corev1.Pod) {
			c := findContainer(p, OTelPrefix+"java")
			c.Command = []string{"cp", "--parents", "/javaagent.jar", "/otel-auto-instrumentation-java/"}
		}, reason: "cp option --parents is not understood"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := otelInjectedPod()
			tt.modify(pod)
			res := newTestMutator(t).Mutate(input(pod, ssiNamespace()))
			if res.Outcome != OutcomeSkipped || !strings.Contains(res.Reason, tt.reason) {
				t.Fatalf("want skipped with %q; got %s: %s", tt.reason, res.Outcome, res.Reason)
			}
			if !equality.Semantic.DeepEqual(res.Pod.Spec, pod.Spec) {
				t.Error("a pod that cannot be rewritten must keep its init-container injection untouched")
			}
		})
	}
}

func TestRewriteNotInInitContainerMode(t *testing.T) {
	in := input(datadogInjectedPod(), ssiNamespace())
	in.DriverInstalled = false
	res := newTestMutator(t).Mutate(in)
	if res.Outcome != OutcomeSkipped || !strings.Contains(res.Reason, "already instrumented by init containers datadog-init-apm-inject") {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	if !equality.Semantic.DeepEqual(res.Pod.Spec, in.Pod.Spec) {
		t.Error("init-container mode keeps the existing injection")
	}
}

func TestLookalikeInitContainerIsNotForeign(t *testing.T) {
	pod := webPod()
	pod.Spec.InitContainers = append(pod.Spec.InitContainers, corev1.Container{Name: "datadog-lib-java-init", Image: "registry.example.com/mine:1"})
	res := newTestMutator(t).Mutate(input(pod, ssiNamespace()))
	if res.Outcome != OutcomeInjected || findContainer(res.Pod, "datadog-lib-java-init") == nil {
		t.Fatalf("an init container that mounts no injection emptyDir is the user's own: got %s: %s", res.Outcome, res.Reason)
	}
}

func TestParseCopy(t *testing.T) {
	tests := []struct {
		argv     []string
		src, dst string
		err      string
	}{
		{argv: []string{"cp", "-r", "/autoinstrumentation/.", "/otel"}, src: "/autoinstrumentation", dst: "/otel"},
		{argv: []string{"cp", "/javaagent.jar", "/otel/javaagent.jar"}, src: "/", dst: "/otel"},
		{argv: []string{"cp", "/javaagent.jar", "/otel"}, src: "/", dst: "/otel"},
		{argv: []string{"/bin/cp", "-a", "/./", "/otel/"}, src: "/", dst: "/otel"},
		{argv: []string{"cp", "-r", "/a/b/.", "/otel/sub"}, src: "/a/b", dst: "/otel/sub"},
		{argv: []string{"sh", "-c", "cp a b"}, err: "not a plain cp"},
		{argv: []string{"cp", "a", "/b"}, err: "not absolute"},
		{argv: []string{"cp", "/a", "/b", "/c"}, err: "one source to one destination"},
		{argv: nil, err: "not a plain cp"},
	}
	for _, tt := range tests {
		src, dst, err := parseCopy(tt.argv)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%q: err = %v, want %q", tt.argv, err, tt.err)
			}
			continue
		}
		if err != nil || src != tt.src || dst != tt.dst {
			t.Errorf("%q = %q, %q, %v; want %q, %q", tt.argv, src, dst, err, tt.src, tt.dst)
		}
	}
}

func TestRewriteSkipsImagesOutsideTheAllowlist(t *testing.T) {
	before := datadogInjectedPod()
	before.Spec.InitContainers[1].Image = "gcr.io/datadoghq-evil/dd-lib-java-init:v1.45.0"
	res := newTestMutator(t).Mutate(input(before, ssiNamespace()))
	if res.Outcome == OutcomeRewritten || !strings.Contains(res.Reason, "not in the allowed repositories") {
		t.Fatalf("got %s: %s, want the init containers kept: the node plugins would refuse the image", res.Outcome, res.Reason)
	}
}
