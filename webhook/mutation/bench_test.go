package mutation

import (
	"fmt"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/webhook/config"
)

// BenchmarkMutate is the decision alone (no JSON, no patch) for the test suite's typical pod:
// three instrumented containers, injector layout, six languages.
func BenchmarkMutate(b *testing.B) {
	m := newTestMutator(b)
	in := input(webPod(), ssiNamespace())
	b.ReportAllocs()
	for b.Loop() {
		if res := m.Mutate(in); res.Outcome != OutcomeInjected {
			b.Fatal(res.Reason)
		}
	}
}

// BenchmarkMutateRewrite converts a Datadog-injected pod.
func BenchmarkMutateRewrite(b *testing.B) {
	m := newTestMutator(b)
	in := input(datadogInjectedPod(), ssiNamespace())
	b.ReportAllocs()
	for b.Loop() {
		if res := m.Mutate(in); res.Outcome != OutcomeRewritten {
			b.Fatal(res.Reason)
		}
	}
}

// BenchmarkMutateAutoNodes is auto mode without the CSI driver on a cluster of 5000 nodes
// (with a nodeSelector and taints to evaluate): the per-admission cost of judging every node
// the pod can be scheduled to.
func BenchmarkMutateAutoNodes(b *testing.B) {
	m := newTestMutator(b, modeCfg(config.ModeAuto))
	in := ivInput(webPod(), ssiNamespace())
	in.Pod.Spec.NodeSelector = map[string]string{"pool": "general"}
	in.Nodes = nil
	for i := range 5000 {
		pool := "general"
		if i%10 == 0 {
			pool = "gpu"
		}
		var taints []corev1.Taint
		if i%50 == 0 {
			taints = append(taints, corev1.Taint{Key: "dedicated", Value: "batch", Effect: corev1.TaintEffectNoSchedule})
		}
		in.Nodes = append(in.Nodes, testNode(fmt.Sprintf("node-%04d", i), "v1.35.2", "containerd://2.2.1", map[string]string{"pool": pool}, taints...))
	}
	b.ReportAllocs()
	for b.Loop() {
		if res := m.Mutate(in); res.Mode != config.ModeImageVolume {
			b.Fatal(res.Reason)
		}
	}
}
