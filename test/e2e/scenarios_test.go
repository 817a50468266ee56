package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/tracer"
	"github.com/apm-csi/apm-csi/webhook/annotations"
)

// Paths inside an instrumented container (direct layout).
const (
	ddTracePackageJSON = framework.LibraryMountPath + "/node_modules/dd-trace/package.json"
	nodeOptionsRequire = "--require=" + framework.LibraryMountPath + "/" + tracer.InitModule
)

// podTimeout bounds how long a pod may take to become Ready. The first pod on the node
// waits for the library download.
const podTimeout = 3 * time.Minute

// createReady creates a pod and waits until it is Ready.
func createReady(t *testing.T, ctx context.Context, e *env, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	if _, err := framework.CreatePod(ctx, e.cs, p); err != nil {
		t.Fatalf("create pod %s/%s: %v", p.Namespace, p.Name, err)
	}
	got, err := framework.WaitPodReady(ctx, e.cs, p.Namespace, p.Name, podTimeout)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// execIn runs a command in a pod's first container and returns its output.
func execIn(t *testing.T, ctx context.Context, e *env, p *corev1.Pod, cmd ...string) string {
	t.Helper()
	out, err := framework.Exec(ctx, e.c, p.Namespace, p.Name, "", cmd...)
	if err != nil {
		t.Fatalf("exec in %s/%s: %v", p.Namespace, p.Name, err)
	}
	return out
}

// checkInstrumented verifies what the webhook did to an SSI pod in the direct layout: one CSI
// volume serving the JavaScript library image, mounted at /datadog-lib, NODE_OPTIONS
// requiring dd-trace's init, no init container, the status annotation.
func checkInstrumented(t *testing.T, e *env, p *corev1.Pod, wantImage string) {
	t.Helper()
	v := framework.LibraryVolume(p)
	if v == nil {
		t.Fatalf("pod %s/%s was admitted without the %s CSI volume: volumes %+v", p.Namespace, p.Name, framework.LibraryVolumeName, p.Spec.Volumes)
	}
	if got := v.CSI.VolumeAttributes["type"]; got != "library" {
		t.Errorf("volume type %q, want library", got)
	}
	if got := v.CSI.VolumeAttributes["library.0.image"]; got != wantImage {
		t.Errorf("library.0.image %q, want %q", got, wantImage)
	}
	if len(p.Spec.InitContainers) != 0 {
		t.Errorf("pod has init containers: %v", p.Spec.InitContainers)
	}
	if s := p.Annotations[annotations.InjectionStatus]; !strings.HasPrefix(s, annotations.StatusInjected) {
		t.Errorf("%s = %q, want %s...", annotations.InjectionStatus, s, annotations.StatusInjected)
	}
	for _, c := range p.Spec.Containers {
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return m.Name == framework.LibraryVolumeName && m.MountPath == framework.LibraryMountPath
		}) {
			t.Errorf("container %s does not mount %s at %s: %+v", c.Name, framework.LibraryVolumeName, framework.LibraryMountPath, c.VolumeMounts)
		}
		if n := strings.Count(framework.EnvValue(c, "NODE_OPTIONS"), nodeOptionsRequire); n != 1 {
			t.Errorf("container %s NODE_OPTIONS=%q: want %s exactly once", c.Name, framework.EnvValue(c, "NODE_OPTIONS"), nodeOptionsRequire)
		}
	}
}

// oneMount returns the single mount at the pod volume's target, failing if there is none or
// more than one.
func oneMount(t *testing.T, e *env, p *corev1.Pod, volume string) framework.Mount {
	t.Helper()
	all, err := framework.Mounts()
	if err != nil {
		t.Fatal(err)
	}
	dir := framework.CSIMountDir(e.c.KubeletDir(), p.UID, volume)
	at := framework.MountsAt(all, dir)
	if len(at) != 1 {
		t.Fatalf("%d mounts at %s (pod %s, volume %s), want exactly 1: %+v", len(at), dir, p.Name, volume, at)
	}
	return at[0]
}

// checkNoSuidNoDev checks that a volume's mount on the node ignores setuid bits and device
// files (docs/node-plugin.md: every apm-csi mount is nosuid,nodev).
func checkNoSuidNoDev(t *testing.T, m framework.Mount) {
	t.Helper()
	opts := strings.Split(m.Options, ",")
	for _, want := range []string{"nosuid", "nodev"} {
		if !slices.Contains(opts, want) {
			t.Errorf("%s is mounted without %s on the node (options %s)", m.MountPoint, want, m.Options)
		}
	}
}

// getJSON fetches http://<pod IP>:<port><path> from the host (on the pod bridge) into v.
func getJSON(ctx context.Context, p *corev1.Pod, path string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+net.JoinHostPort(p.Status.PodIP, strconv.Itoa(tracer.AppPort))+path, nil)
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
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, body)
	}
	if v == nil {
		return nil
	}
	return json.Unmarshal(body, v)
}

// tracerInfo is the demo app's /tracer answer.
type tracerInfo struct {
	Loaded      bool   `json:"loaded"`
	From        string `json:"from"`
	Version     string `json:"version"`
	NodeOptions string `json:"nodeOptions"`
	Node        string `json:"node"`
}

// checkTracesArrive checks that the app loaded dd-trace from the CSI volume, sends it requests
// and waits for their spans at the intake.
func checkTracesArrive(t *testing.T, ctx context.Context, e *env, p *corev1.Pod, service string) {
	t.Helper()
	var info tracerInfo
	if err := getJSON(ctx, p, "/tracer", &info); err != nil {
		t.Fatal(err)
	}
	wantFrom := framework.LibraryMountPath + "/node_modules/dd-trace"
	if !info.Loaded || info.From != wantFrom || info.Version != tracer.DDTraceVersion {
		t.Fatalf("the app did not load dd-trace %s from %s: %+v", tracer.DDTraceVersion, wantFrom, info)
	}
	for range 3 {
		if err := getJSON(ctx, p, "/", nil); err != nil {
			t.Fatal(err)
		}
	}
	waitCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	server, err := e.intake.WaitForSpans(waitCtx, func(s tracer.Span) bool {
		return s.Service == service && s.Meta["span.kind"] == "server" && strings.HasSuffix(s.Meta["http.url"], ":8080/")
	})
	if err != nil {
		t.Fatalf("spans of service %s: %v", service, err)
	}
	client, err := e.intake.WaitForSpans(waitCtx, func(s tracer.Span) bool {
		return s.Service == service && s.Meta["span.kind"] == "client" && strings.HasSuffix(s.Meta["http.url"], "/backend")
	})
	if err != nil {
		t.Fatalf("client spans of service %s: %v", service, err)
	}
	if server[0].Meta["language"] != "javascript" {
		t.Errorf("span language %q, want javascript", server[0].Meta["language"])
	}
	t.Logf("spans of %s received by the intake:\n%s", service, tracer.FormatSpans(append(server[:1], client[:1]...)))
}

// Scenario 1.
func scenarioSSI(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-ssi", ssiLabels)
	e.reg.ResetCounts()
	a := createReady(t, ctx, e, framework.BusyboxPod(ns, "pod-a", "echo from-a > /datadog-lib/written-by-a"))
	checkInstrumented(t, e, a, e.jsRef)
	b := createReady(t, ctx, e, framework.BusyboxPod(ns, "pod-b", "echo from-b > /datadog-lib/written-by-b"))
	checkInstrumented(t, e, b, e.jsRef)

	var pkg struct {
		Name, Version string
	}
	if err := json.Unmarshal([]byte(execIn(t, ctx, e, a, "cat", ddTracePackageJSON)), &pkg); err != nil {
		t.Fatal(err)
	}
	if pkg.Name != "dd-trace" || pkg.Version != tracer.DDTraceVersion {
		t.Errorf("%s in the pod: %+v, want dd-trace %s", ddTracePackageJSON, pkg, tracer.DDTraceVersion)
	}
	if env := execIn(t, ctx, e, a, "sh", "-c", "echo $NODE_OPTIONS"); !strings.Contains(env, nodeOptionsRequire) {
		t.Errorf("NODE_OPTIONS in the container: %q", env)
	}

	// Each pod sees its own writes and not the other's.
	for _, c := range []struct {
		self         *corev1.Pod
		mine, theirs string
	}{{a, "a", "b"}, {b, "b", "a"}} {
		got := execIn(t, ctx, e, c.self, "sh", "-c", fmt.Sprintf("cat /datadog-lib/written-by-%s; test -e /datadog-lib/written-by-%s && echo LEAKED || echo absent", c.mine, c.theirs))
		if want := "from-" + c.mine + "\nabsent\n"; got != want {
			t.Errorf("pod-%s sees %q, want %q", c.mine, got, want)
		}
	}

	// On the node: one overlay per pod, the same shared lower dirs (one copy of the library),
	// private upper dirs holding each pod's writes, nothing written into the cache.
	ma, mb := oneMount(t, e, a, framework.LibraryVolumeName), oneMount(t, e, b, framework.LibraryVolumeName)
	for _, m := range []framework.Mount{ma, mb} {
		if m.FSType != "overlay" {
			t.Errorf("%s is %s, want overlay", m.MountPoint, m.FSType)
		}
		checkNoSuidNoDev(t, m)
		for _, l := range m.LowerDirs() {
			if !strings.HasPrefix(l, e.d.StateDir+"/") {
				t.Errorf("lower dir %s is not in the node plugin's state dir %s", l, e.d.StateDir)
			}
			for _, f := range []string{"written-by-a", "written-by-b"} {
				if _, err := os.Stat(filepath.Join(l, f)); err == nil {
					t.Errorf("a pod's write reached the shared library %s", filepath.Join(l, f))
				}
			}
		}
	}
	if !slices.Equal(ma.LowerDirs(), mb.LowerDirs()) || len(ma.LowerDirs()) == 0 {
		t.Errorf("the two pods do not share the cached library: %v vs %v", ma.LowerDirs(), mb.LowerDirs())
	}
	upperA, _ := ma.Option("upperdir")
	upperB, _ := mb.Option("upperdir")
	if upperA == "" || upperA == upperB {
		t.Errorf("upper dirs %q and %q: want one private upper dir per pod", upperA, upperB)
	}
	if data, err := os.ReadFile(filepath.Join(upperA, "written-by-a")); err != nil || string(data) != "from-a\n" {
		t.Errorf("pod-a's write is not in its upper dir %s: %q %v", upperA, data, err)
	}

	// One download for the node, however many pods.
	manifests, maxLayer, err := e.reg.ImageFetches(e.repo, e.jsImage)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("registry: %d manifest GETs by digest, at most %d GETs of any layer for 2 pods", manifests, maxLayer)
	if maxLayer != 1 {
		t.Errorf("a layer of the library image was downloaded %d times for two pods on one node, want once", maxLayer)
	}
}

// The real tracer: the demo app, whose image has no tracer, gets dd-trace through the
// webhook and the CSI volume, and its spans reach the intake. The same image in a namespace
// without SSI runs without a tracer.
func scenarioRealTracer(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-tracer", ssiLabels)
	p := createReady(t, ctx, e, appPod(e, ns, "node-app", "e2e-node-app"))
	checkInstrumented(t, e, p, e.jsRef)
	checkTracesArrive(t, ctx, e, p, "e2e-node-app")

	plainNS := namespace(t, ctx, e, "e2e-plain", nil)
	plain := createReady(t, ctx, e, appPod(e, plainNS, "node-app", "e2e-plain"))
	if v := framework.LibraryVolume(plain); v != nil {
		t.Errorf("a pod outside SSI namespaces got the library volume")
	}
	var info tracerInfo
	if err := getJSON(ctx, plain, "/tracer", &info); err != nil {
		t.Fatal(err)
	}
	if info.Loaded || info.From != "" {
		t.Errorf("the application image alone loads a tracer: %+v", info)
	}
}

// Scenario 2: a pod written for Datadog's classic init-container injection (emptyDir +
// datadog-lib-js-init copying the tracer) is rewritten: no init container runs, the same
// image is served by the CSI volume at the same path, and the tracer works.
func scenarioRewrite(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-rewrite", nil)
	p := appPod(e, ns, "classic", "e2e-rewritten")
	p.Labels[annotations.DatadogEnabled] = "true"
	p.Spec.Volumes = []corev1.Volume{{Name: "datadog-auto-instrumentation", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
	p.Spec.InitContainers = []corev1.Container{{
		Name:         "datadog-lib-js-init",
		Image:        e.jsRef,
		Command:      []string{"sh", "copy-lib.sh", framework.LibraryMountPath},
		WorkingDir:   "/datadog-init",
		VolumeMounts: []corev1.VolumeMount{{Name: "datadog-auto-instrumentation", MountPath: framework.LibraryMountPath}},
	}}
	app := &p.Spec.Containers[0]
	app.Env = append(app.Env, corev1.EnvVar{Name: "NODE_OPTIONS", Value: nodeOptionsRequire})
	app.VolumeMounts = append(app.VolumeMounts, corev1.VolumeMount{Name: "datadog-auto-instrumentation", MountPath: framework.LibraryMountPath})

	admitted, err := framework.CreatePod(ctx, e.cs, p)
	if err != nil {
		t.Fatal(err)
	}
	checkInstrumented(t, e, admitted, e.jsRef)
	if slices.ContainsFunc(admitted.Spec.Volumes, func(v corev1.Volume) bool { return v.EmptyDir != nil }) {
		t.Errorf("the emptyDir of the init-container injection is still there: %+v", admitted.Spec.Volumes)
	}
	ready, err := framework.WaitPodReady(ctx, e.cs, ns, p.Name, podTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if len(ready.Status.InitContainerStatuses) != 0 {
		t.Errorf("init containers ran: %+v", ready.Status.InitContainerStatuses)
	}
	checkTracesArrive(t, ctx, e, ready, "e2e-rewritten")
}

// hostDirPod mounts the e2e-data hostdir entry at /data through an inline CSI volume.
func hostDirPod(ns, name string) *corev1.Pod {
	p := framework.BusyboxPod(ns, name, "true")
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "data", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver: names.DriverName, VolumeAttributes: map[string]string{"type": "hostdir", "name": dataEntry},
	}}})
	p.Spec.Containers[0].VolumeMounts = append(p.Spec.Containers[0].VolumeMounts, corev1.VolumeMount{Name: "data", MountPath: "/data"})
	return p
}

// Scenario 3a: a file written into a hostdir volume outlives the pod: the pod is deleted and
// created again and reads it back; a pod asking for the same directory with the manual
// volume annotation reads it too.
func scenarioHostDir(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-hostdir", nil)
	token := uniqueToken()
	first := createReady(t, ctx, e, hostDirPod(ns, "keeper"))
	execIn(t, ctx, e, first, "sh", "-c", "echo "+token+" > /data/keeper.txt")
	m := oneMount(t, e, first, "data")
	if m.FSType == "overlay" {
		t.Errorf("a hostdir volume is an overlay: %+v", m)
	}
	checkNoSuidNoDev(t, m)
	if err := framework.DeletePod(ctx, e.cs, ns, first.Name); err != nil {
		t.Fatal(err)
	}
	if err := framework.Poll(ctx, time.Minute, "the deleted pod's hostdir mount to go", func() (bool, error) {
		all, err := framework.Mounts()
		return err == nil && len(framework.MountsAt(all, framework.CSIMountDir(e.c.KubeletDir(), first.UID, "data"))) == 0, err
	}); err != nil {
		t.Error(err)
	}
	if data, err := os.ReadFile(filepath.Join(e.dataDir, "keeper.txt")); err != nil || strings.TrimSpace(string(data)) != token {
		t.Errorf("the host directory holds %q (%v), want %s", data, err, token)
	}

	again := createReady(t, ctx, e, hostDirPod(ns, "keeper"))
	if again.UID == first.UID {
		t.Fatal("the pod was not re-created")
	}
	if got := strings.TrimSpace(execIn(t, ctx, e, again, "cat", "/data/keeper.txt")); got != token {
		t.Errorf("the re-created pod reads %q, want %s", got, token)
	}

	manual := framework.BusyboxPod(ns, "manual", "true")
	manual.Labels[annotations.Volumes] = annotations.VolumesEnabled
	manual.Annotations = map[string]string{annotations.VolumePrefix + "data": "hostdir=" + dataEntry + "; mountPath=/data"}
	mp := createReady(t, ctx, e, manual)
	if !slices.ContainsFunc(mp.Spec.Volumes, func(v corev1.Volume) bool {
		return v.Name == "data" && v.CSI != nil && v.CSI.VolumeAttributes["type"] == "hostdir" && v.CSI.VolumeAttributes["name"] == dataEntry
	}) {
		t.Errorf("the manual annotation did not become a hostdir volume: %+v", mp.Spec.Volumes)
	}
	if got := strings.TrimSpace(execIn(t, ctx, e, mp, "cat", "/data/keeper.txt")); got != token {
		t.Errorf("the pod with the manual annotation reads %q, want %s", got, token)
	}
}

// Scenario 3b: the agent sidecar in the node plugin's pod writes a file every second into a
// host directory; application pods read it, live, through a static PersistentVolume and a
// ReadOnlyMany claim of the apm-csi driver, and cannot write to it.
func scenarioSharedPV(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, sharedNamespace, nil)
	pvName := "e2e-" + sharedEntry
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: pvName},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Mi")},
			AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			StorageClassName:              "",
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: names.DriverName, VolumeHandle: sharedEntry, ReadOnly: true,
				VolumeAttributes: map[string]string{"type": "hostdir", "name": sharedEntry},
			}},
		},
	}
	if _, err := e.cs.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = e.cs.CoreV1().PersistentVolumes().Delete(context.Background(), pvName, metav1.DeleteOptions{})
	})
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: sharedEntry, Namespace: ns},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			StorageClassName: framework.Ptr(""),
			VolumeName:       pvName,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Mi")}},
		},
	}
	if _, err := e.cs.CoreV1().PersistentVolumeClaims(ns).Create(ctx, pvc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := framework.Poll(ctx, 2*time.Minute, "the claim to bind", func() (bool, error) {
		got, err := e.cs.CoreV1().PersistentVolumeClaims(ns).Get(ctx, pvc.Name, metav1.GetOptions{})
		return err == nil && got.Status.Phase == corev1.ClaimBound, nil
	}); err != nil {
		t.Fatal(err)
	}

	for _, name := range []string{"reader-1", "reader-2"} {
		p := framework.BusyboxPod(ns, name, "true")
		p.Spec.Volumes = []corev1.Volume{{Name: "shared", VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: pvc.Name, ReadOnly: true},
		}}}
		p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "shared", MountPath: "/shared", ReadOnly: true}}
		r := createReady(t, ctx, e, p)
		if m := oneMount(t, e, r, pvName); !m.ReadOnly() {
			t.Errorf("the ReadOnlyMany volume is mounted read-write on the node: %+v", m)
		}
		seq := func() int {
			var doc struct {
				WrittenBy string `json:"writtenBy"`
				Seq       int    `json:"seq"`
			}
			out := execIn(t, ctx, e, r, "cat", "/shared/config.json")
			if err := json.Unmarshal([]byte(out), &doc); err != nil || doc.WrittenBy != agentSidecar {
				t.Fatalf("%s reads %q from the sidecar's file (%v)", name, out, err)
			}
			return doc.Seq
		}
		first := seq()
		if err := framework.Poll(ctx, time.Minute, name+" to see the sidecar's next write", func() (bool, error) {
			return seq() != first, nil
		}); err != nil {
			t.Error(err)
		}
		out, err := framework.Exec(ctx, e.c, ns, name, "", "touch", "/shared/written-by-app")
		if err == nil || !strings.Contains(err.Error(), "Read-only file system") {
			t.Errorf("%s could write into the read-only volume: %q %v", name, out, err)
		}
	}

	// A pod whose inline CSI volume of the read-only entry is not readOnly is refused at mount:
	// the container runtime would remount its bind of the volume read-write (runc 1.2 and
	// newer do for a volumeMount that is not readOnly).
	notAsking := framework.BusyboxPod(ns, "not-asking-read-only", "true")
	notAsking.Spec.Volumes = []corev1.Volume{{Name: "shared", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver: names.DriverName, VolumeAttributes: map[string]string{"type": "hostdir", "name": sharedEntry},
	}}}}
	notAsking.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "shared", MountPath: "/shared"}}
	if _, err := framework.CreatePod(ctx, e.cs, notAsking); err != nil {
		t.Fatal(err)
	}
	failed := waitFailedMount(t, ctx, e, ns, notAsking.Name, "the refused mount of a read-only entry without readOnly")
	for _, want := range []string{"FailedPrecondition", "volume shared: ", `read-only hostdir entry "` + sharedEntry + `"`, "readOnly: true under the pod's csi: volume source"} {
		if !strings.Contains(failed, want) {
			t.Errorf("the FailedMount event lacks %q: %s", want, failed)
		}
	}

	// With readOnly: true on the CSI volume source, a container whose volumeMount does not ask
	// for read-only still cannot write: kubelet mounts the volume read-only into it.
	p := framework.BusyboxPod(ns, "csi-read-only", "true")
	p.Spec.Volumes = []corev1.Volume{{Name: "shared", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver: names.DriverName, ReadOnly: framework.Ptr(true), VolumeAttributes: map[string]string{"type": "hostdir", "name": sharedEntry},
	}}}}
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "shared", MountPath: "/shared"}}
	inline := createReady(t, ctx, e, p)
	if m := oneMount(t, e, inline, "shared"); !m.ReadOnly() {
		t.Errorf("the read-only hostdir entry %s is mounted read-write on the node: %+v", sharedEntry, m)
	}
	out, err := framework.Exec(ctx, e.c, ns, inline.Name, "", "touch", "/shared/written-by-app")
	if err == nil || !strings.Contains(err.Error(), "Read-only file system") {
		t.Errorf("a pod wrote into the read-only hostdir entry %s: %q %v", sharedEntry, out, err)
	}
	if _, err := os.Stat(filepath.Join(e.shared, "written-by-app")); err == nil {
		t.Error("an application pod wrote into the agent's directory")
	}
}

// Scenario 4: an invalid manual volume annotation is refused at kubectl apply, with the
// message the webhook's parser gives; the same pod with a valid annotation is admitted.
func scenarioInvalidAnnotation(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-manual", nil)
	key := annotations.VolumePrefix + "tracer"
	bad := "libraries=js; mountPath=opt/tracer"
	_, parseErr := annotations.ParseVolume(key, bad)
	if parseErr == nil {
		t.Fatalf("%s: %q is valid; the scenario needs an invalid value", key, bad)
	}
	pod := func(name, value string) *corev1.Pod {
		p := framework.BusyboxPod(ns, name, "true")
		p.TypeMeta = metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"}
		p.Labels[annotations.Volumes] = annotations.VolumesEnabled
		p.Annotations = map[string]string{key: value}
		return p
	}
	out, err := e.c.Kubectl(ctx, "apply", "-f", writeManifest(t, pod("bad-annotation", bad)))
	if err == nil {
		t.Fatalf("kubectl apply accepted the pod: %s", out)
	}
	for _, want := range []string{"denied the request", parseErr.Error()} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("kubectl apply failed without %q:\n%v", want, err)
		}
	}
	t.Logf("kubectl apply: %v", err)
	if _, err := e.cs.CoreV1().Pods(ns).Get(ctx, "bad-annotation", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the refused pod exists: %v", err)
	}

	// The valid form, read-only: one library, so the node plugin serves it as a read-only bind
	// mount of the cached library rather than an overlay.
	if out, err := e.c.Kubectl(ctx, "apply", "-f", writeManifest(t, pod("good-annotation", "libraries=js; mountPath=/opt/tracer; readOnly=true"))); err != nil {
		t.Fatalf("a valid annotation was refused: %v\n%s", err, out)
	}
	good, err := framework.WaitPodReady(ctx, e.cs, ns, "good-annotation", podTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if got := execIn(t, ctx, e, good, "cat", "/opt/tracer/node_modules/dd-trace/package.json"); !strings.Contains(got, `"dd-trace"`) {
		t.Errorf("the manual library volume does not serve dd-trace: %q", got)
	}
	m := oneMount(t, e, good, "tracer")
	if !m.ReadOnly() {
		t.Errorf("the read-only library volume is mounted read-write on the node: %+v", m)
	}
	checkNoSuidNoDev(t, m)
	if out, err := framework.Exec(ctx, e.c, ns, good.Name, "", "touch", "/opt/tracer/x"); err == nil {
		t.Errorf("a pod wrote into its read-only library volume: %q", out)
	}
}

// Scenario 9: in a namespace enforcing Pod Security "restricted" the instrumented pod is
// admitted and runs (an inline CSI volume is allowed there); a hostPath volume is not.
func scenarioRestricted(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-restricted", map[string]string{
		framework.SSILabel:                           "enabled",
		"pod-security.kubernetes.io/enforce":         "restricted",
		"pod-security.kubernetes.io/enforce-version": "latest",
	})
	p := appPod(e, ns, "restricted-app", "e2e-restricted")
	framework.RestrictedSecurity(p, tracer.AppUID)
	admitted, err := framework.CreatePod(ctx, e.cs, p)
	if err != nil {
		t.Fatalf("the instrumented pod was refused under restricted: %v", err)
	}
	checkInstrumented(t, e, admitted, e.jsRef)
	ready, err := framework.WaitPodReady(ctx, e.cs, ns, p.Name, podTimeout)
	if err != nil {
		t.Fatal(err)
	}
	checkTracesArrive(t, ctx, e, ready, "e2e-restricted")

	hp := framework.BusyboxPod(ns, "with-hostpath", "true")
	framework.RestrictedSecurity(hp, tracer.AppUID)
	hp.Spec.Volumes = []corev1.Volume{{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: e.dataDir}}}}
	hp.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "host", MountPath: "/host"}}
	_, err = framework.CreatePod(ctx, e.cs, hp)
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "hostPath") {
		t.Errorf("a hostPath pod under restricted: %v, want Forbidden for hostPath (Pod Security is not enforced?)", err)
	}
}

// stopWebhook scales the webhook to zero replicas and returns the function that scales it
// back to one and waits until it serves; if the test ends before that, a cleanup brings it back.
func stopWebhook(t *testing.T, ctx context.Context, e *env) (restart func()) {
	t.Helper()
	restored := false
	t.Cleanup(func() {
		if !restored {
			_ = e.d.ScaleWebhook(context.Background(), 1)
			_ = e.d.WaitWebhookServing(context.Background())
		}
	})
	if err := e.d.ScaleWebhook(ctx, 0); err != nil {
		t.Fatal(err)
	}
	return func() {
		t.Helper()
		if err := e.d.ScaleWebhook(ctx, 1); err != nil {
			t.Fatal(err)
		}
		if err := e.d.WaitWebhookServing(ctx); err != nil {
			t.Fatal(err)
		}
		restored = true
	}
}

// Scenario 8: with the webhook scaled to zero, pods are created (failurePolicy Ignore)
// without instrumentation; once it is back, new pods and re-created ones are instrumented.
func scenarioWebhookDown(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-webhook-down", ssiLabels)
	restartWebhook := stopWebhook(t, ctx, e)
	spec := func(name string) *corev1.Pod { return framework.BusyboxPod(ns, name, "true") }
	down := createReady(t, ctx, e, spec("created-while-down"))
	if framework.LibraryVolume(down) != nil || down.Annotations[annotations.InjectionStatus] != "" {
		t.Errorf("a pod created while the webhook was down was mutated: %+v", down.Spec.Volumes)
	}

	restartWebhook()
	after := createReady(t, ctx, e, spec("created-after"))
	checkInstrumented(t, e, after, e.jsRef)
	execIn(t, ctx, e, after, "test", "-f", ddTracePackageJSON)

	if err := framework.DeletePod(ctx, e.cs, ns, down.Name); err != nil {
		t.Fatal(err)
	}
	again := createReady(t, ctx, e, spec("created-while-down"))
	checkInstrumented(t, e, again, e.jsRef)
	execIn(t, ctx, e, again, "test", "-f", ddTracePackageJSON)
}

// Scenario 7: with the library registry stopped, a pod using the cached library starts; a pod
// needing an uncached version waits (kubelet retries the non-final Unavailable) and starts
// once the registry is back.
func scenarioRegistryDown(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-registry", ssiLabels)
	createReady(t, ctx, e, framework.BusyboxPod(ns, "before-outage", "true"))
	if err := e.reg.Stop(); err != nil {
		t.Fatal(err)
	}
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			_ = e.reg.Start()
		}
	})

	cached := createReady(t, ctx, e, framework.BusyboxPod(ns, "during-outage", "true"))
	checkInstrumented(t, e, cached, e.jsRef)
	execIn(t, ctx, e, cached, "test", "-f", ddTracePackageJSON)

	u := framework.BusyboxPod(ns, "uncached", "true")
	u.Annotations = map[string]string{annotations.DatadogVersion("js"): uncachedTag}
	admitted, err := framework.CreatePod(ctx, e.cs, u)
	if err != nil {
		t.Fatal(err)
	}
	uncachedRef := e.reg.Repo(e.repo) + ":" + uncachedTag
	checkInstrumented(t, e, admitted, uncachedRef)
	failed := waitFailedMount(t, ctx, e, ns, u.Name, "the failed mount of the uncached library")
	t.Logf("while the registry is down: %s", failed)
	if !strings.Contains(failed, "Unavailable") {
		t.Errorf("the failed mount is not reported as Unavailable (which kubelet retries): %s", failed)
	}
	if p, err := e.cs.CoreV1().Pods(ns).Get(ctx, u.Name, metav1.GetOptions{}); err != nil || framework.PodReady(p) {
		t.Fatalf("the pod needing an uncached library is Ready while the registry is down (%v)", err)
	}

	if err := e.reg.Start(); err != nil {
		t.Fatal(err)
	}
	restarted = true
	ready, err := framework.WaitPodReady(ctx, e.cs, ns, u.Name, 4*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(execIn(t, ctx, e, ready, "cat", framework.LibraryMountPath+"/version")); got != uncachedTag {
		t.Errorf("the uncached library's version file reads %q, want %s", got, uncachedTag)
	}
}

// csiCall is one "csi call" log record of the node plugin.
type csiCall struct {
	Time   time.Time `json:"time"`
	Msg    string    `json:"msg"`
	Method string    `json:"method"`
	Code   string    `json:"code"`
	Target string    `json:"target"`
}

// publishCalls returns the NodePublishVolume calls the node plugin logged since a time.
func publishCalls(ctx context.Context, e *env, since time.Time) ([]csiCall, error) {
	p, err := e.d.NodePluginPod(ctx)
	if err != nil {
		return nil, err
	}
	st := metav1.NewTime(since.Add(-time.Second))
	rc, err := e.cs.CoreV1().Pods(p.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: framework.NodeContainer, SinceTime: &st}).Stream(ctx)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	var out []csiCall
	sc := bufio.NewScanner(rc)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var c csiCall
		if json.Unmarshal(sc.Bytes(), &c) == nil && c.Msg == "csi call" && strings.HasSuffix(c.Method, "/NodePublishVolume") && !c.Time.Before(since) {
			out = append(out, c)
		}
	}
	return out, sc.Err()
}

// Scenario 6: kubelet restarts with instrumented pods running; it reconstructs their volumes
// and publishes them again, and each pod still has exactly one mount per volume.
func scenarioKubeletRestart(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-kubelet", ssiLabels)
	var pods []*corev1.Pod
	for _, name := range []string{"running-1", "running-2"} {
		pods = append(pods, createReady(t, ctx, e, framework.BusyboxPod(ns, name, "true")))
	}
	// Two apm-csi volumes in one pod: the library overlay and a hostdir bind mount.
	pods = append(pods, createReady(t, ctx, e, hostDirPod(ns, "two-volumes")))
	type target struct {
		pod    *corev1.Pod
		volume string
		dir    string
	}
	var targets []target
	for _, p := range pods {
		vols, err := framework.CSIVolumes(ctx, e.cs, p)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range vols {
			oneMount(t, e, p, v)
			targets = append(targets, target{p, v, framework.CSIMountDir(e.c.KubeletDir(), p.UID, v)})
		}
	}
	if len(targets) != 4 {
		t.Fatalf("%d apm-csi volumes in the pods, want 4", len(targets))
	}

	restart := time.Now()
	if err := e.c.RestartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("kubelet restarted in %s", time.Since(restart).Round(100*time.Millisecond))
	// kubelet reconstructs the mounted volumes and calls NodePublishVolume on each again:
	// that repeated publish is what must not mount a second time.
	var calls []csiCall
	if err := framework.Poll(ctx, 3*time.Minute, "kubelet to publish every volume again after its restart", func() (bool, error) {
		var err error
		if calls, err = publishCalls(ctx, e, restart); err != nil {
			return false, nil
		}
		for _, tg := range targets {
			if !slices.ContainsFunc(calls, func(c csiCall) bool { return c.Target == tg.dir && c.Code == "OK" }) {
				return false, nil
			}
		}
		return true, nil
	}); err != nil {
		t.Fatalf("%v (publish calls seen: %+v)", err, calls)
	}
	after := createReady(t, ctx, e, framework.BusyboxPod(ns, "after-restart", "true"))
	checkInstrumented(t, e, after, e.jsRef)
	for _, tg := range targets {
		oneMount(t, e, tg.pod, tg.volume)
		p, err := e.cs.CoreV1().Pods(ns).Get(ctx, tg.pod.Name, metav1.GetOptions{})
		if err != nil || !framework.PodReady(p) || p.UID != tg.pod.UID {
			t.Errorf("pod %s is no longer the same Ready pod after the kubelet restart (%v)", tg.pod.Name, err)
		}
	}
	execIn(t, ctx, e, pods[0], "test", "-f", ddTracePackageJSON)
	execIn(t, ctx, e, pods[2], "test", "-d", "/data")
}

// killNodePlugin SIGKILLs the node plugin's container through containerd (kubelet restarts it)
// and returns the container's restart count before.
func killNodePlugin(t *testing.T, ctx context.Context, e *env) int32 {
	t.Helper()
	p, err := e.d.NodePluginPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range p.Status.ContainerStatuses {
		if s.Name != framework.NodeContainer {
			continue
		}
		id, ok := strings.CutPrefix(s.ContainerID, "containerd://")
		if !ok {
			t.Fatalf("node plugin container id %q", s.ContainerID)
		}
		cmd := exec.CommandContext(ctx, filepath.Join(e.c.BinDir(), "ctr"), "--address", e.c.ContainerdAddress(), "--namespace", "k8s.io", "tasks", "kill", "--signal", "SIGKILL", id)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("ctr tasks kill: %v\n%s", err, out)
		}
		return s.RestartCount
	}
	t.Fatalf("no %s container in %s", framework.NodeContainer, p.Name)
	return 0
}

// Scenario 5: pods are created and deleted while the node plugin is SIGKILLed (kubelet
// restarts its container) and then its pod force-deleted (the DaemonSet creates another).
// Every pod ends as asked (Ready, or gone), and once every pod is deleted no mount, upper dir,
// volume record or unreferenced library is left on the node.
func scenarioChurn(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-churn", ssiLabels)
	type churned struct {
		name string
		uid  types.UID
		keep bool
	}
	var all []churned
	create := func(from, to int) {
		for i := from; i < to; i++ {
			name := fmt.Sprintf("churn-%02d", i)
			p, err := framework.CreatePod(ctx, e.cs, framework.BusyboxPod(ns, name, "true"))
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, churned{name: name, uid: p.UID, keep: i%2 == 0})
		}
	}
	deleteOdd := func() {
		for _, c := range all {
			if !c.keep {
				err := e.cs.CoreV1().Pods(ns).Delete(ctx, c.name, metav1.DeleteOptions{GracePeriodSeconds: framework.Ptr[int64](1)})
				if err != nil && !apierrors.IsNotFound(err) {
					t.Fatal(err)
				}
			}
		}
	}

	create(0, 4)
	// Kill the plugin once the first volume is mounted, so that it lands among publishes.
	if err := framework.Poll(ctx, podTimeout, "a first churn pod's volume to be mounted", func() (bool, error) {
		mounts, err := framework.Mounts()
		return err == nil && len(framework.CSIMountsUnder(mounts, e.c.KubeletDir())) > 0, nil
	}); err != nil {
		t.Fatal(err)
	}
	old, err := e.d.NodePluginPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	restarts := killNodePlugin(t, ctx, e)
	deleteOdd()
	create(4, 8)
	if err := framework.Poll(ctx, 2*time.Minute, "kubelet to restart the killed node plugin container", func() (bool, error) {
		p, err := e.cs.CoreV1().Pods(old.Namespace).Get(ctx, old.Name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		for _, s := range p.Status.ContainerStatuses {
			if s.Name == framework.NodeContainer && s.RestartCount > restarts {
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		t.Fatal(err)
	}
	// Now the pod: force-deleted, the DaemonSet creates another while its containers stop.
	if err := e.cs.CoreV1().Pods(old.Namespace).Delete(ctx, old.Name, metav1.DeleteOptions{GracePeriodSeconds: framework.Ptr[int64](0)}); err != nil {
		t.Fatal(err)
	}
	deleteOdd()
	create(8, 12)
	deleteOdd()

	for _, c := range all {
		if c.keep {
			p, err := framework.WaitPodReady(ctx, e.cs, ns, c.name, 4*time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			checkInstrumented(t, e, p, e.jsRef)
			oneMount(t, e, p, framework.LibraryVolumeName)
			execIn(t, ctx, e, p, "test", "-f", ddTracePackageJSON)
		} else if err := framework.WaitPodGone(ctx, e.cs, ns, c.name, c.uid, 4*time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.d.WaitReady(ctx); err != nil {
		t.Fatalf("the node plugin did not come back: %v", err)
	}
	if p, err := e.d.NodePluginPod(ctx); err != nil || p.UID == old.UID {
		t.Errorf("the DaemonSet did not replace the deleted node plugin pod (%v)", err)
	}

	// Delete every pod: this scenario's, and (by deleting their namespaces) every other
	// scenario's that is still terminating.
	for _, c := range all {
		if c.keep {
			if err := framework.DeletePod(ctx, e.cs, ns, c.name); err != nil {
				t.Fatal(err)
			}
		}
	}
	nss, err := e.cs.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nss.Items {
		if strings.HasPrefix(n.Name, "e2e-") {
			if err := framework.DeleteNamespace(ctx, e.cs, n.Name); err != nil {
				t.Fatal(err)
			}
		}
	}
	pods, err := e.cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range pods.Items {
		if vols, _ := framework.CSIVolumes(ctx, e.cs, &pods.Items[i]); len(vols) > 0 {
			t.Fatalf("pod %s/%s still uses apm-csi volumes %v", pods.Items[i].Namespace, pods.Items[i].Name, vols)
		}
	}

	checkNoLeftovers(t, ctx, e)
}

// libraryGCTimeout bounds the wait for the library cache's GC to remove unused libraries:
// the grace period plus the GC interval, with margin.
const libraryGCTimeout = 4 * time.Minute

// checkNoLeftovers checks the node once no pod uses an apm-csi volume: no apm-csi mount below
// kubelet's pods dir, no overlay using the plugin's state, no per-volume upper/work dir or
// record, and (once the GC grace period has passed) no library in the cache.
func checkNoLeftovers(t *testing.T, ctx context.Context, e *env) {
	t.Helper()
	overlays := filepath.Join(e.d.StateDir, "overlays")
	var last string
	if err := framework.Poll(ctx, 2*time.Minute, "volumes to be unpublished and cleaned up", func() (bool, error) {
		all, err := framework.Mounts()
		if err != nil {
			return false, err
		}
		var left []string
		for _, m := range framework.CSIMountsUnder(all, e.c.KubeletDir()) {
			left = append(left, "mount "+m.MountPoint)
		}
		for _, m := range framework.MountsWithOptionUnder(all, e.d.StateDir) {
			left = append(left, "overlay "+m.MountPoint)
		}
		names, err := framework.Entries(overlays)
		if err != nil {
			return false, err
		}
		for _, n := range names {
			left = append(left, filepath.Join(overlays, n))
		}
		records, err := state.Read(e.d.StateDir)
		if err != nil {
			return false, err
		}
		for _, r := range records {
			left = append(left, "record of "+r.VolumeID+" at "+r.TargetPath)
		}
		last = strings.Join(left, "\n")
		return len(left) == 0, nil
	}); err != nil {
		t.Fatalf("%v; left:\n%s", err, last)
	}

	store := filepath.Join(e.d.StateDir, "store")
	if err := framework.Poll(ctx, libraryGCTimeout, "the library cache to drop every unused library", func() (bool, error) {
		var left []string
		for _, kind := range []string{"images", "views", "generated"} {
			names, err := framework.Entries(filepath.Join(store, kind))
			if err != nil {
				return false, err
			}
			for _, n := range names {
				left = append(left, kind+"/"+n)
			}
		}
		last = strings.Join(left, " ")
		return len(left) == 0, nil
	}); err != nil {
		t.Fatalf("%v; left in %s: %s", err, store, last)
	}
}

// A hostdir volume in a namespace the admission policy does not list: `kubectl apply` is
// refused by the ValidatingAdmissionPolicy with its message, and no pod exists.
func scenarioHostDirRefusedAtAdmission(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, deniedNamespace, nil)
	p := hostDirPod(ns, "hostdir-denied")
	p.TypeMeta = metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"}
	out, err := e.c.Kubectl(ctx, "apply", "-f", writeManifest(t, p))
	if err == nil {
		t.Fatalf("kubectl apply accepted a hostdir volume in namespace %s: %s", ns, out)
	}
	t.Logf("kubectl apply: %v", err)
	for _, want := range []string{
		"ValidatingAdmissionPolicy", "apm-csi-hostdir-namespaces",
		"apm-csi: host directory volume data (type hostdir, entry " + dataEntry + ") is not allowed in namespace " + ns,
		"Helm value admissionPolicy.hostdirNamespaces",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("kubectl apply failed without %q:\n%v", want, err)
		}
	}
	if _, err := e.cs.CoreV1().Pods(ns).Get(ctx, p.Name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the refused pod exists: %v", err)
	}
}

// A pod in a namespace where the admission policy admits hostdir volumes writes an inline
// volume naming an entry whose namespaces do not include its own (the webhook is not involved:
// nothing asks it to). The node plugin refuses the mount with PermissionDenied, which kubelet
// shows in the pod's events; the pod never starts. The same request through the webhook's
// manual annotation is refused at admission.
func scenarioHostDirTenancyAtMount(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, bypassNamespace, nil)
	p, err := framework.CreatePod(ctx, e.cs, hostDirPod(ns, "other-teams-dir"))
	if err != nil {
		t.Fatalf("the admission policy refused a hostdir volume in listed namespace %s: %v", ns, err)
	}
	failed := waitFailedMount(t, ctx, e, ns, p.Name, "the refused mount")
	t.Logf("FailedMount: %s", failed)
	for _, want := range []string{"PermissionDenied", `hostdir entry "` + dataEntry + `" may not be used by pod ` + ns + "/" + p.Name,
		"namespace " + ns + " is not allowed; the entry allows namespaces " + strings.Join(dataEntryNamespaces, ", ")} {
		if !strings.Contains(failed, want) {
			t.Errorf("the FailedMount event lacks %q: %s", want, failed)
		}
	}
	if describe := framework.DescribePod(ctx, e.cs, ns, p.Name); !strings.Contains(describe, "PermissionDenied") {
		t.Errorf("the pod's description does not show the refusal:\n%s", describe)
	}
	if got, err := e.cs.CoreV1().Pods(ns).Get(ctx, p.Name, metav1.GetOptions{}); err != nil || framework.PodReady(got) || got.Status.Phase == corev1.PodRunning {
		t.Errorf("the pod started with another namespace's host directory (%v)", err)
	}

	manual := framework.BusyboxPod(ns, "manual-other-teams-dir", "true")
	manual.Labels[annotations.Volumes] = annotations.VolumesEnabled
	manual.Annotations = map[string]string{annotations.VolumePrefix + "data": "hostdir=" + dataEntry + "; mountPath=/data"}
	_, err = framework.CreatePod(ctx, e.cs, manual)
	if err == nil {
		t.Fatal("the webhook admitted a manual annotation for another namespace's entry")
	}
	t.Logf("manual annotation: %v", err)
	for _, want := range []string{"denied the request", "hostdir entry " + dataEntry + " may not be used by pods of namespace " + ns} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the webhook's denial lacks %q: %v", want, err)
		}
	}
}

// waitFailedMount waits for kubelet's first FailedMount event on a pod and returns its
// message: what a person sees in `kubectl describe pod`.
func waitFailedMount(t *testing.T, ctx context.Context, e *env, ns, pod, what string) string {
	t.Helper()
	var failed string
	if err := framework.Poll(ctx, 2*time.Minute, "kubelet to report "+what, func() (bool, error) {
		ev, err := e.cs.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod + ",reason=FailedMount"})
		if err != nil || len(ev.Items) == 0 {
			return false, nil
		}
		failed = ev.Items[0].Message
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	return failed
}
