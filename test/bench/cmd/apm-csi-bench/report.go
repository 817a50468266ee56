package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"

	"github.com/apm-csi/apm-csi/test/bench"
	"github.com/apm-csi/apm-csi/test/e2e/framework"
)

var armTitle = map[string]string{
	bench.ArmFloor:   "uninstrumented (floor)",
	bench.ArmInit:    "init containers",
	bench.ArmIVWarm:  "image volumes, images on the node",
	bench.ArmIVCold:  "image volumes, cold node",
	bench.ArmCSIWarm: "CSI, warm cache",
	bench.ArmCSICold: "CSI, cold node",
}

var armColor = map[string]bench.Bar{
	bench.ArmFloor:   {Color: bench.ColorFloor},
	bench.ArmInit:    {Color: bench.ColorInit},
	bench.ArmIVWarm:  {Color: bench.ColorIVWarm},
	bench.ArmIVCold:  {Color: bench.ColorIVCold},
	bench.ArmCSIWarm: {Color: bench.ColorWarm},
	bench.ArmCSICold: {Color: bench.ColorCold},
}

var modeTitle = map[string]string{"uninstrumented": "uninstrumented", "csi": "CSI", "image-volume": "image volumes", "init-container": "init containers"}

func hb(n int64) string {
	if n < 0 {
		return "-" + framework.HumanBytes(-n)
	}
	return framework.HumanBytes(n)
}

func yesNo(ok bool) string {
	if ok {
		return "**met**"
	}
	return "**not met**"
}

func medianInt(xs []int) float64 {
	f := make([]float64, len(xs))
	for i, x := range xs {
		f[i] = float64(x)
	}
	return bench.Percentile(f, 50)
}

func pct(a, b float64) float64 { return (a/b - 1) * 100 }

// write renders docs/benchmarks.md, docs/benchmarks.png and the raw JSON.
func (r *run) write(outDir, rawDir string) error {
	res := &r.res
	if err := os.MkdirAll(rawDir, 0o755); err != nil {
		return err
	}
	raw, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return fmt.Errorf("raw results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(rawDir, "results.json"), raw, 0o644); err != nil {
		return err
	}
	// A cold image-volume sample counts only if its round's removal left containerd without the
	// library images' blobs and snapshots (evictions are recorded one per round, in order).
	ivColdKept, ivColdAll := len(res.First[bench.ArmIVCold]), len(res.First[bench.ArmIVCold])
	if n := len(res.Start[bench.ArmIVCold]); n == len(res.First[bench.ArmIVCold]) && len(res.Evictions) >= n {
		var f, s []float64
		for i := 0; i < n; i++ {
			if res.Evictions[i].Cold {
				f = append(f, res.First[bench.ArmIVCold][i])
				s = append(s, res.Start[bench.ArmIVCold][i])
			}
		}
		if len(f) > 0 {
			res.First[bench.ArmIVCold], res.Start[bench.ArmIVCold] = f, s
			ivColdKept = len(f)
		}
	}
	first, firstP90, ready, readyP90 := map[string]float64{}, map[string]float64{}, map[string]float64{}, map[string]float64{}
	for _, a := range arms {
		first[a] = bench.Percentile(res.First[a], 50)
		firstP90[a] = bench.Percentile(res.First[a], 90)
		ready[a] = bench.Percentile(res.Start[a], 50)
		readyP90[a] = bench.Percentile(res.Start[a], 90)
	}
	floor := first[bench.ArmFloor]

	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("# Benchmarks\n\n")
	w("What each way of delivering tracer libraries costs a pod, measured on the local single-node cluster\n")
	w("([local-cluster.md](local-cluster.md)) by `test/bench/cmd/apm-csi-bench`. This file and\n")
	w("[benchmarks.png](benchmarks.png) are generated: do not edit them, run the command again.\n\n")
	w("```sh\n%s    # builds, installs deps, starts the cluster, measures, writes docs/benchmarks.{md,png}, tears down\n```\n\n", res.Command)
	w("Flags: `-reps` (pod-start rounds, default 5), `-scale-pods` (pods started at once per arm, default 60; 0 skips),\n")
	w("`-scale-reps` (default 1), `-pods` (disk phase, default 10); e.g. `BENCH_FLAGS='-reps 2 -scale-pods 10'` for a quick run.\n\n")
	w("![pod start, scale, node disk and registry bytes per arm](benchmarks.png)\n\n")

	w("## Machine and versions\n\n")
	w("| | |\n| --- | --- |\n")
	w("| date | %s |\n", res.Date)
	w("| machine | %d CPUs (%s), %s memory, kernel %s |\n", res.NProc, res.CPU, hb(res.MemTotal), res.Kernel)
	w("| Kubernetes | %s (local cluster: one node, container runtime `%s`) |\n", res.KubernetesVersion, res.ContainerRuntime)
	w("| apm-csi | %s, git revision %s |\n", res.APMCSIVersion, res.GitRevision)
	w("| Go | %s |\n", res.GoVersion)
	w("| repetitions | %d pod-start rounds (one pod per arm each); %d x %d pods at once per arm; %d pods per mode for disk |\n", res.Reps, res.ScaleReps, res.ScalePods, res.DiskPods)
	w("| machine load during the run | 1-min load average mean %.1f, max %.1f (%d samples, every %.0f s); CPUs busy %.0f%% of the time; `/proc/loadavg` at start `%s`, at end `%s` |\n",
		res.Load.Mean1, res.Load.Max1, res.Load.Samples, res.Load.IntervalSecs, res.Load.CPUBusyShare*100, res.Load.AtStart, res.Load.AtEnd)
	w("| run time | %s |\n\n", res.Duration)
	if res.Load.Mean1 > float64(res.NProc) {
		w("The machine was shared during this run (mean load %.1f on %d CPUs, other work included): absolute times are\n", res.Load.Mean1, res.NProc)
		w("inflated and noisier than on an idle node; the arms are interleaved so that they share the same conditions.\n\n")
	}

	w("## Library set\n\n")
	w("Synthetic, built in Go (`test/bench/libset.go`) in Datadog's image layouts, deterministic:\n")
	w("many small text-like files (compressible like sources) and a few large incompressible ones\n")
	w("(jars, native add-ons, shared objects), plus a busybox userland in each image so that\n")
	w("init containers can run their `cp`. Every arm gets the same four images (injector layout).\n\n")
	w("| image | payload files | payload bytes | pull (compressed) | unpacked image |\n| --- | ---: | ---: | ---: | ---: |\n")
	var tf int
	var tb, tc, tu int64
	for _, l := range res.Libraries {
		w("| %s (`%s`) | %d | %s | %s | %s |\n", l.Name, l.Package, l.Files, hb(l.Bytes), hb(l.Compressed), hb(l.Uncompressed))
		tf += l.Files
		tb += l.Bytes
		tc += l.Compressed
		tu += l.Uncompressed
	}
	w("| **total** | %d | %s | %s | %s |\n\n", tf, hb(tb), hb(tc), hb(tu))

	w("## 1. Pod start\n\n")
	w("Two times per pod, both from just before the `create` call:\n\n")
	w("- **to the first command** (headline): the workload's first command reads the clock\n")
	w("  (busybox `adjtimex`, microseconds of `CLOCK_REALTIME`, which the node and its containers share) and\n")
	w("  prints it; the benchmark reads it from the container's log. This is when the application starts running,\n")
	w("  at millisecond resolution.\n")
	w("- **to Ready**: a watch on the pod sees `Ready=True` (the workload has no readiness probe): when kubelet has\n")
	w("  noticed the started container and the API server has the pod's new status.\n\n")
	var gaps []float64
	near, all := 0, 0
	for _, a := range arms {
		for i, x := range res.Start[a] {
			all++
			if math.Abs(x-math.Round(x)) < 0.1 {
				near++
			}
			if i < len(res.First[a]) {
				gaps = append(gaps, x-res.First[a][i])
			}
		}
	}
	w("The headline is the first command: it is when the application starts, which is what a pod's owner waits\n")
	w("for, measured in the container itself and independent of how kubelet detects and reports a start\n")
	w("(the generic PLEG relists containers every second; kubelet's status updates follow). In this run Ready came a\n")
	w("median %s after the first command (p10 %s, p90 %s; it can come first: a container counts as started\n",
		bench.FmtSeconds(bench.Percentile(gaps, 50)), bench.FmtSeconds(bench.Percentile(gaps, 10)), bench.FmtSeconds(bench.Percentile(gaps, 90)))
	w("before its process has run a command), and %d of %d Ready times were within 100 ms of a whole second.\n\n", near, all)
	w("The workload is one busybox container (first command, then `sleep`). Each of the %d rounds starts\n", res.Reps)
	w("one pod per arm, one after the other in an order that rotates every round, then deletes them and waits\n")
	w("until they are gone, so every arm sees the same node and the same machine drift.\n\n")
	w("| arm | first command, median | p90 | added to floor (median) | vs floor | Ready, median | p90 |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	for _, a := range arms {
		w("| %s | %s | %s | %s | %+.1f%% | %s | %s |\n", armTitle[a], bench.FmtSeconds(first[a]), bench.FmtSeconds(firstP90[a]),
			bench.FmtSeconds(first[a]-floor), pct(first[a], floor), bench.FmtSeconds(ready[a]), bench.FmtSeconds(readyP90[a]))
	}
	w("\nHow each arm is produced:\n\n")
	w("- **uninstrumented**: the pod in a namespace the webhook's selectors skip.\n")
	w("- **init containers**: the same pod in an SSI namespace with `apm-csi.io/injection-mode: init-container`:\n")
	w("  the webhook adds an `emptyDir` and %d init containers that `cp -r` each library into it. The\n", res.InitRequests.Containers)
	w("  library images are already in containerd (pulled by the round's cold image-volume pod).\n")
	w("- **image volumes, images on the node**: `apm-csi.io/injection-mode: image-volume`: one `image` volume per\n")
	w("  library (pull policy `IfNotPresent`), mounted read-only with a `subPath`, and a downward-API file for\n")
	w("  `/etc/ld.so.preload`; the images are in containerd.\n")
	w("- **image volumes, cold node**: the same pod after the library images were removed from containerd\n")
	w("  (`ctr -n k8s.io images rm --sync`, then waiting until containerd held none of their blobs and snapshots,\n")
	w("  untimed), so containerd pulls and unpacks the four images from the registry on 127.0.0.1 while the pod starts.\n")
	w("  It is the first pod of its round to use the images.\n")
	if len(res.Evictions) > 0 {
		var secs []float64
		cold := 0
		for _, e := range res.Evictions {
			secs = append(secs, e.Seconds)
			if e.Cold {
				cold++
			}
		}
		w("  Removals: %d, of which %d left containerd without any of the images' blobs and snapshots (median wait %s).\n",
			len(res.Evictions), cold, bench.FmtSeconds(bench.Percentile(secs, 50)))
		if ivColdKept < ivColdAll {
			w("  Only the %d rounds whose removal was complete count for this arm (%d of %d samples; see the notes).\n", ivColdKept, ivColdKept, ivColdAll)
		}
	}
	w("- **CSI, warm cache**: the pod in an SSI namespace (CSI mode); the library set is in the node plugin's\n")
	w("  cache, kept in use by a long-running pod started first.\n")
	w("- **CSI, cold node**: the webhook's output for the warm pod, with each library reference pointing to a\n")
	w("  variant of the image made for this round (same layers, one more config label: a new manifest digest),\n")
	w("  created in a namespace the webhook skips. The node plugin's cache is keyed by manifest digest, so\n")
	w("  the pod resolves four tags and downloads and extracts the whole library set (%s of blobs) from the\n", hb(tc))
	w("  registry on 127.0.0.1, as the first pod on a new node does.\n\n")
	w("Loopback makes downloads nearly free in both cold arms; a real registry adds the network transfer of\n")
	w("the compressed set (%s) to both.\n\n", hb(tc))

	w("### Mounts per pod\n\n")
	w("\"node\": the node's mounts that belong to the running pod (mount point or source naming the pod's UID,\n")
	w("its sandbox's or one of its containers' ID: kubelet's volumes and subPath binds, root filesystems,\n")
	w("containerd's image-volume mounts); \"container\": mounts the workload sees (`/proc/self/mountinfo`). Medians.\n\n")
	w("| arm | node | added vs floor | container | added vs floor |\n| --- | ---: | ---: | ---: | ---: |\n")
	hf, cf := medianInt(res.HostMounts[bench.ArmFloor]), medianInt(res.CtrMounts[bench.ArmFloor])
	for _, a := range arms {
		h, c := medianInt(res.HostMounts[a]), medianInt(res.CtrMounts[a])
		w("| %s | %.0f | %+.0f | %.0f | %+.0f |\n", armTitle[a], h, h-hf, c, c-cf)
	}
	w("\n")

	if len(res.Scale) > 0 {
		w("## 2. Many pods at once\n\n")
		w("%d pods of one arm created at the same moment (one goroutine each), the arms one after the other;\n", res.ScalePods)
		w("\"all Ready\" runs from the first create call until the last pod is Ready. Before the cold image-volume\n")
		w("arm the library images are removed from containerd; the CSI cold arm's pods all use one new image\n")
		w("variant, as %d pods landing on a new node do.\n\n", res.ScalePods)
		w("| arm | pods | all Ready | Ready p50 | Ready p90 | first command p50 | first command p90 | registry blob bytes |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
		for _, a := range arms {
			for _, s := range res.Scale[a] {
				w("| %s | %d | %s | %s | %s | %s | %s | %s |\n", armTitle[a], s.Pods, bench.FmtSeconds(s.AllReady),
					bench.FmtSeconds(bench.Percentile(s.Ready, 50)), bench.FmtSeconds(bench.Percentile(s.Ready, 90)),
					bench.FmtSeconds(bench.Percentile(s.First, 50)), bench.FmtSeconds(bench.Percentile(s.First, 90)), hb(s.BlobBytes))
			}
		}
		w("\n")
	}

	w("## 3. Node disk and memory per extra pod\n\n")
	w("%d pods per mode started at once, measured once all are Ready and before they write anything\n", res.DiskPods)
	w("(after `sync`), against the moment before they were created. The library set is already on the node in\n")
	w("every mode (CSI: the node plugin's cache; image volumes and init containers: containerd's images), so\n")
	w("this is what each further pod costs. Per pod: the sum over kubelet's pods dir (emptyDirs and kubelet's own\n")
	w("per-pod files), the node plugin's state dir (volume records, upper and work dirs), and containerd's snapshots\n")
	w("and content, walked without crossing mounts, each inode once; \"file data\" counts regular files' bytes,\n")
	w("\"allocated\" the blocks of files and directories. Uninstrumented pods are the baseline.\n\n")
	w("| mode | file data per pod | files per pod | allocated per pod | file data added vs uninstrumented | kubelet pods dir | node plugin state dir (upper/work dirs) | containerd snapshots | containerd content | filesystem delta (all) | memory used delta | page cache delta |\n")
	w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	base := res.Disk["uninstrumented"].perPod()
	for _, m := range diskModes {
		d, ok := res.Disk[m]
		if !ok {
			continue
		}
		pp := d.perPod()
		w("| %s | %s | %d | %s | %s | %s | %s (%s) | %s | %s | %s | %s | %s |\n", modeTitle[m], hb(pp.FileBytes), pp.Files, hb(pp.Blocks), hb(pp.FileBytes-base.FileBytes),
			hb(d.KubeletPodsDelta.Blocks), hb(d.StateDelta.Blocks), hb(d.OverlayDelta.Blocks), hb(d.SnapshotsDelta.Blocks), hb(d.ContentDelta.Blocks),
			hb(d.FSUsedDelta), hb(d.MemUsedDelta), hb(d.CachedDelta))
	}
	w("\nThe directory columns are totals for the %d pods (allocated blocks).\n", res.DiskPods)
	w("\nOnce per node, not in the figures above:\n\n")
	w("- CSI: the node plugin's library cache after the first pod: %s in %d files (`<state-dir>/store`,\n", hb(res.StoreBytes), res.StoreFiles)
	w("  the library set once, extracted). Node plugin resident memory: %s; webhook (all replicas): %s.\n", hb(res.PluginRSS), hb(res.WebhookRSS))
	w("- image volumes and init containers: containerd keeps the images (%s compressed content + %s unpacked\n", hb(tc), hb(tu))
	w("  snapshots); kubelet may garbage-collect them under disk pressure, and then the next pod pulls again.\n\n")
	w("Memory requests: init-container mode adds %d init containers, each requesting %s (limit %s); the\n",
		res.InitRequests.Containers, res.InitRequests.RequestPerContainer, res.InitRequests.LimitPerCt)
	w("scheduler reserves the largest init request (%s) per pod during start-up. CSI and image-volume modes add\n", res.InitRequests.EffectivePodRequest)
	w("no container and no request.\n\n")

	w("## 4. Registry traffic\n\n")
	w("Counted by the in-process registry (`test/libimages`), which logs every request: each blob GET is counted\n")
	w("at its full size (manifests and HEADs are not bytes of blobs). The node plugin (CSI) and the node's\n")
	w("containerd (init containers, image volumes: the loopback registry is plain HTTP to it) both pull from it.\n\n")
	w("| what | pods | blob GETs | blob bytes | per pod |\n| --- | ---: | ---: | ---: | ---: |\n")
	w("| CSI: first pod on the node (fills the cache) | 1 | | %s | %s |\n", hb(res.FirstPodBlobBytes), hb(res.FirstPodBlobBytes))
	for _, a := range arms {
		n := len(res.Start[a])
		if a == bench.ArmIVCold {
			n = ivColdAll
		}
		w("| pod-start rounds: %s | %d | %d | %s | %s |\n", armTitle[a], n, res.BlobGets[a], hb(res.BlobBytes[a]), hb(res.BlobBytes[a]/int64(max(1, n))))
	}
	for _, a := range arms {
		for _, s := range res.Scale[a] {
			w("| %d at once: %s | %d | %d | %s | %s |\n", s.Pods, armTitle[a], s.Pods, s.BlobGets, hb(s.BlobBytes), hb(s.BlobBytes/int64(max(1, s.Pods))))
		}
	}
	if ivColdKept < ivColdAll {
		w("\nImage volumes, cold node: %.0f of the %d rounds fetched the whole set; in the others containerd still held\n", float64(res.BlobBytes[bench.ArmIVCold])/float64(max(1, tc)), ivColdAll)
		w("the images (see the notes), and only the %d rounds whose removal was confirmed complete count in section 1.\n", ivColdKept)
	}
	w("\nThe warm arms fetch nothing; a cold node fetches the compressed set (%s) once, whatever the number\n", hb(tc))
	w("of pods, in both cold modes (the CSI cold rounds fetch it per pod by design: each uses a new variant).\n\n")

	w("## 5. Goals\n\n")
	warm, civ := first[bench.ArmCSIWarm], first[bench.ArmIVCold]
	w("Pod start figures are the medians of create to first command (section 1).\n\n")
	w("- CSI warm adds under 2%% to the uninstrumented start: %s vs %s, %+.1f%% (%s): %s.\n",
		bench.FmtSeconds(warm), bench.FmtSeconds(floor), pct(warm, floor), bench.FmtSeconds(warm-floor), yesNo(warm < floor*1.02))
	w("- CSI cold no slower than image volumes cold: %s vs %s (%+.1f%%): %s.\n",
		bench.FmtSeconds(first[bench.ArmCSICold]), bench.FmtSeconds(civ), pct(first[bench.ArmCSICold], civ), yesNo(first[bench.ArmCSICold] <= civ))
	w("- CSI warm no slower than image volumes warm: %s vs %s (%+.1f%%): %s.\n",
		bench.FmtSeconds(warm), bench.FmtSeconds(first[bench.ArmIVWarm]), pct(warm, first[bench.ArmIVWarm]), yesNo(warm <= first[bench.ArmIVWarm]))
	if d, ok := res.Disk["csi"]; ok {
		n := int64(max(1, d.Pods))
		pp, base := d.perPod(), res.Disk["uninstrumented"].perPod()
		up := d.OverlayDelta
		w("- Disk per extra pod 0 B before the pod writes (CSI): the pod's upper and work dirs hold %s of file data\n", hb(up.FileBytes/n))
		w("  (%d files): %s. Besides them a CSI pod adds %s of metadata over an uninstrumented pod (kubelet's\n", up.Files/n, yesNo(up.FileBytes == 0), hb(pp.FileBytes-base.FileBytes))
		w("  `vol_data.json` for the CSI volume and the node plugin's volume record) and %s of allocated blocks in all\n", hb(pp.Blocks-base.Blocks))
		w("  (directories: upper, work, record)")
		if iv, ok := res.Disk["image-volume"]; ok {
			w("; image volumes add %s of file data and %s allocated", hb(iv.perPod().FileBytes-base.FileBytes), hb(iv.perPod().Blocks-base.Blocks))
		}
		if ic, ok := res.Disk["init-container"]; ok {
			w("; init containers %s of file data", hb(ic.perPod().FileBytes-base.FileBytes))
		}
		w(".\n")
	}
	if s := res.Scale; len(s) > 0 && len(s[bench.ArmCSIWarm]) > 0 && len(s[bench.ArmIVWarm]) > 0 && len(s[bench.ArmCSICold]) > 0 && len(s[bench.ArmIVCold]) > 0 {
		w("- At %d pods at once (all Ready): CSI warm %s vs image volumes warm %s; CSI cold %s vs image volumes cold %s.\n", res.ScalePods,
			bench.FmtSeconds(s[bench.ArmCSIWarm][0].AllReady), bench.FmtSeconds(s[bench.ArmIVWarm][0].AllReady),
			bench.FmtSeconds(s[bench.ArmCSICold][0].AllReady), bench.FmtSeconds(s[bench.ArmIVCold][0].AllReady))
	}
	if pub := bench.Percentile(res.PublishLog[bench.ArmCSIWarm], 50); !math.IsNaN(pub) {
		w("\nCSI warm's own work on the node is NodePublishVolume (median %s, section 7) plus kubelet's side of a CSI volume;\n", bench.FmtSeconds(pub))
		w("the differences between warm arms are of the order of the rounds' spread (p90 column), so with %d rounds on a\n", res.Reps)
		w("shared machine a difference of a few percent is within the noise.\n")
	}
	w("\n")

	w("## 6. Admission\n\n")
	w("Server-side dry-run pod creates (`dryRun=All`: every admission step runs, including the\n")
	w("webhook, which has `sideEffects: None`; nothing is stored or started), timed at the client.\n")
	w("\"webhook\" is an SSI namespace (the webhook mutates), \"skipped\" a namespace its selectors skip.\n\n")
	w("| | median | p90 | p99 |\n| --- | ---: | ---: | ---: |\n")
	for _, a := range []string{"webhook", "skipped"} {
		xs := res.AdmSeq[a]
		w("| one at a time, %s (%d) | %s | %s | %s |\n", a, len(xs), bench.FmtSeconds(bench.Percentile(xs, 50)), bench.FmtSeconds(bench.Percentile(xs, 90)), bench.FmtSeconds(bench.Percentile(xs, 99)))
	}
	for _, a := range []string{"webhook", "skipped"} {
		x := res.AdmRate[a]
		w("| %d/s for %.0f s, %s (%d sent, %d errors, %d unmutated, %.0f/s achieved) | %s | %s | %s |\n", x.Target, x.Seconds, a, x.Sent, x.Errors, x.Unmutated, x.Achieved,
			bench.FmtSeconds(bench.Percentile(x.Lat, 50)), bench.FmtSeconds(bench.Percentile(x.Lat, 90)), bench.FmtSeconds(bench.Percentile(x.Lat, 99)))
	}
	if n := res.AdmUnexpected["webhook"]; n > 0 {
		w("\n%d of the one-at-a-time creates in the SSI namespace came back without the library volume\n", n)
		w("(the webhook did not answer in time; `failurePolicy: Ignore` admits the pod unmutated).\n")
	}
	ms, mk := bench.Percentile(res.AdmSeq["webhook"], 50), bench.Percentile(res.AdmSeq["skipped"], 50)
	w("\nRatio of medians, one at a time: %.2fx (webhook adds %s per create).\n", ms/mk, bench.FmtSeconds(ms-mk))
	rw, rs := res.AdmRate["webhook"], res.AdmRate["skipped"]
	w("At %d creates/s: p99 %s with the webhook against %s without (%.2fx).\n", rw.Target,
		bench.FmtSeconds(bench.Percentile(rw.Lat, 99)), bench.FmtSeconds(bench.Percentile(rs.Lat, 99)), bench.Percentile(rw.Lat, 99)/bench.Percentile(rs.Lat, 99))
	if res.WebhookHist.count() > 0 {
		w("The webhook's own decision time during that load (`apm_csi_webhook_mutation_duration_seconds`,\n")
		w("%.0f observations, all replicas, bucket-interpolated): median %s, p99 %s.\n",
			res.WebhookHist.count(), bench.FmtSeconds(bench.HistQuantile(0.5, res.WebhookHist.Bounds, res.WebhookHist.Cum)),
			bench.FmtSeconds(bench.HistQuantile(0.99, res.WebhookHist.Bounds, res.WebhookHist.Cum)))
	}
	w("On this 2-CPU VM the client, the API server, etcd and both webhook replicas share the CPUs,\n")
	w("so the load figures are an upper bound of what a real control plane sees.\n\n")

	w("## 7. Node plugin: NodePublishVolume\n\n")
	w("Durations of each `NodePublishVolume` call as the plugin's gRPC interceptor logs them\n")
	w("(JSON log, `duration`), for the pods of the pod-start rounds.\n\n")
	w("| | calls | median | p90 | p99 |\n| --- | ---: | ---: | ---: | ---: |\n")
	for _, a := range []string{bench.ArmCSIWarm, bench.ArmCSICold} {
		xs := res.PublishLog[a]
		w("| %s | %d | %s | %s | %s |\n", armTitle[a], len(xs), bench.FmtSeconds(bench.Percentile(xs, 50)), bench.FmtSeconds(bench.Percentile(xs, 90)), bench.FmtSeconds(bench.Percentile(xs, 99)))
	}
	if h := res.PublishHistWarm; h.count() > 0 {
		w("\nCross-check from the plugin's histogram `apm_csi_node_operation_duration_seconds` (scraped\n")
		w("before and after each warm pod; %.0f publishes; bucket-interpolated): median %s, p99 %s.\n",
			h.count(), bench.FmtSeconds(bench.HistQuantile(0.5, h.Bounds, h.Cum)), bench.FmtSeconds(bench.HistQuantile(0.99, h.Bounds, h.Cum)))
	}
	w("\n")

	if len(res.Notes) > 0 {
		w("## Notes from the run\n\n")
		for _, n := range res.Notes {
			w("- %s\n", n)
		}
		w("\n")
	}
	w("## Method, and what is not measured\n\n")
	w("- Everything runs on one machine: kubelet, containerd, the control plane, the registry and the\n")
	w("  benchmark client share the CPUs. Absolute times are this VM's; the comparisons are the result.\n")
	w("- The first-command time includes the shell starting and running `adjtimex` (about a millisecond, the\n")
	w("  same in every arm).\n")
	w("- The CSI cold arm uses distinct digests instead of emptying the cache, so it needs no plugin\n")
	w("  restart (which would also re-register the driver with kubelet mid-run); the cold entries\n")
	w("  stay in the cache until its garbage collection (1 h grace period by default).\n")
	w("- The image-volume cold arm empties containerd of the library images instead; containerd's\n")
	w("  other images (pause, busybox, apm-csi's) stay.\n")
	w("- Per-pod samples (seconds) are in `_output/bench/results.json` after a run.\n")

	if err := os.WriteFile(filepath.Join(outDir, "benchmarks.md"), []byte(b.String()), 0o644); err != nil {
		return err
	}
	return r.chart(outDir, first, firstP90, tc)
}

func (r *run) chart(outDir string, first, firstP90 map[string]float64, tc int64) error {
	res := &r.res
	var start, scale, reg []bench.Bar
	short := map[string]string{bench.ArmIVWarm: "image volumes, warm"}
	label := func(a string) string {
		if l, ok := short[a]; ok {
			return l
		}
		return armTitle[a]
	}
	for _, a := range arms {
		col := armColor[a].Color
		start = append(start, bench.Bar{Label: label(a), Value: first[a], Whisker: firstP90[a], Color: col,
			Text: fmt.Sprintf("%s (p90 %s)", bench.FmtSeconds(first[a]), bench.FmtSeconds(firstP90[a]))})
		if s := res.Scale[a]; len(s) > 0 {
			scale = append(scale, bench.Bar{Label: label(a), Value: s[0].AllReady, Color: col, Text: bench.FmtSeconds(s[0].AllReady)})
		}
		n := int64(max(1, len(res.Start[a])))
		if a == bench.ArmIVCold {
			n = int64(max(1, res.Reps)) // every round's pod, also those whose removal was incomplete
		}
		reg = append(reg, bench.Bar{Label: label(a), Value: float64(res.BlobBytes[a] / n), Color: col, Text: hb(res.BlobBytes[a] / n)})
	}
	var disk []bench.Bar
	for _, m := range diskModes {
		d, ok := res.Disk[m]
		if !ok {
			continue
		}
		pp := d.perPod()
		col := map[string]bench.Bar{"csi": armColor[bench.ArmCSIWarm], "image-volume": armColor[bench.ArmIVWarm], "init-container": armColor[bench.ArmInit]}[m].Color
		disk = append(disk, bench.Bar{Label: modeTitle[m], Value: float64(max(0, pp.Blocks)), Color: col,
			Text: fmt.Sprintf("%s allocated, %s file data", hb(pp.Blocks), hb(pp.FileBytes))})
	}
	panels := []bench.Panel{
		{Title: fmt.Sprintf("pod start, create to first command: median, whisker p90 (%d rounds)", res.Reps), Bars: start},
	}
	if len(scale) > 0 {
		panels = append(panels, bench.Panel{Title: fmt.Sprintf("%d pods at once: create to all ready", res.ScalePods), Bars: scale})
	}
	panels = append(panels,
		bench.Panel{Title: "node disk per extra pod, before it writes", Bars: disk},
		bench.Panel{Title: fmt.Sprintf("registry blob bytes per pod, pod-start rounds (set: %s)", hb(tc)), Bars: reg},
	)
	return bench.WriteChart(filepath.Join(outDir, "benchmarks.png"),
		fmt.Sprintf("apm-csi benchmark %s, %d CPUs, k8s %s", res.Date, res.NProc, res.KubernetesVersion), panels)
}
