package webhook_test

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/apm-csi/apm-csi/webhook/annotations"
)

// BenchmarkPodCreate measures pod-create latency through the real API server with the webhook
// mutating (SSI namespace, CSI mode, default configuration) against the same create in a
// namespace the selectors exclude, alternating the two in one run so that both see the same
// machine load. It reports both medians and p99s and their ratio.
func BenchmarkPodCreate(b *testing.B) {
	h := startHarness(b)
	h.setDriver(b, true)
	h.namespace(b, "bench-ssi", map[string]string{"apm-csi.io/ssi": "enabled"}, nil)
	h.namespace(b, "bench-plain", nil, nil)
	ctx := context.Background()

	var mutated, excluded []time.Duration
	timed := func(ns string, i int) time.Duration {
		p := pod(ns, fmt.Sprintf("p%d", i), nil, nil)
		start := time.Now()
		if err := h.client.Create(ctx, p); err != nil {
			b.Fatal(err)
		}
		return time.Since(start)
	}
	// Warm up connections and caches outside the measurement.
	for i := range 20 {
		timed("bench-ssi", -1-i)
		timed("bench-plain", -1-i)
	}
	i := 0
	for b.Loop() {
		mutated = append(mutated, timed("bench-ssi", i))
		excluded = append(excluded, timed("bench-plain", i))
		i++
	}
	b.StopTimer()

	slices.Sort(mutated)
	slices.Sort(excluded)
	reportCreateLatencies(b, mutated, excluded)
	// The API server's own view of the webhook call (round trip included).
	if sum, count := webhookCallSeconds(b, h, "ssi-namespaces.pods.apm-csi.io"); count > 0 {
		b.ReportMetric(sum/count*1000, "apiserver-webhook-call-mean-ms")
	}
	// The webhook server's view: request read, decode, handler, response write.
	if families, err := metrics.Registry.Gather(); err == nil {
		for _, f := range families {
			if f.GetName() != "controller_runtime_webhook_latency_seconds" {
				continue
			}
			var sum, count float64
			for _, m := range f.GetMetric() {
				sum += m.GetHistogram().GetSampleSum()
				count += float64(m.GetHistogram().GetSampleCount())
			}
			if count > 0 {
				b.ReportMetric(sum/count*1000, "webhook-server-mean-ms")
			}
		}
	}
	// Each iteration is two creates; ns/op would only mislead.
	b.ReportMetric(0, "ns/op")

	// The mutated side really was mutated.
	if s := statusOf(b, h, "bench-ssi", "p0"); s == "" {
		b.Fatal("the SSI namespace's pods were not mutated")
	}
	if s := statusOf(b, h, "bench-plain", "p0"); s != "" {
		b.Fatal("the excluded namespace's pods were mutated")
	}
}

func statusOf(tb testing.TB, h *harness, ns, name string) string {
	tb.Helper()
	p := pod(ns, name, nil, nil)
	if err := h.client.Get(context.Background(), client.ObjectKeyFromObject(p), p); err != nil {
		tb.Fatal(err)
	}
	return p.Annotations[annotations.InjectionStatus]
}

// webhookCallSeconds reads the API server's apiserver_admission_webhook_admission_duration_seconds
// histogram for one webhook: sum and count.
func webhookCallSeconds(tb testing.TB, h *harness, webhookName string) (sum, count float64) {
	tb.Helper()
	cs, err := kubernetes.NewForConfig(h.cfg)
	if err != nil {
		tb.Fatal(err)
	}
	raw, err := cs.RESTClient().Get().AbsPath("/metrics").DoRaw(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(raw))
	if err != nil {
		tb.Fatal(err)
	}
	for _, m := range families["apiserver_admission_webhook_admission_duration_seconds"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "name" && l.GetValue() == webhookName {
				sum += m.GetHistogram().GetSampleSum()
				count += float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return sum, count
}

// BenchmarkPodCreateAt200PerSecond creates b.N pods at a steady 200 creates/s (each create in
// its own goroutine, started every 5 ms whatever the previous ones are doing), first in an SSI
// namespace (mutated), then in an excluded one, and reports each side's median and p99 create
// latency under that load and the ratios.
func BenchmarkPodCreateAt200PerSecond(b *testing.B) {
	h := startHarness(b)
	h.setDriver(b, true)
	h.namespace(b, "rate-ssi", map[string]string{"apm-csi.io/ssi": "enabled"}, nil)
	h.namespace(b, "rate-plain", nil, nil)
	ctx := context.Background()
	for i := range 20 {
		for _, ns := range []string{"rate-ssi", "rate-plain"} {
			if err := h.client.Create(ctx, pod(ns, fmt.Sprintf("warm%d", i), nil, nil)); err != nil {
				b.Fatal(err)
			}
		}
	}
	paced := func(ns string, n int) []time.Duration {
		lat := make([]time.Duration, n)
		errs := make(chan error, n)
		var wg sync.WaitGroup
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for i := range n {
			<-tick.C
			wg.Add(1)
			go func() {
				defer wg.Done()
				start := time.Now()
				if err := h.client.Create(ctx, pod(ns, fmt.Sprintf("r%d", i), nil, nil)); err != nil {
					errs <- err
					return
				}
				lat[i] = time.Since(start)
			}()
		}
		wg.Wait()
		close(errs)
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
		slices.Sort(lat)
		return lat
	}
	b.ResetTimer()
	mutated := paced("rate-ssi", b.N)
	excluded := paced("rate-plain", b.N)
	b.StopTimer()
	reportCreateLatencies(b, mutated, excluded)
	b.ReportMetric(float64(percentile(mutated, 0.99))/float64(percentile(excluded, 0.99)), "p99-ratio")
	b.ReportMetric(0, "ns/op")
	if s := statusOf(b, h, "rate-ssi", "r0"); s == "" {
		b.Fatal("the SSI namespace's pods were not mutated")
	}
}

// percentile of sorted latencies.
func percentile(s []time.Duration, p float64) time.Duration { return s[int(p*float64(len(s)-1))] }

// reportCreateLatencies reports the medians and p99s of sorted create latencies in the
// webhook's namespace and in one it never sees, and the ratio of the medians.
func reportCreateLatencies(b *testing.B, mutated, excluded []time.Duration) {
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(percentile(mutated, 0.5)), "mutated-p50-ms")
	b.ReportMetric(ms(percentile(excluded, 0.5)), "excluded-p50-ms")
	b.ReportMetric(ms(percentile(mutated, 0.99)), "mutated-p99-ms")
	b.ReportMetric(ms(percentile(excluded, 0.99)), "excluded-p99-ms")
	b.ReportMetric(float64(percentile(mutated, 0.5))/float64(percentile(excluded, 0.5)), "p50-ratio")
}
