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
	"uninstrumented": "uninstrumented (floor)",
	"init-container": "init-container mode",
	"csi-warm":       "CSI, warm cache",
	"csi-cold":       "CSI, cold node",
}

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
	return "**missed**"
}

// write renders docs/benchmarks.md, docs/benchmarks.png and the raw JSON.
func (r *run) write(outDir, rawDir string) error {
	res := &r.res
	if err := os.MkdirAll(rawDir, 0o755); err == nil {
		if b, err := json.MarshalIndent(res, "", "  "); err == nil {
			_ = os.WriteFile(filepath.Join(rawDir, "results.json"), b, 0o644)
		}
	}
	med := map[string]float64{}
	p90 := map[string]float64{}
	for _, a := range arms {
		med[a] = bench.Percentile(res.Start[a], 50)
		p90[a] = bench.Percentile(res.Start[a], 90)
	}
	floor := med["uninstrumented"]
	addedInit := med["init-container"] - floor
	addedWarm := med["csi-warm"] - floor
	warmRatio := med["csi-warm"] / floor
	speedup := math.Inf(1)
	if addedWarm > 0 {
		speedup = addedInit / addedWarm
	}

	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("# Benchmarks\n\n")
	w("What apm-csi changes for instrumented pods, measured on the local single-node cluster\n")
	w("([local-cluster.md](local-cluster.md)) by `test/bench/cmd/apm-csi-bench`. This file and\n")
	w("[benchmarks.png](benchmarks.png) are generated: do not edit them, run the command again.\n\n")
	w("```sh\n%s    # builds, installs deps, starts the cluster, measures, writes docs/benchmarks.{md,png}, tears down\n```\n\n", res.Command)
	w("![pod start and node disk per arm](benchmarks.png)\n\n")

	w("## Machine and versions\n\n")
	w("| | |\n| --- | --- |\n")
	w("| date | %s |\n", res.Date)
	w("| machine | %d CPUs (%s), %s memory, kernel %s |\n", res.NProc, res.CPU, hb(res.MemTotal), res.Kernel)
	w("| Kubernetes | %s (local cluster: one node, containerd `%s`) |\n", res.KubernetesVersion, res.ContainerRuntime)
	w("| apm-csi | %s, git revision %s |\n", res.APMCSIVersion, res.GitRevision)
	w("| Go | %s |\n", res.GoVersion)
	w("| pods per arm | %d |\n", res.Pods)
	w("| run time | %s |\n\n", res.Duration)

	w("## Library set\n\n")
	w("Synthetic, built in Go (`test/bench/libset.go`) in Datadog's image layouts, deterministic:\n")
	w("many small text-like files (compressible like sources) and a few large incompressible ones\n")
	w("(jars, native add-ons, shared objects), plus a busybox userland in each image so that\n")
	w("init-container mode can run its `cp`. The webhook injects all four (injector layout).\n\n")
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

	w("## 1. Pod start (create to Ready)\n\n")
	w("Time from just before the `create` call until a watch on the pod sees `Ready=True`.\n")
	w("The workload is one busybox container (`sh -c true; exec sleep`). The %d rounds run the\n", res.Pods)
	w("four arms one pod at a time, rotating the order each round; each round's pods are then\n")
	w("deleted and waited for, so every arm sees the same node and the same machine drift.\n\n")
	w("| arm | median | p90 | median vs floor | added to floor (median) |\n| --- | ---: | ---: | ---: | ---: |\n")
	for _, a := range arms {
		w("| %s | %s | %s | %.2fx | %s |\n", armTitle[a], bench.FmtSeconds(med[a]), bench.FmtSeconds(p90[a]), med[a]/floor, bench.FmtSeconds(med[a]-floor))
	}
	w("\nHow each arm is produced:\n\n")
	w("- **uninstrumented**: the pod in a namespace the webhook's selectors skip.\n")
	w("- **init-container mode**: the same pod in an SSI namespace with `apm-csi.io/injection-mode:\n")
	w("  init-container`: the webhook adds an `emptyDir` and %d init containers that `cp -r` each\n", res.InitRequests.Containers)
	w("  library into it. The library images are already in containerd (imported once, as a\n")
	w("  node that pulled them before), so this is the warm-image case of today's injection.\n")
	w("- **CSI, warm cache**: the pod in an SSI namespace (CSI mode); the library set is cached on\n")
	w("  the node, and kept in use by a long-running pod started first.\n")
	w("- **CSI, cold node**: the webhook's output for the warm pod, with each library reference\n")
	w("  pointing to a per-pod variant of the image (same layers, one more config label: a new\n")
	w("  manifest digest), created in a namespace the webhook skips. The node plugin's cache is\n")
	w("  keyed by manifest digest, so every cold pod resolves four tags and downloads and extracts\n")
	w("  the whole library set (%s of blobs) from the registry on 127.0.0.1, as the first pod on a new\n", hb(tc))
	w("  node does. Loopback makes the download itself nearly free; a real registry adds the\n")
	w("  network transfer of the compressed set.\n\n")
	w("Goals:\n\n")
	w("- CSI warm within 10%% of uninstrumented: median %s vs %s, %+.1f%%: %s",
		bench.FmtSeconds(med["csi-warm"]), bench.FmtSeconds(floor), (warmRatio-1)*100, yesNo(warmRatio <= 1.10))
	if warmRatio > 1.10 {
		w(" (by %.1f percentage points)", (warmRatio-1.10)*100)
	}
	w(".\n")
	if math.IsInf(speedup, 1) {
		w("- CSI warm at least 5x faster than init-container mode in added start-up time: init-container adds %s, CSI warm adds nothing measurable (%s): **met**.\n\n",
			bench.FmtSeconds(addedInit), bench.FmtSeconds(addedWarm))
	} else {
		w("- CSI warm at least 5x faster than init-container mode in added start-up time: init-container adds %s, CSI warm %s: %.1fx: %s",
			bench.FmtSeconds(addedInit), bench.FmtSeconds(addedWarm), speedup, yesNo(speedup >= 5))
		if speedup < 5 {
			w(" (%.1fx short of 5x)", 5-speedup)
		}
		w(".\n\n")
	}
	if pub := bench.Percentile(res.PublishLog["csi-warm"], 50); !math.IsNaN(pub) {
		if addedWarm > 0 {
			w("Where CSI warm's added %s goes: the node plugin's NodePublishVolume takes a median %s of it\n", bench.FmtSeconds(addedWarm), bench.FmtSeconds(pub))
			w("(section 5); the rest is kubelet's side of a CSI volume (volume manager reconcile loop,\n")
			w("the gRPC call, subPath bind mounts per container).\n")
		} else {
			w("CSI warm adds no measurable time: its NodePublishVolume (median %s, section 5) and kubelet's\n", bench.FmtSeconds(pub))
			w("volume work fit inside the step described below.\n")
		}
	}
	w("\nResolution: kubelet notices that a container started by relisting containers every second\n")
	w("(the generic PLEG), so Ready times fall on steps of about one second after the sandbox starts\n")
	near, all := 0, 0
	for _, a := range arms {
		for _, x := range res.Start[a] {
			all++
			if math.Abs(x-math.Round(x)) < 0.1 {
				near++
			}
		}
	}
	w("(in this run %d of %d samples are within 100 ms of a whole second). Differences\n", near, all)
	w("well under a second between arms cannot show; the comparison against the floor is exact to that step.\n")
	if pub := bench.Percentile(res.PublishLog["csi-cold"], 50); !math.IsNaN(pub) {
		w("On a cold node the publish, which downloads and extracts the library set, takes a median %s.\n", bench.FmtSeconds(pub))
	}
	w("\nPer-round samples (seconds) are in `_output/bench/results.json` after a run.\n\n")

	w("## 2. Node disk and memory after %d instrumented pods\n\n", res.Pods)
	w("%d pods per mode started at once, each writing %s into the library volume (a tracer log),\n", res.Pods, hb(writtenPerPod))
	w("measured once all are Ready (after `sync`) against the moment before they were created.\n")
	w("\"filesystem\" is the `statfs` used-bytes delta of the node's filesystem (includes any other\n")
	w("writer, e.g. component logs); the next columns split it by where pods keep their copies.\n\n")
	w("| mode | filesystem delta | emptyDirs (kubelet pods dir, du -x) | CSI upper dirs | memory used delta | page cache delta |\n| --- | ---: | ---: | ---: | ---: | ---: |\n")
	for _, m := range []string{"csi", "init-container"} {
		d := res.Disk[m]
		w("| %s | %s | %s | %s | %s | %s |\n", m, hb(d.FSUsedDelta), hb(d.KubeletPodsDelta), hb(d.OverlayDelta), hb(d.MemUsedDelta), hb(d.CachedDelta))
	}
	w("\nOnce per node, in both modes, not in the deltas above:\n\n")
	w("- CSI: the node plugin's library cache after the first pod: %s in %d files (`<state-dir>/store`,\n", hb(res.StoreBytes), res.StoreFiles)
	w("  the library set once, extracted). Node plugin resident memory: %s; webhook (all replicas): %s.\n", hb(res.PluginRSS), hb(res.WebhookRSS))
	w("- init-container mode: containerd keeps the images (%s compressed content + %s unpacked\n", hb(tc), hb(tu))
	w("  snapshots); kubelet may garbage-collect them under disk pressure, and then the next pod pulls again.\n\n")
	csiD, initD := res.Disk["csi"], res.Disk["init-container"]
	written := int64(res.Pods) * writtenPerPod
	w("Goal (CSI: the library set once plus only what pods wrote, %s): CSI added %s on the filesystem\n", hb(written), hb(csiD.FSUsedDelta))
	w("(upper dirs %s) against %s for init-container mode (emptyDirs %s, i.e. %s per pod): %s.\n\n",
		hb(csiD.OverlayDelta), hb(initD.FSUsedDelta), hb(initD.KubeletPodsDelta), hb(initD.KubeletPodsDelta/int64(max(1, res.Pods))),
		yesNo(csiD.OverlayDelta <= written*2 && csiD.KubeletPodsDelta < tb/4))
	w("Memory requests: init-container mode adds %d init containers, each requesting %s (limit %s);\n",
		res.InitRequests.Containers, res.InitRequests.RequestPerContainer, res.InitRequests.LimitPerCt)
	w("the scheduler reserves the largest init request (%s) per pod during start-up and counts it in\n", res.InitRequests.EffectivePodRequest)
	w("the pod's effective request when it exceeds the app's. CSI mode adds no container and no request.\n\n")

	w("## 3. Registry traffic\n\n")
	w("Blob bytes are counted by the in-process registry (`test/libimages`), which logs every request:\n")
	w("each blob GET is counted at its full size (manifests and HEADs are not bytes of blobs).\n\n")
	w("| what | blob GETs | blob bytes |\n| --- | ---: | ---: |\n")
	w("| CSI: first pod on the node (fills the cache) | | %s |\n", hb(res.FirstPodBlobBytes))
	w("| CSI: %d warm pods after it | %d | %s |\n", res.Pods, res.BlobGets["csi-warm"], hb(res.BlobBytes["csi-warm"]))
	w("| CSI: %d cold-node pods (one new digest set each, by design) | %d | %s (%s per pod) |\n", res.Pods, res.BlobGets["csi-cold"], hb(res.BlobBytes["csi-cold"]), hb(res.BlobBytes["csi-cold"]/int64(max(1, res.Pods))))
	w("| init-container: %d pods (containerd, `IfNotPresent`) | - | %s once per node (computed) |\n\n", res.Pods, hb(tc))
	w("So for %d pods CSI fetched %s, one copy of the library set (%s compressed) per node: %s.\n",
		res.Pods, hb(res.FirstPodBlobBytes+res.BlobBytes["csi-warm"]), hb(tc), yesNo(res.BlobBytes["csi-warm"] == 0 && res.FirstPodBlobBytes <= tc+tc/20))
	w("Init-container mode is not measured through the registry: the local containerd has no\n")
	w("plain-HTTP registry configured, so the images are imported instead of pulled. What it fetches\n")
	w("is computed: kubelet's `IfNotPresent` pulls each image once per node (manifest, config and\n")
	w("compressed layers: %s), the same as CSI. The difference between the modes is on the node\n", hb(tc))
	w("(per-pod copies, section 2), not in registry traffic, unless images are pulled with `Always`\n")
	w("or evicted by image GC.\n\n")

	w("## 4. Admission\n\n")
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
	w("The webhook's own time stays small under load, so the tail at 200/s is the API server's call\n")
	w("path to it (a TLS request to the Service ClusterIP through kube-proxy, queueing on the replicas)\n")
	w("and CPU contention. On this 2-CPU VM the client, the API server, etcd and both webhook replicas share the CPUs,\n")
	w("so the load figures are an upper bound of what a real control plane sees.\n\n")

	w("## 5. Node plugin: NodePublishVolume\n\n")
	w("Durations of each `NodePublishVolume` call as the plugin's gRPC interceptor logs them\n")
	w("(JSON log, `duration`), for the pods of the start-up rounds.\n\n")
	w("| | calls | median | p90 | p99 |\n| --- | ---: | ---: | ---: | ---: |\n")
	for _, a := range []string{"csi-warm", "csi-cold"} {
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
	w("  benchmark client share the CPUs. Absolute times are this VM's; the ratios are the result.\n")
	w("- Create-to-Ready is measured at the client (watch), not from the pod's condition timestamps,\n")
	w("  which have one-second resolution.\n")
	w("- The cold arm uses distinct digests instead of emptying the cache, so it needs no plugin\n")
	w("  restart (which would also re-register the driver with kubelet mid-run); the cold entries\n")
	w("  stay in the cache until its garbage collection (1 h grace period by default).\n")

	if err := os.WriteFile(filepath.Join(outDir, "benchmarks.md"), []byte(b.String()), 0o644); err != nil {
		return err
	}

	bars := []bench.Bar{}
	col := map[string]bench.Bar{
		"uninstrumented": {Color: bench.ColorFloor},
		"init-container": {Color: bench.ColorInit},
		"csi-warm":       {Color: bench.ColorWarm},
		"csi-cold":       {Color: bench.ColorCold},
	}
	for _, a := range arms {
		bars = append(bars, bench.Bar{Label: armTitle[a], Value: med[a], Whisker: p90[a], Color: col[a].Color,
			Text: fmt.Sprintf("%s (p90 %s)", bench.FmtSeconds(med[a]), bench.FmtSeconds(p90[a]))})
	}
	disk := []bench.Bar{
		{Label: "CSI", Value: float64(max(0, csiD.FSUsedDelta)), Color: bench.ColorWarm, Text: hb(csiD.FSUsedDelta)},
		{Label: "init-container", Value: float64(max(0, initD.FSUsedDelta)), Color: bench.ColorInit, Text: hb(initD.FSUsedDelta)},
	}
	reg := []bench.Bar{
		{Label: "CSI", Value: float64(res.FirstPodBlobBytes + res.BlobBytes["csi-warm"]), Color: bench.ColorWarm, Text: hb(res.FirstPodBlobBytes + res.BlobBytes["csi-warm"])},
		{Label: "init-container", Value: float64(tc), Color: bench.ColorInit, Text: hb(tc) + " (computed)"},
	}
	return bench.WriteChart(filepath.Join(outDir, "benchmarks.png"),
		fmt.Sprintf("apm-csi benchmark %s, %d CPUs, k8s %s", res.Date, res.NProc, res.KubernetesVersion),
		[]bench.Panel{
			{Title: fmt.Sprintf("pod start, create to ready: median, whisker p90 (%d pods per arm)", res.Pods), Bars: bars},
			{Title: fmt.Sprintf("node disk added by %d instrumented pods", res.Pods), Bars: disk},
			{Title: fmt.Sprintf("registry blob bytes for %d pods, one node", res.Pods), Bars: reg},
		})
}
