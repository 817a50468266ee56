package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/apm-csi/apm-csi/test/eventually"
	"github.com/apm-csi/apm-csi/test/images"
	"github.com/apm-csi/apm-csi/test/localcluster"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// smokeManifests is applied as a kustomization: an HTTP server behind a ClusterIP Service,
// the shape of the webhook's Deployment + Service.
var smokeManifests = map[string]string{
	"kustomization.yaml": `apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: localcluster-smoke
resources: [web.yaml]
`,
	"web.yaml": `apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: httpd
        image: ` + images.BusyboxRef + `
        command: ["sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www"]
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
`,
}

const smokeNamespace = "localcluster-smoke"

// TestLocalClusterSmoke starts the local cluster, runs pods on it, checks the networking the
// webhook and in-cluster clients rely on and the library image registry, tears it down,
// checks nothing is left, and does it again: a second start after a tear-down must work.
func TestLocalClusterSmoke(t *testing.T) {
	testenv.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	opts := localcluster.Options{
		Root: os.Getenv("APM_CSI_CLUSTER_ROOT"), // default root, so a crashed run is cleaned by the next
		Logf: t.Logf,
	}

	start := time.Now()
	c, err := localcluster.Up(ctx, opts)
	if err != nil {
		t.Fatalf("up: %v", err)
	}
	t.Logf("MEASURE up: %s", time.Since(start).Round(100*time.Millisecond))
	t.Cleanup(func() {
		// Only reached with a cluster still up when the test failed half-way.
		_ = c.Down(context.Background())
	})
	cs, err := c.Clientset()
	if err != nil {
		t.Fatal(err)
	}

	t.Run("node", func(t *testing.T) { checkNode(t, ctx, c, cs) })
	t.Run("kubelet dir is a shared mount", func(t *testing.T) {
		if !sharedMountPoint(t, c.KubeletDir()) {
			t.Errorf("%s is not a mount point with shared propagation; Bidirectional mounts of the CSI node plugin would not reach the kubelet", c.KubeletDir())
		}
	})
	if err := c.CreateNamespace(ctx, smokeNamespace); err != nil {
		t.Fatal(err)
	}
	t.Run("busybox pod runs and its log is read through the API", func(t *testing.T) {
		checkBusyboxPod(t, ctx, cs)
	})
	t.Run("Bidirectional mount of a privileged pod reaches the host", func(t *testing.T) {
		checkBidirectionalMount(t, ctx, c, cs)
	})
	t.Run("services", func(t *testing.T) { checkServices(t, ctx, c, cs) })
	t.Run("registry", func(t *testing.T) { checkRegistry(t, ctx, c) })
	t.Run("containerd pulls from the loopback registry over plain HTTP", func(t *testing.T) {
		checkRegistryPull(t, ctx, c, cs)
	})
	t.Run("imported images are pinned against image garbage collection", func(t *testing.T) {
		pinned, err := c.PinnedImages(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, ref := range []string{images.PauseRef, images.BusyboxRef} {
			if !slices.Contains(pinned, ref) {
				t.Errorf("%s is not pinned (pinned: %v); the kubelet's image GC could delete it and it cannot be pulled again", ref, pinned)
			}
		}
	})

	start = time.Now()
	if err := c.Down(ctx); err != nil {
		t.Fatalf("down: %v", err)
	}
	t.Logf("MEASURE down: %s", time.Since(start).Round(100*time.Millisecond))
	checkTornDown(t, c)

	start = time.Now()
	c2, err := localcluster.Up(ctx, opts)
	if err != nil {
		t.Fatalf("second up after down: %v", err)
	}
	t.Logf("MEASURE second up: %s", time.Since(start).Round(100*time.Millisecond))
	cs2, err := c2.Clientset()
	if err != nil {
		t.Fatal(err)
	}
	checkNode(t, ctx, c2, cs2)
	start = time.Now()
	if err := c2.Down(ctx); err != nil {
		t.Fatalf("second down: %v", err)
	}
	t.Logf("MEASURE second down: %s", time.Since(start).Round(100*time.Millisecond))
	checkTornDown(t, c2)
}

func checkNode(t *testing.T, ctx context.Context, c *localcluster.Cluster, cs kubernetes.Interface) {
	t.Helper()
	node, err := cs.CoreV1().Nodes().Get(ctx, c.NodeName(), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ready := false
	for _, cond := range node.Status.Conditions {
		if cond.Type == corev1.NodeReady {
			ready = cond.Status == corev1.ConditionTrue
		}
	}
	if !ready {
		t.Errorf("node %s not Ready: %+v", node.Name, node.Status.Conditions)
	}
	internalIP := ""
	for _, a := range node.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			internalIP = a.Address
		}
	}
	if internalIP != c.NodeIP() {
		t.Errorf("node InternalIP %q, want the bridge address %s", internalIP, c.NodeIP())
	}
	// Image volumes with subPath need containerd 2.2 or newer.
	runtime := node.Status.NodeInfo.ContainerRuntimeVersion
	var major, minor int
	if _, err := fmt.Sscanf(runtime, "containerd://%d.%d", &major, &minor); err != nil || major < 2 || (major == 2 && minor < 2) {
		t.Errorf("node runtime %q, want containerd 2.2 or newer", runtime)
	}
}

// checkRegistryPull runs a pod whose image exists only in the loopback registry (pushed by
// checkRegistry, never imported): containerd must pull it itself, through the plain-HTTP
// registry host the cluster configures.
func checkRegistryPull(t *testing.T, ctx context.Context, c *localcluster.Cluster, cs kubernetes.Interface) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "registry-pull", Namespace: smokeNamespace},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name:            "pulled",
				Image:           c.RegistryAddr() + "/dd-lib-smoke-init:v1",
				ImagePullPolicy: corev1.PullAlways,
				Command:         []string{"sh", "-c", "echo pulled"},
			}},
			RestartPolicy: corev1.RestartPolicyNever,
		},
	}
	if _, err := cs.CoreV1().Pods(smokeNamespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	p := waitPod(t, ctx, cs, pod.Name, func(p *corev1.Pod) bool {
		return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
	})
	if p.Status.Phase != corev1.PodSucceeded {
		t.Fatalf("pod with an image from %s: %s %+v", c.RegistryAddr(), p.Status.Phase, p.Status.ContainerStatuses)
	}
	log, err := os.ReadFile(c.LogPath("registry"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "/v2/dd-lib-smoke-init/manifests/v1") {
		t.Errorf("the registry log shows no manifest request for the pod's image:\n%s", log)
	}
}

func checkBusyboxPod(t *testing.T, ctx context.Context, cs kubernetes.Interface) {
	const marker = "hello from the apm-csi local cluster"
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "busybox", Namespace: smokeNamespace},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name:    "busybox",
				Image:   images.BusyboxRef,
				Command: []string{"sh", "-c", "echo '" + marker + "'; exec sleep 3600"},
			}},
			TerminationGracePeriodSeconds: ptrTo[int64](1),
		},
	}
	if _, err := cs.CoreV1().Pods(smokeNamespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPod(t, ctx, cs, pod.Name, func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning })
	var logs string
	waitFor(t, ctx, "the pod's log to hold the marker", func() bool {
		b, err := cs.CoreV1().Pods(smokeNamespace).GetLogs(pod.Name, &corev1.PodLogOptions{}).DoRaw(ctx)
		logs = string(b)
		return err == nil && strings.Contains(logs, marker)
	})
}

// checkBidirectionalMount runs what the CSI node plugin does: a privileged pod mounts below
// the kubelet dir through a Bidirectional hostPath volume, and the host must see the mount
// (otherwise the kubelet and the application containers would not).
func checkBidirectionalMount(t *testing.T, ctx context.Context, c *localcluster.Cluster, cs kubernetes.Interface) {
	hostDir := filepath.Join(c.KubeletDir(), "plugins", "localcluster-smoke")
	target := filepath.Join(hostDir, "mounted-by-pod")
	bidirectional := corev1.MountPropagationBidirectional
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "bidirectional", Namespace: smokeNamespace},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name:            "mounter",
				Image:           images.BusyboxRef,
				Command:         []string{"sh", "-c", "mkdir -p /plugin/mounted-by-pod && mount -t tmpfs smoke /plugin/mounted-by-pod && exec sleep 3600"},
				SecurityContext: &corev1.SecurityContext{Privileged: ptrTo(true)},
				VolumeMounts:    []corev1.VolumeMount{{Name: "plugin", MountPath: "/plugin", MountPropagation: &bidirectional}},
			}},
			Volumes: []corev1.Volume{{Name: "plugin", VolumeSource: corev1.VolumeSource{
				HostPath: &corev1.HostPathVolumeSource{Path: hostDir, Type: ptrTo(corev1.HostPathDirectoryOrCreate)},
			}}},
			TerminationGracePeriodSeconds: ptrTo[int64](1),
		},
	}
	if _, err := cs.CoreV1().Pods(smokeNamespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPod(t, ctx, cs, pod.Name, func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning })
	waitFor(t, ctx, "the pod's tmpfs mount to appear on the host at "+target, func() bool {
		data, err := os.ReadFile("/proc/self/mountinfo")
		return err == nil && strings.Contains(string(data), " "+target+" ")
	})
}

func checkServices(t *testing.T, ctx context.Context, c *localcluster.Cluster, cs kubernetes.Interface) {
	dir := t.TempDir()
	for file, content := range smokeManifests {
		if err := os.WriteFile(filepath.Join(dir, file), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := c.Apply(ctx, dir); err != nil {
		t.Fatalf("apply -k: %v\n%s", err, out)
	}
	waitFor(t, ctx, "the web Deployment to be available", func() bool {
		d, err := cs.AppsV1().Deployments(smokeNamespace).Get(ctx, "web", metav1.GetOptions{})
		return err == nil && d.Status.AvailableReplicas == 1
	})
	svc, err := cs.CoreV1().Services(smokeNamespace).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}

	// The API server calls a webhook through its Service's ClusterIP from the host: the same
	// path as this request.
	t.Run("host reaches a pod through its ClusterIP", func(t *testing.T) {
		client := &http.Client{Timeout: 5 * time.Second}
		var body string
		waitFor(t, ctx, "the web Service to answer on its ClusterIP", func() bool {
			resp, err := client.Get("http://" + net.JoinHostPort(svc.Spec.ClusterIP, "80") + "/")
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			body = string(b)
			return resp.StatusCode == http.StatusOK
		})
		if strings.TrimSpace(body) != "hello-from-web" {
			t.Errorf("ClusterIP answered %q, want hello-from-web", body)
		}
	})

	// In-cluster clients (the webhook, the node plugin) reach the API server through the
	// kubernetes Service with their ServiceAccount token; pods reach each other's Services.
	t.Run("pod reaches the API server and a Service through ClusterIPs", func(t *testing.T) {
		script := `set -e
wget -q -O- --no-check-certificate --header "Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/token)" \
  --header "Content-Type: application/json" --post-data '{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}' \
  "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/apis/authentication.k8s.io/v1/selfsubjectreviews"
echo
wget -q -O- "http://` + svc.Spec.ClusterIP + `/"`
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "netcheck", Namespace: smokeNamespace},
			Spec: corev1.PodSpec{
				RestartPolicy: corev1.RestartPolicyNever,
				Containers:    []corev1.Container{{Name: "netcheck", Image: images.BusyboxRef, Command: []string{"sh", "-c", script}}},
			},
		}
		if _, err := cs.CoreV1().Pods(smokeNamespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		p := waitPod(t, ctx, cs, pod.Name, func(p *corev1.Pod) bool {
			return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
		})
		logs, err := cs.CoreV1().Pods(smokeNamespace).GetLogs(pod.Name, &corev1.PodLogOptions{}).DoRaw(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if p.Status.Phase != corev1.PodSucceeded {
			t.Fatalf("netcheck pod %s:\n%s", p.Status.Phase, logs)
		}
		// The SelfSubjectReview names who the API server took the pod for: its ServiceAccount.
		if want := "system:serviceaccount:" + smokeNamespace + ":default"; !strings.Contains(string(logs), want) {
			t.Errorf("the API server did not authenticate the pod's token as %s:\n%s", want, logs)
		}
		if !strings.Contains(string(logs), "hello-from-web") {
			t.Errorf("the web Service did not answer the pod:\n%s", logs)
		}
	})
}

// checkRegistry pushes the busybox image (from the tarball Up built) to the library image
// registry and pulls it back by tag.
func checkRegistry(t *testing.T, ctx context.Context, c *localcluster.Cluster) {
	tag, err := name.NewTag(images.BusyboxRef)
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(filepath.Join(c.Root(), "images", "busybox.tar"), &tag)
	if err != nil {
		t.Fatal(err)
	}
	want, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.NewTag(c.RegistryAddr() + "/dd-lib-smoke-init:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
		t.Fatalf("push to %s: %v", ref, err)
	}
	got, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	if d, _ := got.Digest(); d != want {
		t.Errorf("pulled digest %s, pushed %s", d, want)
	}
}

// checkTornDown verifies Down left no mount under the root or the kubelet dir, no bridge, and
// no component listening.
func checkTornDown(t *testing.T, c *localcluster.Cluster) {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && (strings.HasPrefix(fields[4], c.Root()+"/") || strings.HasPrefix(fields[4], c.KubeletDir())) {
			t.Errorf("mount left after down: %s", sc.Text())
		}
	}
	if _, err := net.InterfaceByName(c.Options().BridgeName); err == nil {
		t.Errorf("bridge %s still exists after down", c.Options().BridgeName)
	}
	for _, st := range c.Status() {
		if st.Running {
			t.Errorf("%s still running (pid %d) after down", st.Component, st.PID)
		}
	}
	if conn, err := net.DialTimeout("tcp", c.RegistryAddr(), time.Second); err == nil {
		conn.Close()
		t.Errorf("registry %s still accepts connections after down", c.RegistryAddr())
	}
}

// sharedMountPoint reports whether dir is a mount point with shared propagation.
func sharedMountPoint(t *testing.T, dir string) bool {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE ...
		if len(fields) < 7 || fields[4] != dir {
			continue
		}
		for _, opt := range fields[6:] {
			if opt == "-" {
				break
			}
			if strings.HasPrefix(opt, "shared:") {
				return true
			}
		}
	}
	return false
}

func waitPod(t *testing.T, ctx context.Context, cs kubernetes.Interface, podName string, cond func(*corev1.Pod) bool) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	waitFor(t, ctx, "pod "+podName, func() bool {
		p, err := cs.CoreV1().Pods(smokeNamespace).Get(ctx, podName, metav1.GetOptions{})
		if err != nil {
			return false
		}
		pod = p
		return cond(p)
	})
	return pod
}

// waitFor polls cond for up to two minutes.
func waitFor(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	eventually.Require(t, ctx, 2*time.Minute, 250*time.Millisecond, what, eventually.True(cond))
}

func ptrTo[T any](v T) *T { return &v }
