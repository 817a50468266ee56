package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

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
