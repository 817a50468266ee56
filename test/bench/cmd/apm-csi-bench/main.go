// Command apm-csi-bench runs apm-csi's benchmark on the local single-node cluster and writes
// docs/benchmarks.md and docs/benchmarks.png (`make bench`). It needs root, the images of
// `make build images` and the Kubernetes binaries of hack/install-deps.sh.
//
// One run starts the cluster, installs apm-csi with its Helm chart (test/e2e/framework), builds
// a synthetic library set (Java, Node.js, Python and the injector, about 150 MB of files),
// serves it from an in-process registry that logs every blob request (the node plugin and the
// node's containerd both pull from it), and measures:
//
//  1. pod start of six arms, run interleaved in rounds: uninstrumented, init containers,
//     image volumes with the images on the node and on a cold node, CSI with a warm cache and
//     on a cold node; create to Ready and create to the workload's first command;
//  2. the same arms with many pods started at once;
//  3. node disk and memory per instrumented pod, per mode;
//  4. registry bytes per arm;
//  5. admission latency with and without the webhook, sequential and at 200 creates/s;
//  6. the node plugin's NodePublishVolume latency.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"

	"github.com/apm-csi/apm-csi/test/bench"
	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/localcluster"
)

const (
	libTag        = "bench"
	libRepo       = "datadoghq"
	nsFloor       = "bench-floor"
	nsInit        = "bench-init"
	nsIV          = "bench-imagevol"
	nsWarm        = "bench-warm"
	nsCold        = "bench-cold"
	nsKeep        = "bench-keep"
	modeAnnot     = "apm-csi.io/injection-mode"
	pluginMetrics = "http://127.0.0.1:9851/metrics"
)

// arms of the pod-start comparison, in report order.
var arms = bench.Arms

var armNS = map[string]string{
	bench.ArmFloor: nsFloor, bench.ArmInit: nsInit, bench.ArmIVWarm: nsIV, bench.ArmIVCold: nsIV,
	bench.ArmCSIWarm: nsWarm, bench.ArmCSICold: nsCold,
}

type run struct {
	ctx    context.Context
	c      *localcluster.Cluster
	cs     kubernetes.Interface
	d      *framework.Deployment
	reg    *libimages.Registry
	libs   []bench.Library
	blobs  map[string]int64
	prefix string
	logf   func(string, ...any)
	// libDigests are the library images' layer digests (content) and diff IDs (snapshots),
	// to check that containerd has forgotten them.
	libDigests []string
	// libConfigs are the library images' IDs (config digests), as containerd names them.
	libConfigs []string
	// libManifests are the library images' manifest digests.
	libManifests []string

	coldTemplate *corev1.Pod
	res          results
	load         loadSampler
}

type results struct {
	Date, Command, GitRevision, APMCSIVersion, KubernetesVersion, ContainerRuntime, GoVersion string
	Kernel, CPU                                                                               string
	NProc                                                                                     int
	MemTotal                                                                                  int64
	Reps, ScalePods, ScaleReps, DiskPods                                                      int
	Libraries                                                                                 []libInfo
	Start                                                                                     map[string][]float64 // arm -> create-to-Ready seconds, in round order
	First                                                                                     map[string][]float64 // arm -> create-to-first-command seconds
	HostMounts                                                                                map[string][]int     // arm -> mounts added to the node's mount table by the pod
	CtrMounts                                                                                 map[string][]int     // arm -> mounts in the workload's container
	Evictions                                                                                 []eviction
	Scale                                                                                     map[string][]scaleResult
	PublishLog                                                                                map[string][]float64 // arm -> NodePublishVolume seconds from the plugin's log
	PublishHistWarm                                                                           histDelta
	BlobBytes                                                                                 map[string]int64 // arm -> blob bytes fetched during that arm's pods
	BlobGets                                                                                  map[string]int
	FirstPodBlobBytes                                                                         int64
	StoreBytes                                                                                int64
	StoreFiles                                                                                int
	Disk                                                                                      map[string]diskResult
	InitRequests                                                                              initResources
	PluginRSS, WebhookRSS                                                                     int64
	AdmSeq                                                                                    map[string][]float64
	AdmRate                                                                                   map[string]rateResult
	AdmUnexpected                                                                             map[string]int
	WebhookHist                                                                               histDelta
	Load                                                                                      loadSummary
	Notes                                                                                     []string
	Duration                                                                                  string
}

// eviction is one removal of the library images from containerd before a cold image-volume
// pod: how long until containerd held none of their blobs and snapshots, and whether it came
// to that.
type eviction struct {
	Seconds float64
	Cold    bool
}

// scaleResult is one start of many pods at once.
type scaleResult struct {
	Pods      int
	AllReady  float64   // seconds from the first create until the last pod is Ready
	Ready     []float64 // per pod, create to Ready
	First     []float64 // per pod, create to the workload's first command
	BlobBytes int64
	BlobGets  int
}

type libInfo struct {
	Name, Package                   string
	Files                           int
	Bytes, Compressed, Uncompressed int64
}

type histDelta struct {
	Bounds []float64
	Cum    []float64
}

// diskResult is what N pods of one mode added to the node, measured once they are all Ready
// (nothing written by them yet), against the moment before they were created.
type diskResult struct {
	Pods             int
	FSUsedDelta      int64 // statfs used bytes after - before, on the node's filesystem
	KubeletPodsDelta du    // <kubelet>/pods (emptyDirs, kubelet's per-pod files; not the CSI overlays)
	StateDelta       du    // the node plugin's state dir: volume records, per-pod upper/work dirs, cache
	OverlayDelta     du    // the node plugin's per-pod upper/work dirs (part of StateDelta)
	SnapshotsDelta   du    // containerd's snapshots (image layers, image-volume and container snapshots)
	ContentDelta     du    // containerd's content store (compressed blobs)
	MemUsedDelta     int64 // MemTotal-MemAvailable after - before
	CachedDelta      int64 // page cache (Cached) after - before
}

// perPod is the disk the pods added, per pod: every column but the filesystem's.
func (d diskResult) perPod() du {
	t := d.KubeletPodsDelta.add(d.StateDelta).add(d.SnapshotsDelta).add(d.ContentDelta)
	n := int64(max(1, d.Pods))
	return du{Blocks: t.Blocks / n, FileBytes: t.FileBytes / n, Files: t.Files / n}
}

type initResources struct {
	Containers                      int
	RequestPerContainer, LimitPerCt string
	EffectivePodRequest             string
}

type rateResult struct {
	Target   int
	Seconds  float64
	Sent     int
	Errors   int
	Achieved float64
	// Unmutated counts creates in the SSI namespace admitted without the library volume
	// (webhook timed out; failurePolicy Ignore).
	Unmutated int
	Lat       []float64
}

type options struct {
	reps, scalePods, scaleReps, diskPods, rate, rateSecs, admSeq int
	keep                                                         bool
}

func main() {
	root := flag.String("root", envOr("CLUSTER_ROOT", "/var/lib/apm-csi-localcluster"), "local cluster root")
	imagesDir := flag.String("images", "_output/images", "image tarballs of `make images` (apm-csi-node.tar, apm-csi-webhook.tar)")
	outDir := flag.String("out", "docs", "where benchmarks.md and benchmarks.png go")
	rawDir := flag.String("raw", "_output/bench", "where the raw results (JSON) go")
	var o options
	flag.IntVar(&o.reps, "reps", 5, "pod-start rounds: each starts one pod per arm, one after the other")
	flag.IntVar(&o.scalePods, "scale-pods", 60, "pods started at once per arm in the scale phase (0 skips it)")
	flag.IntVar(&o.scaleReps, "scale-reps", 1, "scale-phase repetitions per arm")
	flag.IntVar(&o.diskPods, "pods", 10, "pods per mode in the disk phase")
	flag.IntVar(&o.rate, "rate", 200, "pod creates per second for the admission load test")
	flag.IntVar(&o.rateSecs, "rate-seconds", 10, "duration of the admission load test")
	flag.IntVar(&o.admSeq, "admission-samples", 200, "sequential creates per arm for the admission latency")
	version := flag.String("version", "dev", "apm-csi version (git describe) for the report")
	flag.BoolVar(&o.keep, "keep", false, "leave the cluster running at the end")
	render := flag.String("render", "", "only render the report from a run's raw results (e.g. _output/bench/results.json)")
	flag.Parse()
	if *render != "" {
		r := &run{}
		b, err := os.ReadFile(*render)
		if err == nil {
			err = json.Unmarshal(b, &r.res)
		}
		if err == nil {
			err = r.write(*outDir, filepath.Join(os.TempDir(), "apm-csi-bench-render"))
		}
		if err != nil {
			log.Fatal(err)
		}
		return
	}
	began := time.Now()
	logf := func(format string, args ...any) {
		fmt.Printf("%s %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
	}
	if os.Geteuid() != 0 {
		log.Fatal("apm-csi-bench needs root (it starts the local cluster)")
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	ctx, cancel2 := context.WithTimeout(ctx, 90*time.Minute)
	defer cancel2()

	repoRoot, err := localcluster.FindRepoRoot(".")
	if err != nil {
		log.Fatal(err)
	}
	r := &run{ctx: ctx, logf: logf}
	r.res.Reps, r.res.ScalePods, r.res.ScaleReps, r.res.DiskPods = o.reps, o.scalePods, o.scaleReps, o.diskPods
	r.res.APMCSIVersion = *version
	r.res.Command = "sudo make bench"
	var extra []string
	flag.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "root", "images", "out", "version":
		default:
			extra = append(extra, "-"+f.Name+" "+f.Value.String())
		}
	})
	if len(extra) > 0 {
		r.res.Command += " BENCH_FLAGS='" + strings.Join(extra, " ") + "'"
	}
	stopLoad := r.load.start(10 * time.Second)
	err = r.main(repoRoot, *root, *imagesDir, o)
	r.res.Load = stopLoad()
	if r.c != nil && !o.keep {
		r.removeLibraryImages()
		logf("tearing the cluster down")
		downCtx, c := context.WithTimeout(context.Background(), 3*time.Minute)
		if derr := r.c.Down(downCtx); derr != nil {
			logf("cluster down: %v", derr)
		}
		c()
	}
	if err != nil {
		log.Fatalf("benchmark failed: %v", err)
	}
	r.res.Duration = time.Since(began).Round(time.Second).String()
	if err := r.write(*outDir, *rawDir); err != nil {
		log.Fatal(err)
	}
	logf("wrote %s and %s in %s", filepath.Join(*outDir, "benchmarks.md"), filepath.Join(*outDir, "benchmarks.png"), r.res.Duration)
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func (r *run) main(repoRoot, root, imagesDir string, o options) (err error) {
	ctx := r.ctx
	r.reg = libimages.NewRegistry()
	if err := r.reg.Start(); err != nil {
		return err
	}
	defer func() {
		if serr := r.reg.Stop(); serr != nil {
			err = errors.Join(err, fmt.Errorf("stop the image registry: %w", serr))
		}
	}()
	r.prefix = r.reg.Addr() + "/" + libRepo

	type built struct {
		libs []bench.Library
		err  error
	}
	ch := make(chan built, 1)
	go func() {
		start := time.Now()
		libs, err := bench.BuildLibrarySet(ctx, r.prefix, libTag)
		r.logf("built the library set in %s", time.Since(start).Round(100*time.Millisecond))
		ch <- built{libs, err}
	}()

	r.logf("starting the local cluster under %s", root)
	c, err := localcluster.Up(ctx, localcluster.Options{Root: root, Logf: r.logf})
	if err != nil {
		<-ch
		return fmt.Errorf("cluster up: %w", err)
	}
	r.c = c
	cfg, err := c.RestConfig()
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 2000, 2000
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	r.cs = cs
	for _, n := range []string{"apm-csi-node", "apm-csi-webhook"} {
		tb := filepath.Join(imagesDir, n+".tar")
		if _, err := os.Stat(tb); err != nil {
			return fmt.Errorf("%s missing: run `make build images` first", tb)
		}
		if err := c.ImportImage(ctx, tb); err != nil {
			return err
		}
	}
	b := <-ch
	if b.err != nil {
		return b.err
	}
	r.libs = b.libs
	// Every mode gets the library images from the registry: the node plugin (CSI) and the
	// node's containerd (init containers, image volumes; a loopback registry on a port other
	// than 443 is plain HTTP to containerd), so the registry sees every byte.
	for _, l := range r.libs {
		if _, err := r.reg.Push(libRepo+"/"+l.Package, libTag, l.Image); err != nil {
			return err
		}
		unc, err := uncompressedSize(l)
		if err != nil {
			return err
		}
		r.res.Libraries = append(r.res.Libraries, libInfo{Name: l.Name, Package: l.Package, Files: l.Files, Bytes: l.Bytes, Compressed: l.Compressed, Uncompressed: unc})
		cfgName, err := l.Image.ConfigName()
		if err != nil {
			return err
		}
		r.libConfigs = append(r.libConfigs, cfgName.String())
		md, err := l.Image.Digest()
		if err != nil {
			return err
		}
		r.libManifests = append(r.libManifests, md.String())
		r.libDigests = append(r.libDigests, cfgName.String())
		layers, err := l.Image.Layers()
		if err != nil {
			return err
		}
		for _, layer := range layers {
			d, err := layer.Digest()
			if err != nil {
				return err
			}
			diff, err := layer.DiffID()
			if err != nil {
				return err
			}
			r.libDigests = append(r.libDigests, d.String(), diff.String())
		}
	}
	// Variants for the CSI cold arm: one per round and one per scale repetition, same layers,
	// a new manifest digest each.
	var all []bench.Library
	for _, tag := range coldTags(o) {
		for _, l := range r.libs {
			v, err := bench.Variant(l.Image, tag)
			if err != nil {
				return err
			}
			if _, err := r.reg.Push(libRepo+"/"+l.Package, tag, v); err != nil {
				return err
			}
			all = append(all, bench.Library{Image: v})
		}
	}
	allImgs := []bench.Library{}
	allImgs = append(allImgs, r.libs...)
	allImgs = append(allImgs, all...)
	r.blobs = map[string]int64{}
	for _, l := range allImgs {
		m, err := bench.BlobSizes(l.Image)
		if err != nil {
			return err
		}
		for k, v := range m {
			r.blobs[k] = v
		}
	}
	r.reg.ResetCounts()

	if err := r.deploy(repoRoot); err != nil {
		return err
	}
	if err := r.collectInfo(); err != nil {
		return err
	}
	if err := r.namespaces(); err != nil {
		return err
	}
	if err := r.firstPod(); err != nil {
		return err
	}
	// From here on a failing phase is reported and the run goes on, so that the report
	// shows everything that was measured.
	if err := r.startRounds(o.reps); err != nil {
		r.logf("%v", err)
		r.note("pod-start rounds stopped early: %v", firstLine(err))
	}
	if err := r.publishFromLogs(); err != nil {
		r.logf("%v", err)
		r.note("NodePublishVolume durations from the plugin's log unavailable: %v", firstLine(err))
	}
	if o.scalePods > 0 {
		if err := r.scalePhase(o.scalePods, o.scaleReps); err != nil {
			r.logf("%v", err)
			r.note("scale phase stopped early: %v", firstLine(err))
		}
	}
	if err := r.diskPhase(o.diskPods); err != nil {
		r.logf("%v", err)
		r.note("disk phase failed: %v", firstLine(err))
	}
	if err := r.admission(o.admSeq, o.rate, o.rateSecs); err != nil {
		r.logf("%v", err)
		r.note("admission phase failed: %v", firstLine(err))
	}
	return nil
}

// coldTags are the tags of the CSI cold arm's image variants: cold-NN for round NN, and
// scale-NN for scale repetition NN.
func coldTags(o options) []string {
	var out []string
	for i := 0; i < o.reps; i++ {
		out = append(out, fmt.Sprintf("cold-%02d", i))
	}
	if o.scalePods > 0 {
		for i := 0; i < o.scaleReps; i++ {
			out = append(out, fmt.Sprintf("scale-%02d", i))
		}
	}
	return out
}

func (r *run) note(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	r.logf("NOTE %s", s)
	r.res.Notes = append(r.res.Notes, s)
}

// deploy installs apm-csi with the chart (framework.Deploy: direct layout), then switches the
// webhook to the injector layout with the benchmark's apm-inject image, which is what SSI runs.
func (r *run) deploy(repoRoot string) error {
	start := time.Now()
	d, err := framework.Deploy(r.ctx, r.c, framework.Options{
		RepoRoot:        repoRoot,
		LibraryRegistry: r.reg.Addr(),
		LibraryPrefix:   r.prefix,
		Languages:       map[string]string{"java": libTag, "js": libTag, "python": libTag},
		// An empty list, not null: the chart's schema refuses null on the upgrade below.
		HostDirNamespaces: []string{},
		Logf:              r.logf,
	})
	if err != nil {
		return err
	}
	r.d = d
	if out, err := d.Helm(r.ctx, "upgrade", framework.Release, filepath.Join(repoRoot, "deploy/helm/apm-csi"),
		"--namespace", framework.Namespace, "--reuse-values", "--set", "libraries.injector.version="+libTag,
		"--set", "libraries.layout=injector", "--wait", "--timeout", "5m"); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	if err := d.WaitReady(r.ctx); err != nil {
		return err
	}
	// Wait until the rolled webhook answers with the injector layout (four images).
	if err := framework.EnsureNamespace(r.ctx, r.c, nsWarm, map[string]string{framework.SSILabel: "enabled"}); err != nil {
		return err
	}
	if err := framework.Poll(r.ctx, 3*time.Minute, "the webhook to inject the injector layout", func() (bool, error) {
		p, err := r.dryRun(nsWarm, framework.BusyboxPod(nsWarm, "probe", "true"))
		if err != nil {
			return false, nil
		}
		v := framework.LibraryVolume(p)
		if v == nil {
			return false, nil
		}
		n := 0
		for _, val := range v.CSI.VolumeAttributes {
			if strings.HasPrefix(val, r.prefix+"/") {
				n++
			}
		}
		return n == 4, nil
	}); err != nil {
		return err
	}
	r.logf("apm-csi installed (injector layout, 3 languages + injector) in %s", time.Since(start).Round(100*time.Millisecond))
	return nil
}

func (r *run) dryRun(ns string, p *corev1.Pod) (*corev1.Pod, error) {
	p = p.DeepCopy()
	p.Namespace = ns
	return r.cs.CoreV1().Pods(ns).Create(r.ctx, p, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
}

func (r *run) namespaces() error {
	for ns, labels := range map[string]map[string]string{
		nsFloor: nil,
		nsCold:  nil,
		nsInit:  {framework.SSILabel: "enabled"},
		nsIV:    {framework.SSILabel: "enabled"},
		nsWarm:  {framework.SSILabel: "enabled"},
		nsKeep:  {framework.SSILabel: "enabled"},
	} {
		if err := framework.EnsureNamespace(r.ctx, r.c, ns, labels); err != nil {
			return err
		}
	}
	// The cold arm's pods are the webhook's own output for a warm pod, with the library
	// references pointing at per-pod image variants; they are created in a namespace the
	// webhook does not select, so nothing else differs from the warm arm.
	p, err := r.dryRun(nsWarm, benchPod(nsWarm, "template", ""))
	if err != nil {
		return err
	}
	r.coldTemplate = p
	ip, err := r.dryRun(nsInit, initPod(benchPod(nsInit, "template", "")))
	if err != nil {
		return err
	}
	if len(ip.Spec.InitContainers) == 0 {
		return fmt.Errorf("init-container mode added no init container: %v", ip.Annotations)
	}
	ir := initResources{Containers: len(ip.Spec.InitContainers)}
	var maxReq resource.Quantity
	for _, ic := range ip.Spec.InitContainers {
		q := ic.Resources.Requests[corev1.ResourceMemory]
		ir.RequestPerContainer = q.String()
		l := ic.Resources.Limits[corev1.ResourceMemory]
		ir.LimitPerCt = l.String()
		if q.Cmp(maxReq) > 0 {
			maxReq = q
		}
	}
	// The scheduler reserves max(largest init container, sum of containers) for the pod.
	ir.EffectivePodRequest = maxReq.String()
	r.res.InitRequests = ir
	return nil
}

// benchPod is the workload: busybox that runs script and sleeps (Ready once started). The
// default script stamps the time as its first command (bench.StampScript).
func benchPod(ns, name, script string) *corev1.Pod {
	if script == "" {
		script = bench.StampScript
	}
	p := framework.BusyboxPod(ns, name, script)
	p.Labels["apm-csi.io/bench"] = "true"
	p.Spec.TerminationGracePeriodSeconds = framework.Ptr[int64](0)
	return p
}

func initPod(p *corev1.Pod) *corev1.Pod { return withMode(p, "init-container") }

func ivPod(p *corev1.Pod) *corev1.Pod { return withMode(p, "image-volume") }

func withMode(p *corev1.Pod, mode string) *corev1.Pod {
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	p.Annotations[modeAnnot] = mode
	return p
}

// armPod is the pod of an arm; tag is the CSI cold arm's image variant.
func (r *run) armPod(arm, name, tag string) *corev1.Pod {
	switch arm {
	case bench.ArmInit:
		return initPod(benchPod(nsInit, name, ""))
	case bench.ArmIVWarm, bench.ArmIVCold:
		return ivPod(benchPod(nsIV, name, ""))
	case bench.ArmCSICold:
		return r.coldPod(name, tag)
	default:
		return benchPod(armNS[arm], name, "")
	}
}

// coldPod derives a pod of the CSI cold arm from the webhook's output, with the library
// references pointing at the image variants tagged tag.
func (r *run) coldPod(name, tag string) *corev1.Pod {
	t := r.coldTemplate.DeepCopy()
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: nsCold, Labels: t.Labels, Annotations: t.Annotations}, Spec: t.Spec}
	p.Labels = map[string]string{"app": name, "apm-csi.io/bench": "true"}
	var vols []corev1.Volume
	for _, v := range p.Spec.Volumes {
		if strings.HasPrefix(v.Name, "kube-api-access-") {
			continue
		}
		if v.CSI != nil {
			for k, val := range v.CSI.VolumeAttributes {
				if strings.HasPrefix(val, r.prefix+"/") && strings.HasSuffix(val, ":"+libTag) {
					v.CSI.VolumeAttributes[k] = strings.TrimSuffix(val, libTag) + tag
				}
			}
		}
		vols = append(vols, v)
	}
	p.Spec.Volumes = vols
	for ci := range p.Spec.Containers {
		var ms []corev1.VolumeMount
		for _, m := range p.Spec.Containers[ci].VolumeMounts {
			if !strings.HasPrefix(m.Name, "kube-api-access-") {
				ms = append(ms, m)
			}
		}
		p.Spec.Containers[ci].VolumeMounts = ms
	}
	p.Spec.NodeName = ""
	return p
}

// firstPod starts the keeper: the first instrumented pod on the node, which downloads the
// library set, and keeps it in use for the rest of the run (the "warm" cache).
func (r *run) firstPod() error {
	r.reg.ResetCounts()
	d, err := r.startPod(benchPod(nsKeep, "keeper", ""))
	if err != nil {
		return err
	}
	r.res.FirstPodBlobBytes, _ = r.blobBytes(r.reg.Requests())
	files, bytes, err := framework.DirUsage(filepath.Join(r.d.StateDir, "store"))
	if err != nil {
		return err
	}
	r.res.StoreFiles, r.res.StoreBytes = files, bytes
	r.logf("first instrumented pod (cold node) Ready in %s; fetched %s of blobs; cache %s in %d files",
		d.Round(time.Millisecond), framework.HumanBytes(r.res.FirstPodBlobBytes), framework.HumanBytes(bytes), files)
	return nil
}

func (r *run) blobBytes(reqs []libimages.Request) (int64, int) {
	var n int64
	gets := 0
	for _, q := range reqs {
		if q.Method == http.MethodGet && q.Kind == "blob" {
			n += r.blobs[q.Ref]
			gets++
		}
	}
	return n, gets
}

// startPod creates p and returns the time from just before the create call until a watch
// sees it Ready. A watch the API server ends or answers with an error (e.g. "Too large
// resource version" while its watch cache catches up) is opened again: a watch without a
// resource version starts with the pod's current state.
func (r *run) startPod(p *corev1.Pod) (time.Duration, error) {
	_, d, err := r.startPodAt(p)
	return d, err
}

// startPodAt is startPod that also returns the moment just before the create call.
func (r *run) startPodAt(p *corev1.Pod) (time.Time, time.Duration, error) {
	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Minute)
	defer cancel()
	sel := metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", p.Name).String()}
	w, werr := r.cs.CoreV1().Pods(p.Namespace).Watch(ctx, sel)
	start := time.Now()
	d, err := r.waitReady(ctx, p, start, sel, w, werr)
	return start, d, err
}

func (r *run) waitReady(ctx context.Context, p *corev1.Pod, start time.Time, sel metav1.ListOptions, w watch.Interface, werr error) (time.Duration, error) {
	if _, err := r.cs.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
		if werr == nil {
			w.Stop()
		}
		return 0, fmt.Errorf("create %s/%s: %w", p.Namespace, p.Name, err)
	}
	for {
		if werr != nil {
			select {
			case <-ctx.Done():
				return 0, fmt.Errorf("pod %s/%s not Ready: %w\n%s", p.Namespace, p.Name, ctx.Err(), framework.DescribePod(r.ctx, r.cs, p.Namespace, p.Name))
			case <-time.After(50 * time.Millisecond):
			}
			w, werr = r.cs.CoreV1().Pods(p.Namespace).Watch(ctx, sel)
			continue
		}
		d, done, err := r.consume(ctx, w, p, start)
		w.Stop()
		if done || err != nil {
			return d, err
		}
		werr = errors.New("watch ended")
	}
}

// consume reads a watch until the pod is Ready (done), fails (err), or the watch ends or
// errs (neither: open another).
func (r *run) consume(ctx context.Context, w watch.Interface, p *corev1.Pod, start time.Time) (time.Duration, bool, error) {
	for {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok || ev.Type == watch.Error {
				return 0, false, nil
			}
			got, ok := ev.Object.(*corev1.Pod)
			if !ok {
				continue
			}
			if framework.PodReady(got) {
				return time.Since(start), true, nil
			}
			if got.Status.Phase == corev1.PodFailed || got.Status.Phase == corev1.PodSucceeded {
				return 0, false, fmt.Errorf("pod %s/%s ended %s\n%s", p.Namespace, p.Name, got.Status.Phase, framework.DescribePod(r.ctx, r.cs, p.Namespace, p.Name))
			}
		case <-ctx.Done():
			return 0, false, fmt.Errorf("pod %s/%s not Ready: %w\n%s", p.Namespace, p.Name, ctx.Err(), framework.DescribePod(r.ctx, r.cs, p.Namespace, p.Name))
		}
	}
}

func (r *run) deleteAll(ps []*corev1.Pod) error {
	var wg sync.WaitGroup
	errs := make([]error, len(ps))
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = framework.DeletePod(r.ctx, r.cs, p.Namespace, p.Name)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func publishFilter(labels map[string]string) bool {
	op := strings.ToLower(labels["operation"])
	return strings.Contains(op, "publish") && !strings.Contains(op, "unpublish") && labels["grpc_code"] == "OK"
}

// publishFromLogs reads each NodePublishVolume's duration from the plugin's JSON log (the
// gRPC interceptor logs method, duration and pod for every call).
func (r *run) publishFromLogs() error {
	pod, err := r.d.NodePluginPod(r.ctx)
	if err != nil {
		return err
	}
	raw, err := r.cs.CoreV1().Pods(framework.Namespace).GetLogs(pod.Name, &corev1.PodLogOptions{Container: framework.NodeContainer}).DoRaw(r.ctx)
	if err != nil {
		return err
	}
	r.res.PublishLog = map[string][]float64{}
	for _, line := range strings.Split(string(raw), "\n") {
		if !strings.Contains(line, "NodePublishVolume") {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil {
			continue
		}
		if code, _ := m["code"].(string); code != "OK" {
			continue
		}
		podName, _ := m["pod"].(string)
		ns, _ := m["namespace"].(string)
		var secs float64
		switch v := m["duration"].(type) {
		case float64:
			secs = v / 1e9
		case string:
			d, err := time.ParseDuration(v)
			if err != nil {
				continue
			}
			secs = d.Seconds()
		default:
			continue
		}
		for arm, ans := range armNS {
			if ans == ns && strings.HasPrefix(podName, arm+"-") {
				r.res.PublishLog[arm] = append(r.res.PublishLog[arm], secs)
			}
		}
	}
	if len(r.res.PublishLog["csi-warm"]) == 0 {
		return errors.New("no NodePublishVolume line for the warm pods")
	}
	return nil
}

// du is what a directory tree holds on its filesystem: allocated blocks (du -x, each inode
// once), the bytes of its regular files, and how many there are.
type du struct {
	Blocks, FileBytes, Files int64
}

func (d du) add(o du) du {
	return du{d.Blocks + o.Blocks, d.FileBytes + o.FileBytes, d.Files + o.Files}
}
func (d du) sub(o du) du {
	return du{d.Blocks - o.Blocks, d.FileBytes - o.FileBytes, d.Files - o.Files}
}

// usage walks dir without crossing into other filesystems (mounts below it, such as a pod's
// overlay, are not counted).
func usage(dir string) du {
	var st syscall.Stat_t
	if err := syscall.Lstat(dir, &st); err != nil {
		return du{}
	}
	dev := st.Dev
	seen := map[uint64]bool{}
	var total du
	_ = filepath.WalkDir(dir, func(p string, de os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		var s syscall.Stat_t
		if syscall.Lstat(p, &s) != nil {
			return nil
		}
		if s.Dev != dev {
			if de.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if seen[s.Ino] {
			return nil
		}
		seen[s.Ino] = true
		total.Blocks += s.Blocks * 512
		if s.Mode&syscall.S_IFMT == syscall.S_IFREG {
			total.FileBytes += s.Size
			total.Files++
		}
		return nil
	})
	return total
}

func fsUsed(dir string) int64 {
	var st syscall.Statfs_t
	if syscall.Statfs(dir, &st) != nil {
		return 0
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

func meminfo() map[string]int64 {
	out := map[string]int64{}
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			out[strings.TrimSuffix(f[0], ":")] = v * 1024
		}
	}
	return out
}

// rss returns the resident set of the processes whose comm is name (summed).
func rss(name string) int64 {
	var total int64
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		comm, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != name {
			continue
		}
		st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status"))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(st), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				f := strings.Fields(v)
				if len(f) > 0 {
					n, _ := strconv.ParseInt(f[0], 10, 64)
					total += n * 1024
				}
			}
		}
	}
	return total
}

// admission measures pod-create latency through the API server: server-side dry-run creates
// (admission runs in full, nothing is stored or started) in an SSI namespace, where the
// webhook mutates, against a namespace its selectors skip; first one at a time, interleaved,
// then at a fixed rate.
func (r *run) admission(samples, rate, secs int) error {
	r.res.AdmSeq = map[string][]float64{}
	r.res.AdmRate = map[string]rateResult{}
	r.res.AdmUnexpected = map[string]int{}
	arms := []struct{ name, ns string }{{"webhook", nsWarm}, {"skipped", nsFloor}}
	// Let the node settle after the disk phase, then warm up connections.
	time.Sleep(10 * time.Second)
	for i := 0; i < 20; i++ {
		for _, a := range arms {
			_, _ = r.dryRun(a.ns, benchPod(a.ns, fmt.Sprintf("warmup-%d", i), ""))
		}
	}
	for i := 0; i < samples; i++ {
		for k := range arms {
			a := arms[(i+k)%2]
			start := time.Now()
			p, err := r.dryRun(a.ns, benchPod(a.ns, fmt.Sprintf("adm-%d", i), ""))
			if err != nil {
				return err
			}
			if (a.name == "webhook") != (framework.LibraryVolume(p) != nil) {
				// failurePolicy Ignore: a webhook timeout admits the pod unmutated.
				r.res.AdmUnexpected[a.name]++
			}
			r.res.AdmSeq[a.name] = append(r.res.AdmSeq[a.name], time.Since(start).Seconds())
		}
	}
	hookURLs := r.webhookMetricsURLs()
	for _, a := range arms {
		var h0 histDelta
		if a.name == "webhook" {
			h0 = sumHists(hookURLs)
		}
		res := r.loadTest(a.ns, rate, secs)
		if a.name == "webhook" {
			r.res.WebhookHist = sumHists(hookURLs).sub(h0)
		}
		r.res.AdmRate[a.name] = res
		r.logf("admission at %d/s for %ds (%s): %d sent, %d errors, achieved %.0f/s, p50 %s p99 %s", rate, secs, a.name, res.Sent, res.Errors, res.Achieved,
			bench.FmtSeconds(bench.Percentile(res.Lat, 50)), bench.FmtSeconds(bench.Percentile(res.Lat, 99)))
		time.Sleep(2 * time.Second)
	}
	return nil
}

func (r *run) webhookMetricsURLs() []string {
	pods, err := r.d.WebhookPods(r.ctx)
	if err != nil {
		return nil
	}
	var out []string
	for _, p := range pods {
		if p.Status.PodIP != "" && p.DeletionTimestamp == nil {
			out = append(out, "http://"+p.Status.PodIP+":8080/metrics")
		}
	}
	return out
}

func sumHists(urls []string) histDelta {
	var h histDelta
	for _, u := range urls {
		x, err := scrapeHist(u, "apm_csi_webhook_mutation_duration_seconds", func(map[string]string) bool { return true })
		if err == nil {
			h = h.add(x)
		}
	}
	return h
}

// loadTest sends dry-run creates at rate per second for secs seconds (open loop: a create is
// started every 1/rate s whatever the latency, up to 1000 in flight).
func (r *run) loadTest(ns string, rate, secs int) rateResult {
	res := rateResult{Target: rate, Seconds: float64(secs)}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 1000)
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	begin := time.Now()
	total := rate * secs
	for i := 0; i < total; i++ {
		<-tick.C
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			start := time.Now()
			got, err := r.dryRun(ns, benchPod(ns, fmt.Sprintf("load-%d", i), ""))
			d := time.Since(start).Seconds()
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				res.Errors++
				return
			}
			if ns == nsWarm && framework.LibraryVolume(got) == nil {
				res.Unmutated++
			}
			res.Lat = append(res.Lat, d)
		}()
	}
	wg.Wait()
	res.Sent = total
	res.Achieved = float64(total) / time.Since(begin).Seconds()
	return res
}

// scrapeHist reads a Prometheus histogram from a /metrics page, summing the series that
// keep accepts.
func scrapeHist(url, name string, keep func(map[string]string) bool) (histDelta, error) {
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return histDelta{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return histDelta{}, err
	}
	sums := map[float64]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		rest, ok := strings.CutPrefix(line, name+"_bucket{")
		if !ok {
			continue
		}
		lbl, val, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		labels := map[string]string{}
		for _, kv := range strings.Split(lbl, ",") {
			k, v, _ := strings.Cut(kv, "=")
			labels[k] = strings.Trim(v, `"`)
		}
		if !keep(labels) {
			continue
		}
		le, err := strconv.ParseFloat(labels["le"], 64)
		if err != nil {
			continue
		}
		n, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if err != nil {
			continue
		}
		sums[le] += n
	}
	var h histDelta
	for _, b := range slices.Sorted(func(yield func(float64) bool) {
		for k := range sums {
			if !yield(k) {
				return
			}
		}
	}) {
		h.Bounds = append(h.Bounds, b)
		h.Cum = append(h.Cum, sums[b])
	}
	return h, nil
}

func (h histDelta) add(o histDelta) histDelta {
	if len(h.Bounds) == 0 {
		return histDelta{Bounds: slices.Clone(o.Bounds), Cum: slices.Clone(o.Cum)}
	}
	if len(o.Bounds) != len(h.Bounds) {
		return h
	}
	out := histDelta{Bounds: slices.Clone(h.Bounds), Cum: slices.Clone(h.Cum)}
	for i := range out.Cum {
		out.Cum[i] += o.Cum[i]
	}
	return out
}

func (h histDelta) sub(o histDelta) histDelta {
	if len(o.Bounds) != len(h.Bounds) {
		return h
	}
	out := histDelta{Bounds: slices.Clone(h.Bounds), Cum: slices.Clone(h.Cum)}
	for i := range out.Cum {
		out.Cum[i] -= o.Cum[i]
	}
	return out
}

func (h histDelta) count() float64 {
	if len(h.Cum) == 0 {
		return 0
	}
	return h.Cum[len(h.Cum)-1]
}

func uncompressedSize(l bench.Library) (int64, error) {
	layers, err := l.Image.Layers()
	if err != nil {
		return 0, err
	}
	var total int64
	for _, layer := range layers {
		rc, err := layer.Uncompressed()
		if err != nil {
			return 0, err
		}
		n, err := io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return 0, err
		}
		total += n
	}
	return total, nil
}

func (r *run) collectInfo() error {
	res := &r.res
	res.Date = time.Now().UTC().Format("2006-01-02 15:04 MST")
	res.GoVersion = runtime.Version()
	res.NProc = runtime.NumCPU()
	res.MemTotal = meminfo()["MemTotal"]
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		res.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				res.CPU = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	if v, err := r.cs.Discovery().ServerVersion(); err == nil {
		res.KubernetesVersion = v.GitVersion
	}
	if n, err := r.cs.CoreV1().Nodes().Get(r.ctx, r.c.NodeName(), metav1.GetOptions{}); err == nil {
		res.ContainerRuntime = n.Status.NodeInfo.ContainerRuntimeVersion
		if res.Kernel == "" {
			res.Kernel = n.Status.NodeInfo.KernelVersion
		}
	}
	if out, err := exec.Command("git", "rev-parse", "--short=12", "HEAD").Output(); err == nil {
		res.GitRevision = strings.TrimSpace(string(out))
		if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(strings.TrimSpace(string(st))) > 0 {
			res.GitRevision += " (with uncommitted changes)"
		}
	}
	return nil
}

// removeLibraryImages deletes the library images containerd pulled during the run (their
// references name this run's registry port, so no later run reuses them; the image store
// outlives the cluster).
func (r *run) removeLibraryImages() {
	if len(r.libs) == 0 {
		return
	}
	if err := r.removeLibraryRecords(); err != nil {
		r.logf("removing the library images from containerd: %v", err)
	}
}

func firstLine(err error) string {
	s, _, _ := strings.Cut(err.Error(), "\n")
	return s
}

// histJSON is histDelta in JSON, which has no infinity: bounds as strings ("+Inf").
type histJSON struct {
	Bounds []string
	Cum    []float64
}

func (h histDelta) MarshalJSON() ([]byte, error) {
	j := histJSON{Cum: h.Cum}
	for _, b := range h.Bounds {
		j.Bounds = append(j.Bounds, strconv.FormatFloat(b, 'g', -1, 64))
	}
	return json.Marshal(j)
}

func (h *histDelta) UnmarshalJSON(data []byte) error {
	var j histJSON
	if err := json.Unmarshal(data, &j); err != nil {
		return err
	}
	h.Bounds, h.Cum = nil, j.Cum
	for _, s := range j.Bounds {
		b, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return err
		}
		h.Bounds = append(h.Bounds, b)
	}
	return nil
}
