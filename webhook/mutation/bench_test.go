package mutation

import "testing"

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
