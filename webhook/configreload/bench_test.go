package configreload

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/webhook/configreload/configreloadtest"
)

// BenchmarkReloadAfterSwap: from kubelet's ..data swap to the new configuration in force,
// through the directory watch (the periodic re-read is set out of reach).
func BenchmarkReloadAfterSwap(b *testing.B) {
	t := b
	m := configreloadtest.MountConfigMap(t, javaV1)
	s, err := Load(m.Path(), "apm-csi-system")
	if err != nil {
		b.Fatal(err)
	}
	s.Interval = time.Hour
	s.Log = slog.New(slog.DiscardHandler)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Start(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			b.Error(err)
		}
	}()
	// Until the watch is set up.
	for s.Hash() != configreloadtest.Hash(t, javaV2) {
		m.Update(t, javaV2)
		time.Sleep(10 * time.Millisecond)
	}
	versions := [2]string{javaV1, javaV2}
	hashes := [2]string{configreloadtest.Hash(t, javaV1), configreloadtest.Hash(t, javaV2)}
	var lat []time.Duration
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		start := time.Now()
		m.Update(t, versions[i%2])
		for s.Hash() != hashes[i%2] {
			time.Sleep(50 * time.Microsecond)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	if len(lat) > 0 {
		sortDurations(lat)
		b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "median-µs")
	}
}

func sortDurations(d []time.Duration) {
	for i := 1; i < len(d); i++ {
		for j := i; j > 0 && d[j] < d[j-1]; j-- {
			d[j], d[j-1] = d[j-1], d[j]
		}
	}
}
