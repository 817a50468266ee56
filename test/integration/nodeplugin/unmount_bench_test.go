package nodeplugin

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// BenchmarkOverlayUnmountUnderWriter: what unmounting a writable overlay whose upper dir
// lies on a disk filesystem costs while another process writes to that filesystem, as with
// project-quota writable layers in the state dir. Each iteration mounts an overlay, writes
// 64 KiB into it, and times the unmount. Arms:
//
//	sync       the default: the unmount syncs the whole upper filesystem
//	emptied    the upper dir's files removed before the unmount
//	volatile   the overlay mounted with "volatile": no sync at all
//
// each without and with a writer (1 MiB writes, a sync every 8 MiB). Reported: median and p99
// per arm, and each arm's p99 with the writer over its p99 without.
//
//	go test -run '^$' -bench OverlayUnmountUnderWriter -benchtime 200x ./test/integration/nodeplugin/
func BenchmarkOverlayUnmountUnderWriter(b *testing.B) {
	testenv.RequireRoot(b)
	root := b.TempDir()
	lower := filepath.Join(root, "lower")
	must(b, os.MkdirAll(filepath.Join(lower, "lib"), 0o755))
	must(b, os.WriteFile(filepath.Join(lower, "lib", "a.so"), []byte("library"), 0o644))
	m := mounter.New()
	data := make([]byte, 64<<10)

	run := func(arm string, n int) []time.Duration {
		var out []time.Duration
		for i := range n {
			dir := filepath.Join(root, fmt.Sprintf("%s-%d", arm, i))
			upper, work, target := filepath.Join(dir, "upper"), filepath.Join(dir, "work"), filepath.Join(dir, "mount")
			for _, d := range []string{upper, work, target} {
				must(b, os.MkdirAll(d, 0o755))
			}
			must(b, m.Overlay(target, mounter.Overlay{Lower: []string{lower}, Upper: upper, Work: work, Volatile: arm == "volatile"}))
			must(b, os.WriteFile(filepath.Join(target, "tracer.log"), data, 0o644))
			if arm == "emptied" {
				must(b, os.Remove(filepath.Join(upper, "tracer.log")))
			}
			start := time.Now()
			must(b, m.Unmount(target))
			out = append(out, time.Since(start))
			must(b, os.RemoveAll(dir))
		}
		slices.Sort(out)
		return out
	}
	arms := []string{"sync", "emptied", "volatile"}
	quiet, busy := map[string][]time.Duration{}, map[string][]time.Duration{}
	b.ResetTimer()
	for _, arm := range arms {
		quiet[arm] = run(arm, b.N)
	}
	stop := writeContinuously(b, filepath.Join(root, "writer"))
	for _, arm := range arms {
		busy[arm] = run(arm, b.N)
	}
	stop()
	b.StopTimer()
	for _, arm := range arms {
		q, w := quiet[arm], busy[arm]
		b.ReportMetric(ms(q[len(q)/2]), arm+"-median-ms")
		b.ReportMetric(ms(q[len(q)*99/100]), arm+"-p99-ms")
		b.ReportMetric(ms(w[len(w)/2]), arm+"-writer-median-ms")
		b.ReportMetric(ms(w[len(w)*99/100]), arm+"-writer-p99-ms")
		b.ReportMetric(float64(w[len(w)*99/100])/float64(q[len(q)*99/100]), arm+"-writer/quiet-p99-x")
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// writeContinuously writes to a file in dir until the returned function is called.
func writeContinuously(b *testing.B, dir string) func() {
	must(b, os.MkdirAll(dir, 0o755))
	f, err := os.Create(filepath.Join(dir, "data"))
	must(b, err)
	done := make(chan struct{})
	var wg sync.WaitGroup
	var writeErr error // the error that stopped the writer, read after wg.Wait
	wg.Go(func() {
		buf := make([]byte, 1<<20)
		for i := 1; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			if writeErr = writeStep(f, buf, i); writeErr != nil {
				return
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
		if writeErr != nil {
			b.Errorf("the writer stopped early, so some runs had no writer: %v", writeErr)
		}
		if err := f.Close(); err != nil {
			b.Error(err)
		}
	}
}

// writeStep is the writer's i-th step: a write of buf, a sync every 8 steps, and back to an
// empty file every 64.
func writeStep(f *os.File, buf []byte, i int) error {
	if _, err := f.Write(buf); err != nil {
		return err
	}
	if i%8 == 0 {
		if err := f.Sync(); err != nil {
			return err
		}
	}
	if i%64 == 0 {
		if err := f.Truncate(0); err != nil {
			return err
		}
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return err
		}
	}
	return nil
}
