package admission

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// benchPod is a typical Deployment pod as the API server sends it: two containers with env,
// ports, probes, resources, and the projected service account token volume.
func benchPod() *corev1.Pod {
	pod := typicalPod()
	pod.Spec.ServiceAccountName = "web"
	pod.Spec.Volumes = []corev1.Volume{{Name: "kube-api-access-x1", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
		Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: new(int64(3607))}}},
	}}}}
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		for j := range 10 {
			c.Env = append(c.Env, corev1.EnvVar{Name: fmt.Sprintf("SETTING_%d", j), Value: "value"})
		}
		c.Ports = []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}}
		c.Resources = corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi")},
			Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")},
		}
		c.ReadinessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("http")}}}
		c.VolumeMounts = []corev1.VolumeMount{{Name: "kube-api-access-x1", MountPath: "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true}}
	}
	return pod
}

func benchHandler(b *testing.B) *PodMutator {
	return newHandler(b, []client.Object{namespace(testNS, ssiLabels()), csiDriver()}, nil)
}

// BenchmarkHandleTypicalPod measures one admission request in-process, end to end: decode,
// namespace and CSIDriver reads, decision, patch. It reports the median and p99 latency and
// the serial rate.
func BenchmarkHandleTypicalPod(b *testing.B) {
	h := benchHandler(b)
	req := request(b, benchPod(), admissionv1.Create, nil)
	if resp := h.Handle(context.Background(), req); len(resp.Patches) == 0 {
		b.Fatal("the benchmark pod must be mutated")
	}
	var samples []time.Duration
	b.ReportAllocs()
	for b.Loop() {
		start := time.Now()
		h.Handle(context.Background(), req)
		samples = append(samples, time.Since(start))
	}
	slices.Sort(samples)
	pct := func(p float64) float64 { return float64(samples[int(p*float64(len(samples)-1))].Microseconds()) }
	b.ReportMetric(pct(0.50), "p50-µs")
	b.ReportMetric(pct(0.99), "p99-µs")
	b.ReportMetric(float64(len(samples))/b.Elapsed().Seconds(), "mutations/s")
}

// BenchmarkHandleParallel measures throughput with every CPU (GOMAXPROCS) busy.
func BenchmarkHandleParallel(b *testing.B) {
	h := benchHandler(b)
	req := request(b, benchPod(), admissionv1.Create, nil)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			h.Handle(context.Background(), req)
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "mutations/s")
}
