package configreload

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/test/eventually"
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
	eventually.Require(b, ctx, 30*time.Second, 10*time.Millisecond, "the first reload after the watch is set up", func(context.Context) error {
		if got, want := s.Hash(), configreloadtest.Hash(t, javaV2); got != want {
			m.Update(t, javaV2)
			return fmt.Errorf("config hash %s in force, want %s", got, want)
		}
		return nil
	})
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
