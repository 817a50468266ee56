package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/images"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/localcluster"
	"github.com/apm-csi/apm-csi/test/testenv"
	"github.com/apm-csi/apm-csi/test/tracer"
)

// Host directories the node plugin allowlists for the scenarios (chart value node.hostDirs).
const (
	// dataEntry is a writable directory that outlives pods (the proof of concept's demo).
	dataEntry = "e2e-data"
	// sharedEntry is a read-only directory an agent sidecar in the node plugin's pod writes.
	sharedEntry = "agent-shared"
	// sharedNamespace is where the read-only hostdir scenario reads sharedEntry.
	sharedNamespace = "e2e-shared"
	// bypassNamespace is listed in the admission policy (hostdir volumes may appear there) but
	// in no entry's namespaces: the node plugin must refuse it.
	bypassNamespace = "e2e-tenancy-bypass"
	// deniedNamespace is listed nowhere: the admission policy refuses hostdir volumes there.
	deniedNamespace = "e2e-tenancy-denied"
	// uncachedTag is a JavaScript library version only the registry-down scenario uses.
	uncachedTag = "e2e-uncached"
	// libraryRepo is the repository prefix of the Datadog images in the library registry.
	libraryRepo = "datadoghq"
	// gcGracePeriod keeps unused libraries this long, short so that the pod-churn scenario can
	// see the cache emptied once every pod is gone.
	gcGracePeriod = "20s"
	// keepEnv, when set, leaves the cluster running after a failure.
	keepEnv = "APM_CSI_E2E_KEEP"
)

// dataEntryNamespaces may use dataEntry (the hostdir and kubelet-restart scenarios).
var dataEntryNamespaces = []string{"e2e-hostdir", "e2e-kubelet"}

// env is the shared state of the end-to-end run: one cluster with apm-csi, the library
// registry, the trace intake.
type env struct {
	c      *localcluster.Cluster
	cs     kubernetes.Interface
	d      *framework.Deployment
	reg    *libimages.Registry
	intake *tracer.Intake
	// jsImage is the real dd-lib-js-init image; jsRef its tag reference in the registry.
	jsImage v1.Image
	jsRef   string
	repo    string // libraryRepo/dd-lib-js-init, as the registry counts requests
	dataDir string
	shared  string
}

// TestEndToEnd runs every scenario on one real single-node cluster (etcd, kube-apiserver,
// controller-manager, scheduler, kube-proxy, kubelet, containerd) with apm-csi installed from
// the Helm chart, and tears the cluster down at the end. Each scenario is a subtest named by the
// behaviour it checks (select some with -run 'TestEndToEnd/registry_down'); the pod-churn
// scenario runs last: it deletes every pod and checks that nothing is left behind.
func TestEndToEnd(t *testing.T) {
	testenv.RequireRoot(t)
	ctx, cancel := testContext(t)
	defer cancel()
	e := setUp(t, ctx)

	// Each scenario uses its own namespace and starts deleting it when done; the pod-churn
	// scenario waits for all of them to be gone.
	scenarios := []struct {
		name string
		run  func(*testing.T, context.Context, *env)
	}{
		{"SSI namespace: unmodified pods get the library volume, its files and env; their writes stay private", scenarioSSI},
		{"real tracer: dd-trace from the CSI volume reports spans to the intake", scenarioRealTracer},
		{"real tracer: dd-trace from image volumes reports spans to the intake", scenarioImageVolumeTracer},
		{"Datadog init-container injection is rewritten to the CSI volume", scenarioRewrite},
		{"datadog drop-in: pods as the Cluster Agent's csi mode writes them run with the real tracer", scenarioDatadogDropIn},
		{"opentelemetry: the operator's Node.js injection is rewritten to the CSI volume and still reports OTLP spans", scenarioOTelRewrite},
		{"hostdir volume keeps a file across pod re-creation", scenarioHostDir},
		{"read-only hostdir entry serves a sidecar's data through a ReadOnlyMany PV and PVC", scenarioSharedPV},
		{"invalid manual annotation is refused with the webhook's message", scenarioInvalidAnnotation},
		{"hostdir volume in a namespace the admission policy does not list is refused at admission", scenarioHostDirRefusedAtAdmission},
		{"hand-written hostdir volume for another namespace's entry is refused by the node plugin", scenarioHostDirTenancyAtMount},
		{"Pod Security restricted admits the instrumented pod", scenarioRestricted},
		{"auto mode falls back CSI, image volumes, init containers and returns to CSI", scenarioAutoFallback},
		{"webhook down: pods are created unmutated and instrumented again once it is back", scenarioWebhookDown},
		{"webhook down: uninstrumented pods are reported and their Deployment restarted once", scenarioDriftRestart},
		{"registry down: cached libraries still start pods, uncached ones wait for it", scenarioRegistryDown},
		{"kubelet restart keeps exactly one mount per volume", scenarioKubeletRestart},
		{"node reboot: pods come back with their libraries", scenarioNodeReboot},
		{"cert-manager issues and renews the webhook certificate under pod creation load", scenarioCertManager},
		{"node plugin killed during pod churn leaves nothing behind once every pod is deleted", scenarioChurn},
	}
	for _, s := range scenarios {
		start := time.Now()
		t.Run(s.name, func(t *testing.T) { s.run(t, ctx, e) })
		t.Logf("MEASURE scenario %q: %s", s.name, time.Since(start).Round(100*time.Millisecond))
	}
}

// testContext ends three minutes before the test binary's deadline, so that a scenario that
// hangs fails with its own message and the cluster is still torn down.
func testContext(t *testing.T) (context.Context, context.CancelFunc) {
	if dl, ok := t.Deadline(); ok {
		return context.WithDeadline(context.Background(), dl.Add(-3*time.Minute))
	}
	return context.WithTimeout(context.Background(), 40*time.Minute)
}

func measure(t *testing.T, what string, start time.Time) {
	t.Logf("MEASURE %s: %s", what, time.Since(start).Round(100*time.Millisecond))
}

// setUp starts the cluster, builds and loads the images, starts the library registry and the
// trace intake, and installs apm-csi.
func setUp(t *testing.T, ctx context.Context) *env {
	t.Helper()
	begin := time.Now()
	node, err := tracer.FindNode(ctx)
	if err != nil {
		testenv.Missing(t, "%v", err)
	}
	t.Logf("Node.js %s from %q at %s; dd-trace %s", node.Version, node.Package, node.Binary, tracer.DDTraceVersion)
	repoRoot, err := localcluster.FindRepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}

	// Build everything that does not need the cluster while it starts.
	type built struct {
		project []string
		app     string
		lib     v1.Image
		err     error
	}
	buildDone := make(chan built, 1)
	buildDir := t.TempDir()
	go func() {
		var b built
		start := time.Now()
		if b.project, b.err = framework.ProjectImages(ctx, repoRoot, buildDir); b.err != nil {
			buildDone <- b
			return
		}
		t.Logf("MEASURE build apm-csi-node and apm-csi-webhook images: %s", time.Since(start).Round(100*time.Millisecond))
		start = time.Now()
		var ddTrace string
		if ddTrace, b.err = tracer.InstallDDTrace(ctx, t.Logf); b.err != nil {
			buildDone <- b
			return
		}
		if b.lib, b.err = tracer.LibraryImage(ctx, ddTrace); b.err != nil {
			buildDone <- b
			return
		}
		b.app, b.err = tracer.AppImage(ctx, node)
		t.Logf("MEASURE dd-trace install, library and app images (cached after the first run): %s", time.Since(start).Round(100*time.Millisecond))
		buildDone <- b
	}()

	start := time.Now()
	c, err := localcluster.Up(ctx, localcluster.Options{Root: os.Getenv("APM_CSI_CLUSTER_ROOT"), Logf: t.Logf})
	if err != nil {
		<-buildDone
		t.Fatalf("cluster up: %v", err)
	}
	measure(t, "cluster up", start)
	t.Cleanup(func() {
		if t.Failed() && os.Getenv(keepEnv) != "" {
			t.Logf("%s is set: the cluster is left running for inspection (KUBECONFIG=%s); tear it down with `make cluster-down`", keepEnv, c.Kubeconfig())
			return
		}
		start := time.Now()
		downCtx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if err := c.Down(downCtx); err != nil {
			t.Errorf("cluster down: %v", err)
		}
		measure(t, "cluster down", start)
	})
	cs, err := c.Clientset()
	if err != nil {
		t.Fatal(err)
	}
	e := &env{c: c, cs: cs, dataDir: c.HostPathDir(dataEntry), shared: c.HostPathDir(sharedEntry)}
	t.Cleanup(func() {
		if t.Failed() {
			dumpDiagnostics(t, e)
		}
	})

	b := <-buildDone
	if b.err != nil {
		t.Fatal(b.err)
	}
	start = time.Now()
	for _, tb := range append(b.project, b.app) {
		if err := c.ImportImage(ctx, tb); err != nil {
			t.Fatal(err)
		}
	}
	measure(t, "image import", start)

	// The library registry: the node plugin (host network) pulls from it on 127.0.0.1. It is
	// the test's own so that the registry-down scenario can stop and restart it.
	start = time.Now()
	e.reg = libimages.NewRegistry()
	if err := e.reg.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.reg.Stop() })
	e.repo = libraryRepo + "/" + tracer.JSLibraryPackage
	e.jsImage = b.lib
	if _, err := e.reg.Push(e.repo, tracer.DDTraceVersion, b.lib); err != nil {
		t.Fatal(err)
	}
	e.jsRef = e.reg.Repo(e.repo) + ":" + tracer.DDTraceVersion
	small, err := libimages.Library("js", uncachedTag)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.Push(e.repo, uncachedTag, small); err != nil {
		t.Fatal(err)
	}
	measure(t, "push library images", start)

	// The trace intake listens on the node IP, where pods reach the host.
	if e.intake, err = tracer.StartIntake(c.NodeIP() + ":0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.intake.Close() })

	start = time.Now()
	e.d, err = framework.Deploy(ctx, c, framework.Options{
		RepoRoot:        repoRoot,
		LibraryRegistry: e.reg.Addr(),
		LibraryPrefix:   e.reg.Repo(libraryRepo),
		Languages:       map[string]string{"js": tracer.DDTraceVersion},
		HostDirs: []framework.HostDir{
			{Name: dataEntry, Path: e.dataDir, Create: true, Namespaces: dataEntryNamespaces},
			{Name: sharedEntry, Path: e.shared, ReadOnly: true, Namespaces: []string{sharedNamespace}},
		},
		// The admission policy admits `type: hostdir` volumes where the scenarios use them,
		// and in bypassNamespace, where the entry's own tenancy must stop them.
		HostDirNamespaces: append(append([]string{sharedNamespace}, dataEntryNamespaces...), bypassNamespace),
		GCGracePeriod:     gcGracePeriod,
		WebhookReplicas:   1,
		Logf:              t.Logf,
	})
	if err != nil {
		t.Fatalf("deploy apm-csi: %v", err)
	}
	measure(t, "helm install apm-csi until the webhook mutates pods", start)
	start = time.Now()
	if err := addAgentSidecar(ctx, e); err != nil {
		t.Fatalf("adding the agent sidecar to the node plugin: %v", err)
	}
	measure(t, "node plugin rollout with the agent sidecar", start)
	measure(t, "set-up", begin)
	return e
}

// agentSidecar is the container the read-only hostdir scenario adds to the node plugin's pod:
// it stands for an agent that writes data (configuration, a socket) that application pods
// read through a read-only apm-csi volume (the universal-csi-driver pattern), refreshing it
// every second.
const agentSidecar = "agent-sidecar"

const agentScript = `i=0
while true; do
  i=$((i+1))
  echo "{\"writtenBy\":\"agent-sidecar\",\"seq\":$i}" > /shared/.config.json.tmp
  mv /shared/.config.json.tmp /shared/config.json
  sleep 1
done`

// addAgentSidecar patches the node plugin's DaemonSet (installed by the chart) with the agent
// sidecar and waits for the rolled out pod.
func addAgentSidecar(ctx context.Context, e *env) error {
	ds, err := e.d.NodePluginDaemonSet(ctx)
	if err != nil {
		return err
	}
	patch := map[string]any{"spec": map[string]any{"template": map[string]any{"spec": map[string]any{
		"containers": []any{map[string]any{
			"name":         agentSidecar,
			"image":        images.BusyboxRef,
			"command":      []string{"sh", "-c", agentScript},
			"volumeMounts": []any{map[string]any{"name": "e2e-agent-shared", "mountPath": "/shared"}},
		}},
		"volumes": []any{map[string]any{"name": "e2e-agent-shared", "hostPath": map[string]any{"path": e.shared, "type": "DirectoryOrCreate"}}},
	}}}}
	data, err := yaml.Marshal(patch)
	if err != nil {
		return err
	}
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return err
	}
	// A strategic merge patch: containers and volumes merge by name, the chart's stay.
	if _, err := e.cs.AppsV1().DaemonSets(ds.Namespace).Patch(ctx, ds.Name, types.StrategicMergePatchType, js, metav1.PatchOptions{}); err != nil {
		return err
	}
	if err := framework.Poll(ctx, 3*time.Minute, "the node plugin pod with the agent sidecar", func() (bool, error) {
		p, err := e.d.NodePluginPod(ctx)
		if err != nil || !framework.PodReady(p) {
			return false, nil
		}
		for _, c := range p.Spec.Containers {
			if c.Name == agentSidecar {
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		return err
	}
	return e.d.WaitReady(ctx)
}

// dumpDiagnostics logs what explains a failure: pods, the node plugin's and the webhook's
// logs, the kubelet's log tail.
func dumpDiagnostics(t *testing.T, e *env) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := e.c.Kubectl(ctx, "get", "pods", "-A", "-o", "wide"); err == nil {
		t.Logf("pods:\n%s", out)
	}
	if e.d == nil {
		e.d = &framework.Deployment{Cluster: e.c, Client: e.cs}
	}
	if p, err := e.d.NodePluginPod(ctx); err == nil {
		t.Logf("node plugin %s log (tail):\n%s", p.Name, e.d.Logs(ctx, p.Namespace, p.Name, framework.NodeContainer, 120, false))
		t.Logf("node plugin %s previous log (tail):\n%s", p.Name, e.d.Logs(ctx, p.Namespace, p.Name, framework.NodeContainer, 60, true))
	}
	if pods, err := e.d.WebhookPods(ctx); err == nil {
		for _, p := range pods {
			t.Logf("webhook %s log (tail):\n%s", p.Name, e.d.Logs(ctx, p.Namespace, p.Name, "", 40, false))
		}
	}
	if data, err := os.ReadFile(e.c.LogPath("kubelet")); err == nil {
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > 80 {
			lines = lines[len(lines)-80:]
		}
		t.Logf("kubelet log (tail):\n%s", strings.Join(lines, "\n"))
	}
	if mounts, err := framework.Mounts(); err == nil {
		for _, m := range framework.CSIMountsUnder(mounts, e.c.KubeletDir()) {
			t.Logf("csi mount: %s %s %s", m.FSType, m.MountPoint, m.SuperOptions)
		}
	}
}

// namespace creates a scenario's namespace and starts deleting it when the scenario ends.
func namespace(t *testing.T, ctx context.Context, e *env, name string, labels map[string]string) string {
	t.Helper()
	if err := framework.EnsureNamespace(ctx, e.c, name, labels); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.cs.CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
			t.Logf("delete namespace %s: %v", name, err)
		}
	})
	return name
}

// ssiLabels label a namespace for single step instrumentation.
var ssiLabels = map[string]string{framework.SSILabel: "enabled"}

// appPod is the demo application (no tracer in its image) reporting to the intake as service.
func appPod(e *env, ns, name, service string) *corev1.Pod {
	app := ddApp(service)
	app.Env = append(app.Env, corev1.EnvVar{Name: "DD_TRACE_AGENT_URL", Value: e.intake.URL()})
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			Containers:                    []corev1.Container{app},
			TerminationGracePeriodSeconds: framework.Ptr[int64](2),
		},
	}
}

// writeManifest writes objects as a multi-document YAML file for kubectl.
func writeManifest(t *testing.T, objs ...any) string {
	t.Helper()
	var docs []string
	for _, o := range objs {
		b, err := yaml.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		docs = append(docs, string(b))
	}
	p := filepath.Join(t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(p, []byte(strings.Join(docs, "---\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func uniqueToken() string { return fmt.Sprintf("token-%d", time.Now().UnixNano()) }
