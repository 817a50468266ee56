package nodeplugin

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// benchmarkPublish measures NodePublishVolume over the real gRPC server and real mounts; the
// matching unpublish runs with the timer stopped. Besides the mean (ns/op) it reports the
// median, 90th and 99th percentile of the publish calls.
func benchmarkPublish(b *testing.B, attrs map[string]string, readonly bool) {
	p := startPlugin(b)
	durations := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		id := fmt.Sprintf("csi-%d", i)
		target := p.Target(fmt.Sprintf("pod-%d", i), "v")
		b.StartTimer()
		start := time.Now()
		if err := p.Publish(id, target, attrs, readonly); err != nil {
			b.Fatal(err)
		}
		durations = append(durations, time.Since(start))
		b.StopTimer()
		if err := p.Unpublish(id, target); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	slices.Sort(durations)
	b.ReportMetric(float64(durations[len(durations)/2].Nanoseconds()), "median-ns/publish")
	b.ReportMetric(float64(durations[len(durations)*9/10].Nanoseconds()), "p90-ns/publish")
	b.ReportMetric(float64(durations[len(durations)*99/100].Nanoseconds()), "p99-ns/publish")
}

func BenchmarkNodePublishHostDir(b *testing.B) {
	benchmarkPublish(b, nodeplugintest.Ephemeral(hostdirData, "bench"), false)
}

func BenchmarkNodePublishHostDirReadOnly(b *testing.B) {
	benchmarkPublish(b, nodeplugintest.Ephemeral(hostdirData, "bench"), true)
}

func BenchmarkNodePublishLibraryOverlay(b *testing.B) {
	benchmarkPublish(b, nodeplugintest.Ephemeral(injectorAttrs(), "bench"), false)
}
