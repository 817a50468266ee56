// Command apm-csi-demo is `make demo`: it starts the local cluster (or reuses the one running),
// installs apm-csi with its Helm chart, labels a namespace for single step instrumentation,
// runs a Node.js application whose image has no tracer, and prints what happened: the pod as
// submitted and as admitted, the CSI volume and its mount on the node, the library cache, and
// the traces the real dd-trace sent to a small trace intake. See docs/demo.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/localcluster"
	"github.com/apm-csi/apm-csi/test/tracer"
)

const (
	demoNamespace = "apm-demo"
	demoApp       = "demo-app"
	demoService   = "apm-csi-demo"
	// intakePort is the Datadog Agent's trace port; another is used if it is taken.
	intakePort = 8126
)

func main() {
	root := flag.String("root", envOr("APM_CSI_CLUSTER_ROOT", localcluster.DefaultRoot), "local cluster root (env APM_CSI_CLUSTER_ROOT)")
	imagesDir := flag.String("images", "_output/images", "directory with the apm-csi-node.tar and apm-csi-webhook.tar image tarballs (`make images`)")
	clusterCLI := flag.String("localcluster", "bin/localcluster", "the localcluster CLI, which serves the cluster's registry after this program exits")
	timeout := flag.Duration("timeout", 20*time.Minute, "give up after this long")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	if err := run(ctx, *root, *imagesDir, *clusterCLI); err != nil {
		fmt.Fprintf(os.Stderr, "\nmake demo failed: %v\n", err)
		os.Exit(1)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// out is where the walkthrough goes; progress details go to stderr.
var out io.Writer = os.Stdout

// colour is on when the walkthrough goes to a terminal.
var colour = func() bool {
	st, err := os.Stdout.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}()

func paint(code, s string) string {
	if !colour {
		return s
	}
	return "\033[" + code + "m" + s + "\033[0m"
}

func section(n int, title string) {
	fmt.Fprintf(out, "\n%s\n", paint("1", fmt.Sprintf("== %d. %s ==", n, title)))
}

func say(format string, args ...any) { fmt.Fprintf(out, format+"\n", args...) }

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = prefix + l
	}
	return strings.Join(lines, "\n")
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "  %s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

func run(ctx context.Context, root, imagesDir, clusterCLI string) error {
	if os.Geteuid() != 0 {
		return errors.New("the local cluster needs root: run `sudo make demo`")
	}
	wd, err := os.Getwd()
	if err != nil {
		return err
	}
	repoRoot, err := localcluster.FindRepoRoot(wd)
	if err != nil {
		return err
	}
	begin := time.Now()

	section(1, "A local single-node Kubernetes cluster")
	c, reused, err := cluster(ctx, root, clusterCLI)
	if err != nil {
		return err
	}
	cs, err := c.Clientset()
	if err != nil {
		return err
	}
	if reused {
		say("Reusing the cluster already running under %s.", c.Root())
	}
	say("etcd, kube-apiserver, controller-manager, scheduler, kube-proxy, kubelet and containerd run on this machine.")
	say("  node %s, IP %s (the pod bridge), kubelet dir %s", c.NodeName(), c.NodeIP(), c.KubeletDir())
	say("  library image registry on %s (loopback; the node plugin runs on the host network)", c.RegistryAddr())

	section(2, "Images")
	node, err := tracer.FindNode(ctx)
	if err != nil {
		return err
	}
	for _, b := range []string{names.NodeBinary, names.WebhookBinary} {
		tb := filepath.Join(imagesDir, b+".tar")
		if _, err := os.Stat(tb); err != nil {
			return fmt.Errorf("%s: %w (run `make build images` first)", tb, err)
		}
		if err := c.ImportImage(ctx, tb); err != nil {
			return err
		}
	}
	say("apm-csi:     %s and %s, built by `make build images` and imported into containerd.", framework.NodeImageRef, framework.WebhookImageRef)
	app, err := tracer.AppImage(ctx, node)
	if err != nil {
		return err
	}
	if err := c.ImportImage(ctx, app); err != nil {
		return err
	}
	say("application: %s: Node.js %s (Debian package %q) and a small HTTP server. No tracer in it.", tracer.AppRef, node.Version, node.Package)
	ddTrace, err := tracer.InstallDDTrace(ctx, logf)
	if err != nil {
		return err
	}
	lib, err := tracer.LibraryImage(ctx, ddTrace)
	if err != nil {
		return err
	}
	prefix := c.RegistryAddr() + "/datadoghq"
	libRef := prefix + "/" + tracer.JSLibraryPackage + ":" + tracer.DDTraceVersion
	tag, err := name.NewTag(libRef)
	if err != nil {
		return err
	}
	if err := remote.Write(tag, lib, remote.WithContext(ctx)); err != nil {
		return fmt.Errorf("push %s: %w", libRef, err)
	}
	say("tracer:      %s: dd-trace %s installed with npm, in Datadog's dd-lib-js-init layout", libRef, tracer.DDTraceVersion)
	say("             (/datadog-init/package/node_modules/dd-trace), pushed to the cluster's registry.")

	section(3, "Install apm-csi with its Helm chart")
	d, err := framework.Deploy(ctx, c, framework.Options{
		RepoRoot:        repoRoot,
		LibraryRegistry: c.RegistryAddr(),
		LibraryPrefix:   prefix,
		Languages:       map[string]string{"js": tracer.DDTraceVersion},
		WebhookReplicas: 1,
		Logf:            logf,
	})
	if err != nil {
		return err
	}
	values, _ := os.ReadFile(filepath.Join(c.Root(), "run", "apm-csi-values.yaml"))
	say("helm upgrade --install %s deploy/helm/apm-csi -n %s --values <<EOF", framework.Release, framework.Namespace)
	say("%s\nEOF", indent(string(values), "  "))
	say("The node plugin (DaemonSet) registered %s with kubelet; the webhook's TLS is self-managed;", names.DriverName)
	say("the direct layout is used (no apm-inject image here): libraries at /datadog-lib, NODE_OPTIONS for Node.js.")

	section(4, "Label a namespace for single step instrumentation")
	if err := framework.DeleteNamespace(ctx, cs, demoNamespace); err != nil {
		return err
	}
	if err := framework.EnsureNamespace(ctx, c, demoNamespace, map[string]string{framework.SSILabel: "enabled"}); err != nil {
		return err
	}
	say("kubectl create namespace %s && kubectl label namespace %s %s=enabled", demoNamespace, demoNamespace, framework.SSILabel)

	intake, err := tracer.StartIntake(net.JoinHostPort(c.NodeIP(), strconv.Itoa(intakePort)))
	if err != nil {
		if intake, err = tracer.StartIntake(net.JoinHostPort(c.NodeIP(), "0")); err != nil {
			return err
		}
	}
	defer intake.Close()

	section(5, "Start the application, unmodified")
	dep := deployment(intake.URL())
	if _, err := cs.AppsV1().Deployments(demoNamespace).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		return err
	}
	submitted := &corev1.Pod{ObjectMeta: dep.Spec.Template.ObjectMeta, Spec: dep.Spec.Template.Spec}
	say("Deployment %s/%s, pod template as submitted (the relevant part):", demoNamespace, demoApp)
	submittedView := podView(submitted)
	say("%s", indent(submittedView, "  "))
	say("DD_TRACE_AGENT_URL points at a small trace intake this program runs on the node IP, standing in for the Datadog Agent.")

	pod, err := waitDeploymentPod(ctx, d)
	if err != nil {
		return err
	}

	section(6, "The pod as admitted: the webhook's changes")
	admittedView := podView(pod)
	say("Lines the apm-csi webhook added (+) or changed (-/+), nothing else:")
	say("%s", indent(lineDiff(submittedView, admittedView), "  "))
	say("One CSI inline volume replaces emptyDir + init container: no init container ran, nothing was copied.")

	section(7, "The volume on the node")
	mounts, err := framework.Mounts()
	if err != nil {
		return err
	}
	target := framework.CSIMountDir(c.KubeletDir(), pod.UID, framework.LibraryVolumeName)
	at := framework.MountsAt(mounts, target)
	if len(at) != 1 {
		return fmt.Errorf("%d mounts at %s, want 1", len(at), target)
	}
	m := at[0]
	say("kubelet called NodePublishVolume; the node plugin mounted, at the target kubelet gave it:")
	say("  %s", m.MountPoint)
	say("  type %s, options %s", m.FSType, m.Options)
	for i, l := range m.LowerDirs() {
		say("  lower %d (shared, read-only, content-addressed): %s", i, l)
	}
	if u, ok := m.Option("upperdir"); ok {
		say("  upper   (this pod's private writable layer):   %s", u)
	}
	say("(from /proc/self/mountinfo; the container sees it at %s)", framework.LibraryMountPath)

	section(8, "The library cache on the node")
	if err := printCache(d.StateDir); err != nil {
		return err
	}
	say("Every pod on this node that needs dd-trace %s gets an overlay on the same lower dir: one download, one copy.", tracer.DDTraceVersion)

	section(9, "Traces")
	var info struct {
		Loaded  bool   `json:"loaded"`
		From    string `json:"from"`
		Version string `json:"version"`
		Node    string `json:"node"`
	}
	base := "http://" + net.JoinHostPort(pod.Status.PodIP, strconv.Itoa(tracer.AppPort))
	if err := getJSON(ctx, base+"/tracer", &info); err != nil {
		return err
	}
	say("GET %s/tracer -> dd-trace loaded: %v, version %s, from %s (node %s)", base, info.Loaded, info.Version, info.From, info.Node)
	for range 5 {
		if err := getJSON(ctx, base+"/", nil); err != nil {
			return err
		}
	}
	say("GET %s/ five times (each request calls /backend over HTTP).", base)
	waitCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if _, err := intake.WaitForSpans(waitCtx, func(s tracer.Span) bool {
		return s.Service == demoService && s.Meta["span.kind"] == "client"
	}); err != nil {
		return err
	}
	spans := intake.Spans()
	spans = slices.DeleteFunc(spans, func(s tracer.Span) bool {
		return s.Service != demoService || strings.HasSuffix(s.Meta["http.url"], "/healthz") || strings.HasSuffix(s.Meta["http.url"], "/tracer")
	})
	// Traces in the order they started, each trace's spans in the order they started.
	traceStart := map[uint64]int64{}
	for _, s := range spans {
		if t, ok := traceStart[s.TraceID]; !ok || s.Start < t {
			traceStart[s.TraceID] = s.Start
		}
	}
	sort.SliceStable(spans, func(i, j int) bool {
		ti, tj := traceStart[spans[i].TraceID], traceStart[spans[j].TraceID]
		if ti != tj {
			return ti < tj
		}
		return spans[i].Start < spans[j].Start
	})
	var paths []string
	for _, r := range intake.Requests() {
		if r.Spans > 0 && !slices.Contains(paths, r.Path) {
			paths = append(paths, r.Path)
		}
	}
	say("The intake on %s received %d spans of service %s on %s, from %s:", intake.Addr(), len(spans), demoService, strings.Join(paths, ", "), tracerOf(intake))
	say("%s", indent(tracer.FormatSpans(spans), "  "))

	section(10, "Explore, then clean up")
	say("export KUBECONFIG=%s", c.Kubeconfig())
	say("alias kubectl=%s", filepath.Join(c.BinDir(), "kubectl"))
	for _, l := range [][2]string{
		{fmt.Sprintf("kubectl -n %s get pod %s -o yaml", demoNamespace, pod.Name), "the admitted pod"},
		{fmt.Sprintf("kubectl -n %s describe pod %s", demoNamespace, pod.Name), "the webhook's event, the volume"},
		{fmt.Sprintf("kubectl -n %s exec %s -- ls /datadog-lib/node_modules", demoNamespace, pod.Name), "the tracer, as the app sees it"},
		{fmt.Sprintf("kubectl -n %s logs ds/%s", framework.Namespace, framework.NodeDaemonSet), "the node plugin's CSI calls"},
		{fmt.Sprintf("ls %s/store", d.StateDir), "the library cache"},
		{fmt.Sprintf("kubectl -n %s scale deploy/%s --replicas=3", demoNamespace, demoApp), "more pods, no new download"},
	} {
		say("%-80s # %s", l[0], l[1])
	}
	say("The trace intake stopped with this program; the application keeps running (its tracer just finds no agent).")
	say("make demo-down   # removes the cluster and everything it created")
	say("\nmake demo took %s.", time.Since(begin).Round(time.Second))
	return nil
}

// cluster attaches to a healthy cluster under root or starts one whose registry is served by
// the localcluster CLI, so that it outlives this program.
func cluster(ctx context.Context, root, clusterCLI string) (*localcluster.Cluster, bool, error) {
	if c, err := localcluster.Attach(root); err == nil && c.Healthy(ctx) {
		return c, true, nil
	}
	cli, err := filepath.Abs(clusterCLI)
	if err != nil {
		return nil, false, err
	}
	if _, err := os.Stat(cli); err != nil {
		return nil, false, fmt.Errorf("%s: %w (go build -o bin/localcluster ./test/localcluster/cmd/localcluster)", cli, err)
	}
	start := time.Now()
	c, err := localcluster.Up(ctx, localcluster.Options{Root: root, RegistryExecutable: cli, Logf: logf})
	if err != nil {
		return nil, false, err
	}
	say("Started in %s under %s (the Kubernetes binaries are built once through the Go module proxy and cached).", time.Since(start).Round(100*time.Millisecond), c.Root())
	return c, false, nil
}

// deployment is the demo application: a plain Deployment; nothing in it mentions a tracer
// except where to send traces.
func deployment(agentURL string) *appsv1.Deployment {
	labels := map[string]string{"app": demoApp}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: demoApp, Namespace: demoNamespace},
		Spec: appsv1.DeploymentSpec{
			Replicas: framework.Ptr[int32](1),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					Containers: []corev1.Container{{
						Name:  "app",
						Image: tracer.AppRef,
						Env: []corev1.EnvVar{
							{Name: "DD_SERVICE", Value: demoService},
							{Name: "DD_ENV", Value: "demo"},
							{Name: "DD_TRACE_AGENT_URL", Value: agentURL},
							{Name: "DD_INSTRUMENTATION_TELEMETRY_ENABLED", Value: "false"},
							{Name: "DD_REMOTE_CONFIGURATION_ENABLED", Value: "false"},
						},
						Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: tracer.AppPort}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(tracer.AppPort)}},
							PeriodSeconds: 2,
						},
					}},
					TerminationGracePeriodSeconds: framework.Ptr[int64](5),
				},
			},
		},
	}
}

func waitDeploymentPod(ctx context.Context, d *framework.Deployment) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := framework.Poll(ctx, 5*time.Minute, "the demo pod to be Ready", func() (bool, error) {
		l, err := d.Client.CoreV1().Pods(demoNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app=" + demoApp})
		if err != nil {
			return false, nil
		}
		for i := range l.Items {
			if framework.PodReady(&l.Items[i]) {
				pod = &l.Items[i]
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil && pod == nil {
		l, _ := d.Client.CoreV1().Pods(demoNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app=" + demoApp})
		for _, p := range l.Items {
			err = fmt.Errorf("%w\n%s", err, framework.DescribePod(ctx, d.Client, p.Namespace, p.Name))
		}
	}
	return pod, err
}

// podView renders what the webhook may change in a pod: apm-csi annotations, init containers,
// the containers' env and mounts, and the volumes (without the service account token volume
// that the API server adds to every pod, and without labels, which the ReplicaSet sets).
func podView(p *corev1.Pod) string {
	type container struct {
		Name         string               `json:"name"`
		Image        string               `json:"image"`
		Env          []corev1.EnvVar      `json:"env,omitempty"`
		VolumeMounts []corev1.VolumeMount `json:"volumeMounts,omitempty"`
	}
	view := func(cs []corev1.Container) []container {
		var outs []container
		for _, c := range cs {
			mounts := slices.DeleteFunc(slices.Clone(c.VolumeMounts), func(m corev1.VolumeMount) bool {
				return strings.HasPrefix(m.Name, "kube-api-access-")
			})
			outs = append(outs, container{Name: c.Name, Image: c.Image, Env: c.Env, VolumeMounts: mounts})
		}
		return outs
	}
	metadata, spec := map[string]any{}, map[string]any{}
	annotations := map[string]string{}
	for k, v := range p.Annotations {
		if strings.HasPrefix(k, "apm-csi.io/") {
			annotations[k] = v
		}
	}
	if len(annotations) > 0 {
		metadata["annotations"] = annotations
	}
	if ics := view(p.Spec.InitContainers); len(ics) > 0 {
		spec["initContainers"] = ics
	}
	spec["containers"] = view(p.Spec.Containers)
	volumes := slices.DeleteFunc(slices.Clone(p.Spec.Volumes), func(v corev1.Volume) bool {
		return strings.HasPrefix(v.Name, "kube-api-access-")
	})
	if len(volumes) > 0 {
		spec["volumes"] = volumes
	}
	v := map[string]any{"spec": spec}
	if len(metadata) > 0 {
		v["metadata"] = metadata
	}
	b, err := yaml.Marshal(v)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// lineDiff returns b's lines with "+ " before lines not in a (longest common subsequence),
// "- " lines of a missing from b, and "  " before the others.
func lineDiff(a, b string) string {
	x := strings.Split(strings.TrimRight(a, "\n"), "\n")
	y := strings.Split(strings.TrimRight(b, "\n"), "\n")
	lcs := make([][]int, len(x)+1)
	for i := range lcs {
		lcs[i] = make([]int, len(y)+1)
	}
	for i := len(x) - 1; i >= 0; i-- {
		for j := len(y) - 1; j >= 0; j-- {
			if x[i] == y[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var outLines []string
	i, j := 0, 0
	for i < len(x) || j < len(y) {
		switch {
		case i < len(x) && j < len(y) && x[i] == y[j]:
			outLines = append(outLines, "  "+x[i])
			i, j = i+1, j+1
		case j < len(y) && (i == len(x) || lcs[i][j+1] >= lcs[i+1][j]):
			outLines = append(outLines, paint("32", "+ "+y[j]))
			j++
		default:
			outLines = append(outLines, paint("31", "- "+x[i]))
			i++
		}
	}
	return strings.Join(outLines, "\n")
}

// printCache lists the libraries in the node plugin's cache with their size.
func printCache(stateDir string) error {
	store := filepath.Join(stateDir, "store")
	say("%s  (the node plugin's --state-dir/store)", store)
	for _, kind := range []string{"images", "views", "generated"} {
		entries, err := framework.Entries(filepath.Join(store, kind))
		if err != nil {
			return err
		}
		for _, e := range entries {
			dir := filepath.Join(store, kind, e)
			files, size, err := framework.DirUsage(dir)
			if err != nil {
				return err
			}
			desc := ""
			if data, err := os.ReadFile(filepath.Join(dir, "entry.json")); err == nil {
				desc = entrySummary(data)
			}
			say("  %-10s %s  %6d files %10s  %s", kind+"/", shortHash(e), files, framework.HumanBytes(size), desc)
		}
	}
	for _, d := range []string{"volumes", "overlays"} {
		entries, err := framework.Entries(filepath.Join(stateDir, d))
		if err != nil {
			return err
		}
		say("%s/%s: %d entries (one per published volume)", stateDir, d, len(entries))
	}
	return nil
}

func shortHash(s string) string {
	if len(s) > 19 {
		return s[:19] + "…"
	}
	return s
}

// entrySummary picks the image reference out of a cache entry's metadata, whatever its
// exact shape: the first string value that looks like an image reference.
func entrySummary(data []byte) string {
	var m map[string]any
	if yaml.Unmarshal(data, &m) != nil {
		return ""
	}
	var refs []string
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			keys := make([]string, 0, len(x))
			for k := range x {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				walk(x[k])
			}
		case []any:
			for _, e := range x {
				walk(e)
			}
		case string:
			if strings.Contains(x, "/") && (strings.Contains(x, ":") || strings.Contains(x, "@")) && !strings.HasPrefix(x, "/") {
				refs = append(refs, x)
			}
		}
	}
	walk(m)
	if len(refs) == 0 {
		return ""
	}
	return refs[0]
}

func getJSON(ctx context.Context, url string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	if v == nil {
		return nil
	}
	return json.Unmarshal(body, v)
}

func tracerOf(in *tracer.Intake) string {
	for _, r := range in.Requests() {
		if r.Tracer != "" {
			return r.Tracer
		}
	}
	return "an unidentified tracer"
}
