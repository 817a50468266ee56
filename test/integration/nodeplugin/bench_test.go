package nodeplugin

import (
	"fmt"
	"slices"
	"testing"
	"time"
)

// benchmarkPublish measures NodePublishVolume over the real gRPC server and real mounts; the
// matching unpublish runs with the timer stopped. Besides the mean (ns/op) it reports the
// median and 90th percentile of the publish calls.
func benchmarkPublish(b *testing.B, attrs map[string]string, readonly bool) {
	p := startPlugin(b)
	durations := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		id := fmt.Sprintf("csi-%d", i)
		target := p.target(fmt.Sprintf("pod-%d", i), "v")
		b.StartTimer()
		start := time.Now()
		if err := p.publish(id, target, attrs, readonly); err != nil {
			b.Fatal(err)
		}
		durations = append(durations, time.Since(start))
		b.StopTimer()
		if err := p.unpublish(id, target); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	slices.Sort(durations)
	b.ReportMetric(float64(durations[len(durations)/2].Nanoseconds()), "median-ns/publish")
	b.ReportMetric(float64(durations[len(durations)*9/10].Nanoseconds()), "p90-ns/publish")
}

func BenchmarkNodePublishHostDir(b *testing.B) {
	benchmarkPublish(b, ephemeral(hostdirData, "bench"), false)
}

func BenchmarkNodePublishHostDirReadOnly(b *testing.B) {
	benchmarkPublish(b, ephemeral(hostdirData, "bench"), true)
}

func BenchmarkNodePublishLibraryOverlay(b *testing.B) {
	benchmarkPublish(b, ephemeral(injectorAttrs(), "bench"), false)
}
