package mutation

import (
	"fmt"
	"reflect"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
)

// Realistic pods for the tests: what Deployments in a cluster look like at admission (no name
// yet, an owner, several containers), plus what other injectors add.

const (
	testNS     = "shop"
	systemNS   = "apm-csi-system"
	launcherLD = "/opt/datadog-packages/datadog-apm-inject/stable/inject/launcher.preload.so"
)

var testNow = time.Unix(1_700_000_000, 0)

func ssiNamespace() *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: testNS, Labels: map[string]string{config.DefaultSSINamespaceLabel: "enabled"}}}
}

func plainNamespace() *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: testNS}}
}

func nsWith(ns *corev1.Namespace, annotationsKV ...string) *corev1.Namespace {
	ns = ns.DeepCopy()
	ns.Annotations = map[string]string{}
	for i := 0; i < len(annotationsKV); i += 2 {
		ns.Annotations[annotationsKV[i]] = annotationsKV[i+1]
	}
	return ns
}

// webPod is a typical application pod: an app container with existing LD_PRELOAD and
// JAVA_TOOL_OPTIONS, a worker, a native log-shipping sidecar, a one-shot migration init
// container and an istio-proxy.
func webPod() *corev1.Pod {
	always := corev1.ContainerRestartPolicyAlways
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: "web-7d9f8-",
			Namespace:    testNS,
			Labels:       map[string]string{"app": "web"},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "web-7d9f8", UID: "rs-uid", Controller: new(true),
			}},
		},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{
				{Name: "migrate", Image: "registry.example.com/web:1.2", Command: []string{"/migrate"}},
				{Name: "log-shipper", Image: "registry.example.com/shipper:3", RestartPolicy: &always,
					VolumeMounts: []corev1.VolumeMount{{Name: "logs", MountPath: "/var/log/app"}}},
			},
			Containers: []corev1.Container{
				{
					Name: "app", Image: "registry.example.com/web:1.2",
					Env: []corev1.EnvVar{
						{Name: "LD_PRELOAD", Value: "/usr/lib/libjemalloc.so"},
						{Name: "JAVA_TOOL_OPTIONS", Value: "-Xmx512m"},
						{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
					},
					VolumeMounts: []corev1.VolumeMount{{Name: "logs", MountPath: "/var/log/app"}},
				},
				{Name: "worker", Image: "registry.example.com/worker:1.2", Env: []corev1.EnvVar{{Name: "NODE_OPTIONS", Value: "--max-old-space-size=256"}}},
				{Name: "istio-proxy", Image: "docker.io/istio/proxyv2:1.22.0", Env: []corev1.EnvVar{{Name: "LD_PRELOAD", Value: ""}}},
			},
			Volumes: []corev1.Volume{{Name: "logs", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}},
		},
	}
}

func withLabels(p *corev1.Pod, kv ...string) *corev1.Pod {
	p = p.DeepCopy()
	if p.Labels == nil {
		p.Labels = map[string]string{}
	}
	for i := 0; i < len(kv); i += 2 {
		p.Labels[kv[i]] = kv[i+1]
	}
	return p
}

func withAnnotations(p *corev1.Pod, kv ...string) *corev1.Pod {
	p = p.DeepCopy()
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	for i := 0; i < len(kv); i += 2 {
		p.Annotations[kv[i]] = kv[i+1]
	}
	return p
}

// datadogInjectedPod is webPod as the Datadog Cluster Agent's init-container injection leaves
// it in the injector layout: apm-inject and two languages.
func datadogInjectedPod() *corev1.Pod {
	p := withLabels(webPod(), annotations.DatadogEnabled, "true")
	dd := func(name, image, mountPath, subPath string) corev1.Container {
		return corev1.Container{
			Name: name, Image: image, Command: []string{"/bin/sh", "-c", "--"}, Args: []string{"cp -r /datadog-init/package/* " + mountPath},
			VolumeMounts: []corev1.VolumeMount{{Name: DatadogVolume, MountPath: mountPath, SubPath: subPath}},
		}
	}
	inject := dd(DatadogInjectorInit, "gcr.io/datadoghq/apm-inject:0.40.0", "/datadog-inject", "opt/datadog-packages/datadog-apm-inject")
	inject.VolumeMounts = append(inject.VolumeMounts, corev1.VolumeMount{Name: DatadogEtcVolume, MountPath: "/datadog-etc"})
	p.Spec.InitContainers = append([]corev1.Container{
		inject,
		dd("datadog-lib-java-init", "gcr.io/datadoghq/dd-lib-java-init:v1.45.0", "/datadog-lib", "opt/datadog/apm/library/java"),
		dd("datadog-lib-python-init", "gcr.io/datadoghq/dd-lib-python-init:v3.1.0", "/datadog-lib", "opt/datadog/apm/library/python"),
	}, p.Spec.InitContainers...)
	p.Spec.Volumes = append(p.Spec.Volumes,
		corev1.Volume{Name: DatadogVolume, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
		corev1.Volume{Name: DatadogEtcVolume, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
	)
	for i := range p.Spec.Containers[:2] {
		c := &p.Spec.Containers[i]
		c.VolumeMounts = append(c.VolumeMounts,
			corev1.VolumeMount{Name: DatadogVolume, MountPath: "/opt/datadog-packages/datadog-apm-inject", SubPath: "opt/datadog-packages/datadog-apm-inject"},
			corev1.VolumeMount{Name: DatadogEtcVolume, MountPath: "/etc/ld.so.preload", SubPath: "ld.so.preload", ReadOnly: true},
			corev1.VolumeMount{Name: DatadogVolume, MountPath: "/opt/datadog/apm/library", SubPath: "opt/datadog/apm/library"},
		)
		c.Env = append(c.Env, corev1.EnvVar{Name: "DD_INJECT_SENDER_TYPE", Value: "k8s"})
	}
	return p
}

// otelInjectedPod is a pod the OpenTelemetry operator instrumented for Java and Node.js.
func otelInjectedPod() *corev1.Pod {
	p := webPod()
	p.Annotations = map[string]string{"instrumentation.opentelemetry.io/inject-java": "true"}
	otel := func(lang, image string, cmd []string) corev1.Container {
		return corev1.Container{
			Name: OTelPrefix + lang, Image: image, Command: cmd,
			VolumeMounts: []corev1.VolumeMount{{Name: OTelPrefix + lang, MountPath: "/otel-auto-instrumentation-" + lang}},
		}
	}
	p.Spec.InitContainers = append(p.Spec.InitContainers,
		otel("java", "ghcr.io/open-telemetry/opentelemetry-operator/autoinstrumentation-java:2.10.0",
			[]string{"cp", "/javaagent.jar", "/otel-auto-instrumentation-java/javaagent.jar"}),
		otel("nodejs", "ghcr.io/open-telemetry/opentelemetry-operator/autoinstrumentation-nodejs:0.53.0",
			[]string{"cp", "-r", "/autoinstrumentation/.", "/otel-auto-instrumentation-nodejs"}),
	)
	p.Spec.Volumes = append(p.Spec.Volumes,
		corev1.Volume{Name: OTelPrefix + "java", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{SizeLimit: nil}}},
		corev1.Volume{Name: OTelPrefix + "nodejs", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
	)
	app := &p.Spec.Containers[0]
	app.VolumeMounts = append(app.VolumeMounts, corev1.VolumeMount{Name: OTelPrefix + "java", MountPath: "/otel-auto-instrumentation-java"})
	app.Env[1].Value = "-Xmx512m -javaagent:/otel-auto-instrumentation-java/javaagent.jar"
	worker := &p.Spec.Containers[1]
	worker.VolumeMounts = append(worker.VolumeMounts, corev1.VolumeMount{Name: OTelPrefix + "nodejs", MountPath: "/otel-auto-instrumentation-nodejs"})
	worker.Env[0].Value += " --require /otel-auto-instrumentation-nodejs/autoinstrumentation.js"
	return p
}

// manyContainersPod has n app containers.
func manyContainersPod(n int) *corev1.Pod {
	p := webPod()
	p.Spec.Containers = nil
	for i := range n {
		p.Spec.Containers = append(p.Spec.Containers, corev1.Container{
			Name: fmt.Sprintf("c%03d", i), Image: "registry.example.com/app:1",
			Env: []corev1.EnvVar{{Name: "LD_PRELOAD", Value: fmt.Sprintf("/lib/x%d.so", i)}},
		})
	}
	return p
}

func newTestMutator(t testing.TB, mutate ...func(*config.Config)) *Mutator {
	t.Helper()
	cfg := config.Default()
	// The custom images the tests name live there, and the OpenTelemetry init containers'
	// images are rewritten into volumes: the administrator allows them.
	cfg.AllowedRepositories = []string{"registry.example.com"}
	for _, c := range otelInjectedPod().Spec.InitContainers {
		if ref, err := libref.Parse(c.Image); err == nil {
			cfg.AllowedRepositories = append(cfg.AllowedRepositories, ref.Repository)
		}
	}
	for _, f := range mutate {
		f(cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	return New(cfg, systemNS)
}

func directLayout(c *config.Config) { c.Injector = config.Injector{} }

func input(pod *corev1.Pod, ns *corev1.Namespace) Input {
	return Input{Pod: pod, Namespace: ns, DriverInstalled: true, Now: testNow}
}

func container(t testing.TB, pod *corev1.Pod, name string) *corev1.Container {
	t.Helper()
	if c := findContainer(pod, name); c != nil {
		return c
	}
	t.Fatalf("pod has no container %s", name)
	return nil
}

func envValue(c *corev1.Container, name string) (string, bool) {
	i := lastEnv(c, name)
	if i < 0 {
		return "", false
	}
	return c.Env[i].Value, true
}

func volume(pod *corev1.Pod, name string) *corev1.Volume {
	for i := range pod.Spec.Volumes {
		if pod.Spec.Volumes[i].Name == name {
			return &pod.Spec.Volumes[i]
		}
	}
	return nil
}

// csiSpec parses the CSI volume of the pod the way the node plugin does.
func csiSpec(t testing.TB, pod *corev1.Pod, name string) *volumeattrs.Spec {
	t.Helper()
	v := volume(pod, name)
	if v == nil || v.CSI == nil {
		t.Fatalf("pod has no CSI volume %s; volumes: %+v", name, pod.Spec.Volumes)
	}
	if v.CSI.Driver != "csi.apm-csi.io" {
		t.Errorf("volume %s driver = %q", name, v.CSI.Driver)
	}
	spec, err := volumeattrs.Parse(v.CSI.VolumeAttributes)
	if err != nil {
		t.Fatalf("node plugin would reject volume %s: %v", name, err)
	}
	return spec
}

func hasMount(c *corev1.Container, want corev1.VolumeMount) bool {
	return slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return reflect.DeepEqual(m, want) })
}

// envFromConfigMap and envFromSecret are how applications commonly take their whole
// environment from a ConfigMap or Secret.
func envFromConfigMap(name, prefix string) corev1.EnvFromSource {
	return corev1.EnvFromSource{Prefix: prefix, ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: name}}}
}

func envFromSecret(name, prefix string) corev1.EnvFromSource {
	return corev1.EnvFromSource{Prefix: prefix, SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: name}}}
}
