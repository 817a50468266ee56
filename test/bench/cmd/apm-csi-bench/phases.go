package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/apm-csi/apm-csi/test/bench"
	"github.com/apm-csi/apm-csi/test/eventually"
)

// startRounds runs the pod-start comparison: round i starts one pod per arm, one after the
// other (bench.RoundOrder: the order rotates every round; the cold image-volume pod is the
// first of the round to use the library images, which were removed from containerd before the
// round), then deletes the round's pods and waits until they are gone, so every arm sees the
// same node state and the same machine drift.
func (r *run) startRounds(reps int) error {
	r.res.Start = map[string][]float64{}
	r.res.First = map[string][]float64{}
	r.res.HostMounts = map[string][]int{}
	r.res.CtrMounts = map[string][]int{}
	r.res.BlobBytes = map[string]int64{}
	r.res.BlobGets = map[string]int{}
	var hist histDelta
	for i := 0; i < reps; i++ {
		if err := r.evictLibraryImages(); err != nil {
			return err
		}
		var created []*corev1.Pod
		line := []string{}
		for _, arm := range bench.RoundOrder(i) {
			p := r.armPod(arm, fmt.Sprintf("%s-%02d", arm, i), fmt.Sprintf("cold-%02d", i))
			before := len(r.reg.Requests())
			var h0 histDelta
			if arm == bench.ArmCSIWarm {
				h0, _ = scrapeHist(pluginMetrics, "apm_csi_node_operation_duration_seconds", publishFilter)
			}
			start, d, err := r.startPodAt(p)
			if err != nil {
				return err
			}
			if n, err := r.podMounts(p); err != nil {
				r.note("mounts of %s: %v", p.Name, firstLine(err))
			} else {
				r.res.HostMounts[arm] = append(r.res.HostMounts[arm], n)
			}
			if arm == bench.ArmCSIWarm {
				// The publish happened before Ready; the histogram now holds it.
				if h1, err := scrapeHist(pluginMetrics, "apm_csi_node_operation_duration_seconds", publishFilter); err == nil {
					hist = hist.add(h1.sub(h0))
				}
			}
			reqs := r.reg.Requests()
			if len(reqs) > before {
				by, gets := r.blobBytes(reqs[before:])
				r.res.BlobBytes[arm] += by
				r.res.BlobGets[arm] += gets
			}
			r.res.Start[arm] = append(r.res.Start[arm], d.Seconds())
			first := "?"
			if st, err := r.stamp(p); err != nil {
				r.note("%s: %v", p.Name, firstLine(err))
			} else {
				f := st.Time.Sub(start)
				r.res.First[arm] = append(r.res.First[arm], f.Seconds())
				r.res.CtrMounts[arm] = append(r.res.CtrMounts[arm], st.Mounts)
				first = f.Round(time.Millisecond).String()
			}
			created = append(created, p)
			line = append(line, fmt.Sprintf("%s %s/%s", arm, first, d.Round(time.Millisecond)))
		}
		r.logf("round %d/%d (first command/Ready): %s", i+1, reps, strings.Join(line, ", "))
		if err := r.deleteAll(created); err != nil {
			return err
		}
		// Let kubelet finish tearing the round down (unmounts, sandbox removal) so that the
		// next round's first pod does not compete with it.
		time.Sleep(2 * time.Second)
	}
	r.res.PublishHistWarm = hist
	return nil
}

// scalePhase starts n pods of each arm at once (the arms one after the other, the order
// rotating between repetitions) and records when each is Ready and when its workload ran.
// Before the cold image-volume arm the library images are removed from containerd; the CSI
// cold arm's pods all use one new image variant, as on a fresh node.
func (r *run) scalePhase(n, reps int) error {
	r.res.Scale = map[string][]scaleResult{}
	order := []string{bench.ArmFloor, bench.ArmCSIWarm, bench.ArmIVWarm, bench.ArmInit, bench.ArmCSICold, bench.ArmIVCold}
	for rep := 0; rep < reps; rep++ {
		for k := range order {
			arm := order[(rep+k)%len(order)]
			switch arm {
			case bench.ArmIVCold:
				if err := r.evictLibraryImages(); err != nil {
					return err
				}
			case bench.ArmIVWarm, bench.ArmInit:
				// The images must be on the node: a cold image-volume start just before put them
				// there, or the rounds did.
				if !r.imagesPresent() {
					if err := r.pullLibraryImages(); err != nil {
						return err
					}
				}
			}
			time.Sleep(3 * time.Second)
			res, err := r.startMany(arm, n, fmt.Sprintf("scale-%02d", rep))
			if err != nil {
				return err
			}
			r.res.Scale[arm] = append(r.res.Scale[arm], res)
			r.logf("scale %s: %d pods all Ready in %s (Ready p50 %s p90 %s; first command p50 %s p90 %s); %d blob GETs, %s", arm, n,
				bench.FmtSeconds(res.AllReady), bench.FmtSeconds(bench.Percentile(res.Ready, 50)), bench.FmtSeconds(bench.Percentile(res.Ready, 90)),
				bench.FmtSeconds(bench.Percentile(res.First, 50)), bench.FmtSeconds(bench.Percentile(res.First, 90)), res.BlobGets, hb(res.BlobBytes))
		}
	}
	return nil
}

// startMany creates n pods of arm at once, waits until all are Ready, reads their stamps and
// deletes them.
func (r *run) startMany(arm string, n int, tag string) (scaleResult, error) {
	res := scaleResult{Pods: n}
	ps := make([]*corev1.Pod, n)
	starts := make([]time.Time, n)
	durs := make([]time.Duration, n)
	errs := make([]error, n)
	for i := range ps {
		ps[i] = r.armPod(arm, fmt.Sprintf("scale-%s-%02d", arm, i), tag)
	}
	before := len(r.reg.Requests())
	var wg sync.WaitGroup
	for i := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			starts[i], durs[i], errs[i] = r.startPodAt(ps[i])
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		_ = r.deleteAll(ps)
		return res, err
	}
	// All Ready is counted from the first create call (opening each pod's watch comes before).
	begin := starts[0]
	for _, s := range starts {
		if s.Before(begin) {
			begin = s
		}
	}
	for i := range ps {
		end := starts[i].Add(durs[i]).Sub(begin).Seconds()
		res.AllReady = max(res.AllReady, end)
		res.Ready = append(res.Ready, durs[i].Seconds())
		if st, err := r.stamp(ps[i]); err == nil {
			res.First = append(res.First, st.Time.Sub(starts[i]).Seconds())
		}
	}
	if reqs := r.reg.Requests(); len(reqs) > before {
		res.BlobBytes, res.BlobGets = r.blobBytes(reqs[before:])
	}
	return res, r.deleteAll(ps)
}

// stamp reads the workload's stamp (bench.StampScript) from its container log; kubelet may
// serve the log a moment after the container is Ready.
func (r *run) stamp(p *corev1.Pod) (bench.Stamp, error) {
	var last error
	for attempt := 0; attempt < 20; attempt++ {
		raw, err := r.cs.CoreV1().Pods(p.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: "app"}).DoRaw(r.ctx)
		if err == nil {
			st, perr := bench.ParseStamp(string(raw))
			if perr == nil && st.Mounts >= 0 {
				return st, nil
			}
			last = perr
			if last == nil {
				last = errors.New("no mount count in the workload's log")
			}
		} else {
			last = err
		}
		time.Sleep(250 * time.Millisecond)
	}
	return bench.Stamp{}, fmt.Errorf("the workload's stamp: %w", last)
}

// podMounts counts the node's mounts that belong to a running pod: those whose mount point
// or source names the pod's UID (kubelet's volumes and subPath binds) or the ID of one of its
// containerd containers (the sandbox, the containers' root filesystems, containerd's image
// volume mounts). The node's mount table holds other mounts of the shared machine too, so a
// before/after count would not do.
func (r *run) podMounts(p *corev1.Pod) (int, error) {
	got, err := r.cs.CoreV1().Pods(p.Namespace).Get(r.ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		return 0, err
	}
	uid := string(got.UID)
	out, err := r.ctr("containers", "ls", "-q", `labels."io.kubernetes.pod.uid"==`+uid)
	if err != nil {
		return 0, err
	}
	ids := append(strings.Fields(out), uid)
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		for _, id := range ids {
			if strings.Contains(line, id) {
				n++
				break
			}
		}
	}
	return n, nil
}

// ctr runs containerd's CLI against the cluster's containerd in the CRI namespace and returns
// its standard output.
func (r *run) ctr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(r.ctx, 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(r.c.BinDir(), "ctr"), append([]string{"--address", r.c.ContainerdAddress(), "--namespace", "k8s.io"}, args...)...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out.String(), nil
}

func (r *run) libraryRefs() []string {
	var refs []string
	for _, l := range r.libs {
		refs = append(refs, r.prefix+"/"+l.Package+":"+libTag)
	}
	return refs
}

// imagesPresent reports whether containerd has every library image.
func (r *run) imagesPresent() bool {
	out, err := r.ctr("images", "ls", "-q")
	if err != nil {
		return false
	}
	have := map[string]bool{}
	for _, f := range strings.Fields(out) {
		have[f] = true
	}
	for _, ref := range r.libraryRefs() {
		if !have[ref] {
			return false
		}
	}
	return true
}

// pullLibraryImages has containerd pull the library images (what a node that ran such a pod
// before has).
func (r *run) pullLibraryImages() error {
	for _, ref := range r.libraryRefs() {
		if _, err := r.ctr("images", "pull", "--plain-http", ref); err != nil {
			return err
		}
	}
	return nil
}

// evictLibraryImages makes the node cold for image volumes: it removes the library images
// from containerd (ctr images rm --sync of every record of them: containerd's garbage
// collection deletes their blobs at once), and waits until containerd holds none of their blobs and snapshots (the snapshots
// go once no container or sandbox of a deleted pod uses them). `ctr content prune references`
// is not used: it strips the layer references of every image in the store, the pinned pause
// and busybox images' too. Not timed as part of any pod's start.
func (r *run) evictLibraryImages() error {
	start := time.Now()
	if err := r.removeLibraryRecords(); err != nil {
		return err
	}
	ev := eviction{}
	left := ""
	var ctrErr error
	err := eventually.Wait(r.ctx, 3*time.Minute, 500*time.Millisecond, "containerd to drop the library images' blobs and snapshots", func(context.Context) error {
		content, err1 := r.ctr("content", "ls", "-q")
		snaps, err2 := r.ctr("snapshots", "ls")
		if ctrErr = errors.Join(err1, err2); ctrErr != nil {
			return eventually.Stop(ctrErr)
		}
		left = ""
		for _, d := range r.libDigests {
			if strings.Contains(content, d) || strings.Contains(snaps, d) {
				left = d
				return fmt.Errorf("containerd holds %s", d)
			}
		}
		return nil
	})
	switch {
	case ctrErr != nil:
		return ctrErr
	case r.ctx.Err() != nil:
		return r.ctx.Err()
	}
	// A timeout leaves the node partly warm: noted below, not an error.
	ev.Cold = err == nil
	ev.Seconds = time.Since(start).Seconds()
	r.res.Evictions = append(r.res.Evictions, ev)
	if !ev.Cold {
		r.note("containerd still held %s %s after removing the library images: that cold image-volume start was partly warm", left, time.Since(start).Round(time.Second))
	} else {
		r.logf("library images removed from containerd (blobs and snapshots gone after %s)", time.Since(start).Round(100*time.Millisecond))
	}
	return nil
}

// removeLibraryRecords deletes every record of the library images from containerd: containerd's
// CRI plugin records each pulled image under its tag, its repository digest
// (<repo>@sha256:...) and its ID (the config digest); and the library set is deterministic, so
// records left by an earlier run (another registry port) name the same manifests.
func (r *run) removeLibraryRecords() error {
	out, err := r.ctr("images", "ls")
	if err != nil {
		return err
	}
	var refs []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] == "REF" {
			continue
		}
		ref, target := f[0], f[2]
		if strings.HasPrefix(ref, r.prefix+"/") || slices.Contains(r.libConfigs, ref) || slices.Contains(r.libManifests, target) {
			refs = append(refs, ref)
		}
	}
	if len(refs) == 0 {
		return nil
	}
	_, err = r.ctr(append([]string{"images", "rm", "--sync"}, refs...)...)
	return err
}

// disk modes, in report order.
var diskModes = []string{"uninstrumented", "csi", "image-volume", "init-container"}

// diskPhase starts pods instrumented in each mode (all at once), waits for them to be Ready,
// measures what they added to the node's disk and memory before writing anything, and
// deletes them. The library set is already on the node in every mode (CSI cache, containerd's
// images): the figures are per extra pod.
func (r *run) diskPhase(pods int) error {
	r.res.Disk = map[string]diskResult{}
	kubeletPods := filepath.Join(r.c.KubeletDir(), "pods")
	overlays := filepath.Join(r.d.StateDir, "overlays")
	ctrRoot := filepath.Join(r.c.Root(), "containerd", "root-v2")
	content := filepath.Join(ctrRoot, "io.containerd.content.v1.content")
	snapshots := filepath.Join(ctrRoot, "io.containerd.snapshotter.v1.overlayfs")
	if !r.imagesPresent() {
		if err := r.pullLibraryImages(); err != nil {
			return err
		}
	}
	for _, mode := range diskModes {
		time.Sleep(3 * time.Second)
		syscall.Sync()
		m0, fs0 := meminfo(), fsUsed(r.d.StateDir)
		kp0, st0, ov0, sn0, co0 := usage(kubeletPods), usage(r.d.StateDir), usage(overlays), usage(snapshots), usage(content)
		var ps []*corev1.Pod
		var wg sync.WaitGroup
		errs := make([]error, pods)
		for i := 0; i < pods; i++ {
			var p *corev1.Pod
			switch mode {
			case "uninstrumented":
				p = benchPod(nsFloor, fmt.Sprintf("disk-floor-%02d", i), "")
			case "csi":
				p = benchPod(nsWarm, fmt.Sprintf("disk-csi-%02d", i), "")
			case "image-volume":
				p = ivPod(benchPod(nsIV, fmt.Sprintf("disk-iv-%02d", i), ""))
			default:
				p = initPod(benchPod(nsInit, fmt.Sprintf("disk-init-%02d", i), ""))
			}
			ps = append(ps, p)
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = r.startPod(p)
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			_ = r.deleteAll(ps)
			return err
		}
		time.Sleep(5 * time.Second)
		syscall.Sync()
		m1, fs1 := meminfo(), fsUsed(r.d.StateDir)
		kp1, st1, ov1, sn1, co1 := usage(kubeletPods), usage(r.d.StateDir), usage(overlays), usage(snapshots), usage(content)
		d := diskResult{
			Pods:             pods,
			FSUsedDelta:      fs1 - fs0,
			KubeletPodsDelta: kp1.sub(kp0),
			StateDelta:       st1.sub(st0),
			OverlayDelta:     ov1.sub(ov0),
			SnapshotsDelta:   sn1.sub(sn0),
			ContentDelta:     co1.sub(co0),
			MemUsedDelta:     (m1["MemTotal"] - m1["MemAvailable"]) - (m0["MemTotal"] - m0["MemAvailable"]),
			CachedDelta:      m1["Cached"] - m0["Cached"],
		}
		r.res.Disk[mode] = d
		if mode == "csi" {
			r.res.PluginRSS = rss("apm-csi-node")
			r.res.WebhookRSS = rss("apm-csi-webhook")
		}
		pp := d.perPod()
		r.logf("disk phase %s: %d pods, filesystem %s, per pod %s in %d files (%s allocated), memory used %s (page cache %s)", mode, pods,
			hb(d.FSUsedDelta), hb(pp.FileBytes), pp.Files, hb(pp.Blocks), hb(d.MemUsedDelta), hb(d.CachedDelta))
		if err := r.deleteAll(ps); err != nil {
			return err
		}
	}
	return nil
}

// loadSampler records the machine's load average while the benchmark runs.
type loadSampler struct {
	mu      sync.Mutex
	samples []float64
	first   string
}

type loadSummary struct {
	Samples      int
	Mean1, Max1  float64
	AtStart      string // /proc/loadavg when the run began
	AtEnd        string
	IntervalSecs float64
	CPUBusyShare float64 // share of CPU time not idle over the run (all CPUs)
}

func (l *loadSampler) start(every time.Duration) func() loadSummary {
	stop := make(chan struct{})
	done := make(chan struct{})
	l.first = loadavg()
	idle0, total0 := cpuTimes()
	go func() {
		defer close(done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				f := strings.Fields(loadavg())
				if len(f) > 0 {
					if v, err := strconv.ParseFloat(f[0], 64); err == nil {
						l.mu.Lock()
						l.samples = append(l.samples, v)
						l.mu.Unlock()
					}
				}
			}
		}
	}()
	return func() loadSummary {
		close(stop)
		<-done
		l.mu.Lock()
		defer l.mu.Unlock()
		s := loadSummary{Samples: len(l.samples), AtStart: l.first, AtEnd: loadavg(), IntervalSecs: every.Seconds()}
		for _, v := range l.samples {
			s.Mean1 += v
			s.Max1 = max(s.Max1, v)
		}
		if len(l.samples) > 0 {
			s.Mean1 /= float64(len(l.samples))
		}
		idle1, total1 := cpuTimes()
		if total1 > total0 {
			s.CPUBusyShare = 1 - (idle1-idle0)/(total1-total0)
		}
		return s
	}
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return strings.TrimSpace(string(b))
}

// cpuTimes returns the idle (idle + iowait) and total jiffies of all CPUs (/proc/stat).
func cpuTimes() (idle, total float64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i, v := range f[1:] {
		n, _ := strconv.ParseFloat(v, 64)
		if i < 8 { // user nice system idle iowait irq softirq steal (guest is in user)
			total += n
		}
		if i == 3 || i == 4 {
			idle += n
		}
	}
	return idle, total
}
