package library

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// Sizes of BenchmarkWarmPathAtScale: how many of the plugin's own volumes stay published
// around the measured calls, and how many unrelated mounts the node has in the second case.
var scaleLive = []int{0, 500, 2000}

const (
	scaleUnrelated = 2000
	// scalePairs publish+unpublish pairs are measured per case: enough that the p99 is not
	// one stray sample (it is the 4th slowest).
	scalePairs = 400
	// scaleStarts start-ups are measured per case.
	scaleStarts = 9
	// scaleThroughput warm volumes are published one after another, and as many again from
	// scaleWorkers goroutines at once, with no other volume live.
	scaleThroughput = 400
	scaleWorkers    = 8
)

// BenchmarkWarmPathAtScale: a node with thousands of live volumes publishes, unpublishes and
// starts as fast as an empty one. One plugin (the real library cache, a warm writable
// injector volume of three libraries plus the preload file, as BenchmarkCacheHitPublish) is
// measured, in this one process, while the node holds:
//
//	live0, live500, live2000   that many of the plugin's own published volumes
//	ro1-live0, ro1-live2000    a read-only library volume of a single layer (an overlay of
//	                           that layer and the plugin's empty dir) with 0 and 2,000 live
//	                           volumes around it
//	unrelated2000              2,000 tmpfs mounts that are not the plugin's (and none of its own)
//	writer                     no live volume, another process-like goroutine writing to the
//	                           state dir's filesystem all the time
//
// Per case it reports the median and p99 of publish and unpublish (ms), and the ratios to
// live0 of the medians (p99 for writer), so that the figures compare within one run.
// Start-up (library store, driver and reconcile, as apm-csi-node before it answers Probe
// ready) is timed with no record and with 2,000 records and mounts: start-empty-ms,
// start-2000-ms and their ratio, and the same in CPU time (start-*-cpu-ms), which a loaded
// machine does not inflate, and in CPU time of starts that each follow a garbage collection
// (start-*-clean-cpu-ms: without the collections that the garbage of the calls before
// causes); journal-2000-bytes is the journal's size with 2,000 records. Warm publishes per
// second, one at a time and 8 at once, are publishes-per-s-sequential and -8-way.
//
//	go test -run '^$' -bench WarmPathAtScale -benchtime 1x -timeout 30m ./test/integration/library/
func BenchmarkWarmPathAtScale(b *testing.B) {
	reg := libimages.Start(b)
	p := startPlugin(b, options{registry: reg})
	vol := pushInjectorVolume(b, reg, "1.0.0")
	attrs := func(pod string) map[string]string { return nodeplugintest.Ephemeral(vol.attrs(), pod) }
	warm := p.Target("warm", "apm")
	p.MustPublish("csi-warm", warm, attrs("warm"), false)
	p.MustUnpublish("csi-warm", warm)

	// A read-only library volume of a single layer: an overlay of that layer and the
	// plugin's empty dir.
	python := vol.libs["python"]
	roAttrs := func(pod string) map[string]string {
		spec := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Libraries: []volumeattrs.Library{{Image: python.Ref}}}
		return nodeplugintest.Ephemeral(spec.Attributes(), pod)
	}
	p.MustPublish("csi-warm-ro", warm, roAttrs("warm"), true)
	p.MustUnpublish("csi-warm-ro", warm)

	type sample struct{ pub, unpub []time.Duration }
	measureWith := func(name string, attrs func(string) map[string]string, readOnly bool) sample {
		var s sample
		for i := range scalePairs {
			pod := fmt.Sprintf("m-%s-%d", name, i)
			target := p.Target(pod, "apm")
			a := attrs(pod)
			start := time.Now()
			p.MustPublish("csi-"+pod, target, a, readOnly)
			s.pub = append(s.pub, time.Since(start))
			start = time.Now()
			p.MustUnpublish("csi-"+pod, target)
			s.unpub = append(s.unpub, time.Since(start))
		}
		slices.Sort(s.pub)
		slices.Sort(s.unpub)
		return s
	}
	measure := func(name string) sample { return measureWith(name, attrs, false) }
	// startup returns the median wall time and CPU time (user and system, of this process:
	// nothing else in it runs meanwhile) of a start until the driver is ready (as
	// apm-csi-node answers Probe ready and registers with kubelet), and until the records'
	// targets are checked against the mount table in the background too (verified). On a
	// loaded machine the wall time follows the CPU other processes take; the CPU time does
	// not.
	//
	// The CPU time counts the garbage collections that happen meanwhile, which depend on the
	// garbage the calls before left; cleanCPU is the CPU time of more starts, each after a
	// collection, so that it counts only what a start-up allocates itself.
	type start struct{ wall, cpu, verifiedWall, verifiedCPU, cleanCPU time.Duration }
	startup := func() start {
		var walls, cpus, vwalls, vcpus, clean []time.Duration
		for i := range 2 * scaleStarts {
			p.Stop()
			if i >= scaleStarts {
				runtime.GC()
			}
			cpu0 := processCPU(b)
			t0 := time.Now()
			p.StartReady()
			if i >= scaleStarts {
				clean = append(clean, processCPU(b)-cpu0)
				<-p.Driver.Verified()
				continue
			}
			walls = append(walls, time.Since(t0))
			cpus = append(cpus, processCPU(b)-cpu0)
			<-p.Driver.Verified()
			vwalls = append(vwalls, time.Since(t0))
			vcpus = append(vcpus, processCPU(b)-cpu0)
		}
		med := func(d []time.Duration) time.Duration { slices.Sort(d); return d[len(d)/2] }
		return start{med(walls), med(cpus), med(vwalls), med(vcpus), med(clean)}
	}

	// throughput publishes scaleThroughput warm volumes one after another, then as many from
	// scaleWorkers goroutines at once, and returns the publishes per second of each. The
	// targets and attributes are made before the clock starts; the volumes are unpublished
	// after, untimed.
	throughput := func() (sequential, parallel float64) {
		run := func(name string, workers int) float64 {
			targets := make([]string, scaleThroughput)
			attributes := make([]map[string]string, scaleThroughput)
			for i := range scaleThroughput {
				pod := fmt.Sprintf("%s-%d", name, i)
				targets[i], attributes[i] = p.Target(pod, "apm"), attrs(pod)
			}
			errs := make(chan error, workers)
			start := time.Now()
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := w; i < scaleThroughput; i += workers {
						if err := p.Publish(fmt.Sprintf("csi-%s-%d", name, i), targets[i], attributes[i], false); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			close(errs)
			for err := range errs {
				b.Fatal(err)
			}
			for i := range scaleThroughput {
				p.MustUnpublish(fmt.Sprintf("csi-%s-%d", name, i), targets[i])
			}
			return float64(scaleThroughput) / elapsed.Seconds()
		}
		return run("seq", 1), run("par", scaleWorkers)
	}

	var live []string
	grow := func(n int) {
		for len(live) < n {
			pod := fmt.Sprintf("live-%d", len(live))
			target := p.Target(pod, "apm")
			p.MustPublish("csi-"+pod, target, attrs(pod), false)
			live = append(live, pod)
		}
	}
	shrink := func() {
		for _, pod := range live {
			p.MustUnpublish("csi-"+pod, filepath.Join(p.Kubelet, "pods", pod, "volumes", "kubernetes.io~csi", "apm", "mount"))
		}
		live = nil
	}

	b.ResetTimer()
	results := map[string]sample{}
	startEmpty := startup()
	sequential, parallel := throughput()
	for _, n := range scaleLive {
		grow(n)
		results[fmt.Sprintf("live%d", n)] = measure(fmt.Sprintf("live%d", n))
		if n == 0 || n == 2000 {
			results[fmt.Sprintf("ro1-live%d", n)] = measureWith(fmt.Sprintf("ro1-live%d", n), roAttrs, true)
		}
	}
	startFull := startup()
	journal, err := os.Stat(filepath.Join(p.State, "volumes", "journal"))
	if err != nil {
		b.Fatal(err)
	}
	shrink()

	unmount := mountUnrelated(b, filepath.Join(p.Root, "unrelated"), scaleUnrelated)
	results["unrelated2000"] = measure("unrelated")
	unmount()

	stop := startWriter(b, filepath.Join(p.Root, "writer"))
	results["writer"] = measure("writer")
	stop()
	b.StopTimer()

	base := results["live0"]
	for _, name := range []string{"live0", "live500", "live2000", "unrelated2000", "writer"} {
		s, ok := results[name]
		if !ok {
			continue
		}
		b.ReportMetric(ms(percentile(s.pub, 50)), name+"-pub-median-ms")
		b.ReportMetric(ms(percentile(s.pub, 99)), name+"-pub-p99-ms")
		b.ReportMetric(ms(percentile(s.unpub, 50)), name+"-unpub-median-ms")
		b.ReportMetric(ms(percentile(s.unpub, 99)), name+"-unpub-p99-ms")
		if name != "live0" {
			b.ReportMetric(ratio(percentile(s.pub, 50), percentile(base.pub, 50)), name+"/live0-pub-median-x")
			b.ReportMetric(ratio(percentile(s.unpub, 50), percentile(base.unpub, 50)), name+"/live0-unpub-median-x")
		}
	}
	b.ReportMetric(ratio(percentile(results["writer"].unpub, 99), percentile(base.unpub, 99)), "writer/live0-unpub-p99-x")
	ro0, ro2000 := results["ro1-live0"], results["ro1-live2000"]
	for name, s := range map[string]sample{"ro1-live0": ro0, "ro1-live2000": ro2000} {
		b.ReportMetric(ms(percentile(s.pub, 50)), name+"-pub-median-ms")
		b.ReportMetric(ms(percentile(s.pub, 99)), name+"-pub-p99-ms")
		b.ReportMetric(ms(percentile(s.unpub, 50)), name+"-unpub-median-ms")
	}
	b.ReportMetric(ratio(percentile(ro2000.pub, 50), percentile(ro0.pub, 50)), "ro1-live2000/ro1-live0-pub-median-x")
	b.ReportMetric(ratio(percentile(ro2000.unpub, 50), percentile(ro0.unpub, 50)), "ro1-live2000/ro1-live0-unpub-median-x")
	b.ReportMetric(sequential, "publishes-per-s-sequential")
	b.ReportMetric(parallel, fmt.Sprintf("publishes-per-s-%d-way", scaleWorkers))
	b.ReportMetric(ms(startEmpty.wall), "start-empty-ms")
	b.ReportMetric(ms(startFull.wall), "start-2000-ms")
	b.ReportMetric(ratio(startFull.wall, startEmpty.wall), "start-2000/empty-x")
	b.ReportMetric(ms(startEmpty.cpu), "start-empty-cpu-ms")
	b.ReportMetric(ms(startFull.cpu), "start-2000-cpu-ms")
	b.ReportMetric(ratio(startFull.cpu, startEmpty.cpu), "start-2000/empty-cpu-x")
	b.ReportMetric(ms(startEmpty.cleanCPU), "start-empty-clean-cpu-ms")
	b.ReportMetric(ms(startFull.cleanCPU), "start-2000-clean-cpu-ms")
	b.ReportMetric(ratio(startFull.cleanCPU, startEmpty.cleanCPU), "start-2000/empty-clean-cpu-x")
	b.ReportMetric(float64(journal.Size()), "journal-2000-bytes")
	b.ReportMetric(ms(startEmpty.verifiedWall), "verified-empty-ms")
	b.ReportMetric(ms(startFull.verifiedWall), "verified-2000-ms")
	b.ReportMetric(ms(startEmpty.verifiedCPU), "verified-empty-cpu-ms")
	b.ReportMetric(ms(startFull.verifiedCPU), "verified-2000-cpu-ms")
}

// processCPU returns the user and system CPU time this process has used.
func processCPU(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func ratio(a, b time.Duration) float64 { return float64(a) / float64(b) }

// mountUnrelated mounts n small tmpfs filesystems below dir, as other software on a node
// does; the returned function unmounts them.
func mountUnrelated(b *testing.B, dir string, n int) func() {
	b.Helper()
	var mounted []string
	undo := func() {
		for _, m := range mounted {
			if err := unix.Unmount(m, 0); err != nil {
				b.Errorf("unmount %s: %v", m, err)
			}
		}
		mounted = nil
	}
	b.Cleanup(undo)
	for i := range n {
		m := filepath.Join(dir, fmt.Sprint(i))
		if err := os.MkdirAll(m, 0o755); err != nil {
			b.Fatal(err)
		}
		if err := unix.Mount("unrelated", m, "tmpfs", 0, "size=1m"); err != nil {
			b.Fatal(err)
		}
		mounted = append(mounted, m)
	}
	return undo
}

// startWriter writes to a file in dir without pause until the returned function is called:
// buffered writes, a sync every 8 MiB and a truncate every 64 MiB, as a busy neighbour on the
// node's disk does.
func startWriter(b *testing.B, dir string) func() {
	b.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	f, err := os.Create(filepath.Join(dir, "data"))
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 1<<20)
		for i := 1; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			buf[0] = byte(i)
			if _, err := f.Write(buf); err != nil {
				b.Error(err)
				return
			}
			if i%8 == 0 {
				if err := f.Sync(); err != nil && !errors.Is(err, os.ErrClosed) {
					b.Error(err)
					return
				}
			}
			if i%64 == 0 {
				if err := f.Truncate(0); err != nil {
					b.Error(err)
					return
				}
				if _, err := f.Seek(0, 0); err != nil {
					b.Error(err)
					return
				}
			}
		}
	}()
	return func() {
		close(done)
		wg.Wait()
		f.Close()
	}
}
