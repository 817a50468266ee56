package nodeplugin

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// syncBuffer collects a process's stderr.
type syncBuffer struct {
	mu  chan struct{}
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu <- struct{}{}
	defer func() { <-b.mu }()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu <- struct{}{}
	defer func() { <-b.mu }()
	return b.buf.String()
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func httpGet(url string) (int, string) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// rssKiB reads VmRSS of a process.
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kib int
			fmt.Sscanf(strings.TrimSpace(v), "%d", &kib)
			return kib
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// TestBinary runs the built apm-csi-node: flags and environment, stale socket removal,
// readiness, /healthz through the CSI socket, kubelet registration, metrics, a publish, SIGTERM
// with the volume left mounted, and a restart that picks it up again.
func TestBinary(t *testing.T) {
	testenv.RequireRoot(t)
	goBin := testenv.RequireBinary(t, "go")
	root := t.TempDir()
	t.Cleanup(func() { nodeplugintest.UnmountUnder(t, root) })
	bin := filepath.Join(root, "apm-csi-node")
	build := exec.Command(goBin, "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "github.com/apm-csi/apm-csi/nodeplugin/cmd/apm-csi-node")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	fi, _ := os.Stat(bin)
	t.Logf("static binary size: %d bytes (%.1f MiB)", fi.Size(), float64(fi.Size())/(1<<20))

	kubelet := filepath.Join(root, "kubelet")
	host := filepath.Join(root, "host")
	sock := filepath.Join(kubelet, "plugins", "csi.apm-csi.io", "csi.sock")
	if err := os.MkdirAll(filepath.Join(host, "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	// A socket left by a crashed predecessor.
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	config := filepath.Join(root, "config.yaml")
	writeFile(t, config, "hostdirs:\n- name: demo\n  path: "+filepath.Join(host, "demo")+"\n  create: true\n  namespaces: [shop]\n")

	// Library images on a loopback registry: python is prefetched at start, java is pulled by
	// the first publish that names it.
	reg := libimages.Start(t)
	python, err := libimages.Library("python", "v3.1.0")
	if err != nil {
		t.Fatal(err)
	}
	pythonRepo := "datadog/" + libref.PackageName("python")
	if _, err := reg.Push(pythonRepo, "v3.1.0", python); err != nil {
		t.Fatal(err)
	}
	java, err := libimages.Library("java", "v1.40.0")
	if err != nil {
		t.Fatal(err)
	}
	javaRepo := "datadog/" + libref.PackageName("java")
	if _, err := reg.Push(javaRepo, "v1.40.0", java); err != nil {
		t.Fatal(err)
	}
	pythonDigest, _ := python.Digest()
	javaDigest, _ := java.Digest()

	health, metrics := freeAddr(t), freeAddr(t)
	start := func() (*exec.Cmd, *syncBuffer) {
		cmd := exec.Command(bin, "--kubelet-dir", kubelet, "--health-addr", health, "--metrics-addr", metrics, "--config", config,
			"--insecure-registry", reg.Addr(), "--allowed-repository", reg.Addr(), "--prefetch", reg.Repo(pythonRepo)+":v3.1.0")
		cmd.Env = append(os.Environ(),
			"APM_CSI_STATE_DIR="+filepath.Join(root, "state"),
			"APM_CSI_NODE_ID=node-bin",
			"APM_CSI_HOSTDIR=data="+filepath.Join(host, "data")+",namespaces=*;shared="+filepath.Join(host, "data")+",ro,namespaces=*",
			"APM_CSI_LOG_LEVEL=debug",
		)
		logs := &syncBuffer{mu: make(chan struct{}, 1)}
		cmd.Stderr = logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		deadline := time.Now().Add(15 * time.Second)
		for {
			if code, _ := httpGet("http://" + health + "/readyz"); code == http.StatusOK {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("not ready in time; logs:\n%s", logs.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
		return cmd, logs
	}
	stop := func(cmd *exec.Cmd, logs *syncBuffer) {
		t.Helper()
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("exit after SIGTERM: %v\n%s", err, logs.String())
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("no exit after SIGTERM\n%s", logs.String())
		}
	}

	cmd, logs := start()
	time.Sleep(time.Second)
	idle := rssKiB(t, cmd.Process.Pid)
	t.Logf("idle RSS after startup: %d KiB (%.1f MiB)", idle, float64(idle)/1024)

	if code, body := httpGet("http://" + health + "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz = %d %s", code, body)
	}
	regConn, err := grpc.NewClient("unix://"+filepath.Join(kubelet, "plugins_registry", "csi.apm-csi.io-reg.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer regConn.Close()
	info, err := registerapi.NewRegistrationClient(regConn).GetInfo(context.Background(), &registerapi.InfoRequest{})
	if err != nil || info.Name != "csi.apm-csi.io" || info.Endpoint != sock || info.Type != registerapi.CSIPlugin {
		t.Fatalf("registration GetInfo = %+v, %v", info, err)
	}

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	node := csi.NewNodeClient(conn)
	ident := csi.NewIdentityClient(conn)
	if ni, err := node.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{}); err != nil || ni.NodeId != "node-bin" {
		t.Fatalf("NodeGetInfo = %v, %v (APM_CSI_NODE_ID)", ni, err)
	}
	targetDir := filepath.Join(kubelet, "pods", "uid-1", "volumes", "kubernetes.io~csi", "data")
	if err := os.MkdirAll(targetDir, 0o750); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(targetDir, "mount")
	req := &csi.NodePublishVolumeRequest{
		VolumeId:   "csi-bin",
		TargetPath: target,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		VolumeContext: map[string]string{"type": "hostdir", "name": "demo", "csi.storage.k8s.io/pod.name": "web", "csi.storage.k8s.io/pod.namespace": "shop"},
	}
	if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(host, "demo")); err != nil {
		t.Fatal("the --config entry with create was not created")
	}
	// The demo entry is for namespace shop only: a pod of another namespace is refused.
	intruder := &csi.NodePublishVolumeRequest{VolumeId: "csi-intruder", TargetPath: filepath.Join(kubelet, "pods", "uid-intruder", "volumes", "kubernetes.io~csi", "data", "mount"), VolumeCapability: req.VolumeCapability,
		VolumeContext: map[string]string{"type": "hostdir", "name": "demo", "csi.storage.k8s.io/pod.name": "thief", "csi.storage.k8s.io/pod.namespace": "other"}}
	if _, err := node.NodePublishVolume(context.Background(), intruder); status.Code(err) != codes.PermissionDenied ||
		!strings.Contains(err.Error(), "namespace other is not allowed; the entry allows namespaces shop") {
		t.Fatalf("publish of the shop-only entry for namespace other = %v, want PermissionDenied", err)
	}
	if _, err := os.Lstat(intruder.TargetPath); !os.IsNotExist(err) {
		t.Fatalf("the refused publish left its target: %v", err)
	}
	// The prefetched library is in the cache before any volume asks for it: pulled once, stored
	// under its manifest digest.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		_, err := os.Stat(filepath.Join(root, "state", "store", "images", pythonDigest.Hex, "entry.json"))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("--prefetch did not cache %s: %v; logs:\n%s", reg.Repo(pythonRepo), err, logs.String())
		}
	}
	if n := reg.ManifestFetches(pythonRepo, pythonDigest.String()); n != 1 {
		t.Fatalf("prefetch fetched the manifest %d times, want 1", n)
	}
	// A library volume in the injector layout's language dirs: python (prefetched) and java
	// (pulled now), writable overlay.
	libSpec := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Libraries: []volumeattrs.Library{
		{Image: reg.Repo(pythonRepo) + ":v3.1.0", Target: libref.LanguageTarget("python")},
		{Image: reg.Repo(javaRepo) + ":v1.40.0", Target: libref.LanguageTarget("java")},
	}}
	libTarget := filepath.Join(kubelet, "pods", "uid-1", "volumes", "kubernetes.io~csi", "lib", "mount")
	libReq := &csi.NodePublishVolumeRequest{VolumeId: "csi-lib", TargetPath: libTarget, VolumeCapability: req.VolumeCapability,
		VolumeContext: libSpec.Attributes()}
	if _, err := node.NodePublishVolume(context.Background(), libReq); err != nil {
		t.Fatalf("library publish: %v\n%s", err, logs.String())
	}
	for lang, version := range map[string]string{"python": "v3.1.0", "java": "v1.40.0"} {
		for name, content := range libimages.LibraryFiles(lang, version) {
			p := filepath.Join(libTarget, libref.LanguageTarget(lang), name)
			if got, err := os.ReadFile(p); err != nil || string(got) != content {
				t.Fatalf("%s in the library volume = %q, %v; want %q", p, got, err, content)
			}
		}
	}
	if n := reg.ManifestFetches(pythonRepo, pythonDigest.String()); n != 1 {
		t.Errorf("the publish fetched the prefetched library again (%d manifest GETs)", n)
	}
	if n := reg.ManifestFetches(javaRepo, javaDigest.String()); n != 1 {
		t.Errorf("java manifest fetched %d times, want 1", n)
	}
	writeFile(t, filepath.Join(libTarget, "tracer.log"), "pod's own\n")
	if code, body := httpGet("http://" + metrics + "/metrics"); code != http.StatusOK ||
		!strings.Contains(body, `apm_csi_node_operations_total{grpc_code="OK",operation="publish",volume_type="hostdir"} 1`) ||
		!strings.Contains(body, `apm_csi_node_operations_total{grpc_code="PermissionDenied",operation="publish",volume_type="hostdir"} 1`) ||
		!strings.Contains(body, `apm_csi_node_operations_total{grpc_code="OK",operation="publish",volume_type="library"} 1`) ||
		!strings.Contains(body, `apm_csi_node_operation_duration_seconds_bucket{grpc_code="OK",operation="publish",volume_type="library"`) ||
		!strings.Contains(body, `apm_csi_node_published_volumes{volume_type="hostdir"} 1`) ||
		!strings.Contains(body, `apm_csi_node_published_volumes{volume_type="library"} 1`) ||
		!strings.Contains(body, `apm_csi_cache_downloads_total{result="success"} 2`) ||
		!strings.Contains(body, "apm_csi_cache_libraries 2\n") ||
		!strings.Contains(body, "apm_csi_cache_hits_total 1\n") ||
		!strings.Contains(body, "apm_csi_cache_misses_total 1\n") {
		t.Fatalf("/metrics = %d\n%s", code, body)
	}
	// Unpublish frees the overlay's private dirs; the libraries stay cached.
	if _, err := node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "csi-lib", TargetPath: libTarget}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(libTarget); !os.IsNotExist(err) {
		t.Fatalf("library target left after unpublish: %v", err)
	}
	if overlays, err := os.ReadDir(filepath.Join(root, "state", "overlays")); err != nil || len(overlays) != 0 {
		t.Fatalf("overlay dirs left after unpublish: %v, %v", overlays, err)
	}
	for _, d := range []string{pythonDigest.Hex, javaDigest.Hex} {
		if _, err := os.Stat(filepath.Join(root, "state", "store", "images", d)); err != nil {
			t.Fatalf("library %s not cached: %v", d, err)
		}
	}
	busy := rssKiB(t, cmd.Process.Pid)
	t.Logf("RSS after serving calls: %d KiB", busy)

	stop(cmd, logs)
	if _, err := os.Stat(filepath.Join(kubelet, "plugins_registry", "csi.apm-csi.io-reg.sock")); !os.IsNotExist(err) {
		t.Fatal("registration socket left after SIGTERM: kubelet would keep the plugin registered")
	}
	if nodeplugintest.CountMounts(t, target) != 1 {
		t.Fatal("the volume must stay mounted while the plugin restarts")
	}
	// Every log line is JSON; the publish call's line carries the pod and the volume.
	var sawPublish, sawPaths, sawEntry bool
	sc := bufio.NewScanner(strings.NewReader(logs.String()))
	for sc.Scan() {
		var line map[string]any
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("log line is not JSON: %s", sc.Text())
		}
		if line["msg"] == "csi call" && line["method"] == "/csi.v1.Node/NodePublishVolume" && line["pod"] == "web" && line["namespace"] == "shop" && line["volumeID"] == "csi-bin" {
			sawPublish = true
		}
		// At start: which path and mount calls are in use, and each entry's resolved path.
		if line["msg"] == "host paths" && strings.HasPrefix(fmt.Sprint(line["resolution"]), "openat2") && strings.Contains(fmt.Sprint(line["mounts"]), "move_mount") {
			sawPaths = true
		}
		if line["msg"] == "hostdir entry" && line["entry"] == "demo" && line["resolved"] == filepath.Join(host, "demo") {
			sawEntry = true
		}
	}
	if !sawPublish || !sawPaths || !sawEntry {
		t.Fatalf("no structured publish log line (%t), host paths line (%t) or resolved hostdir entry line (%t):\n%s", sawPublish, sawPaths, sawEntry, logs.String())
	}

	// Restart: the mounted volume is reconciled, kubelet's republish is a no-op.
	cmd, logs = start()
	if !strings.Contains(logs.String(), `"kept":1`) {
		t.Fatalf("restart did not keep the mounted volume:\n%s", logs.String())
	}
	if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if nodeplugintest.CountMounts(t, target) != 1 {
		t.Fatal("republish after restart stacked a mount")
	}
	if _, err := node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "csi-bin", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if probe, err := ident.Probe(context.Background(), &csi.ProbeRequest{}); err != nil || !probe.GetReady().GetValue() {
		t.Fatalf("Probe = %v, %v", probe, err)
	}
	stop(cmd, logs)
	if left := nodeplugintest.MountsUnder(t, root); len(left) != 0 {
		t.Fatalf("mounts left: %q", left)
	}

	// An entry inside a writable entry is refused at start, naming both.
	nested := exec.Command(bin, "--kubelet-dir", kubelet, "--health-addr", "", "--metrics-addr", "", "--kubelet-registration=false",
		"--endpoint", "unix://"+filepath.Join(root, "nested.sock"), "--state-dir", filepath.Join(root, "state"), "--node-id", "n",
		"--hostdir", "apm-socket-dir="+host+",namespaces=*", "--hostdir", "apm-socket="+filepath.Join(host, "data")+",namespaces=*")
	out, err := nested.CombinedOutput()
	if err == nil || !strings.Contains(string(out), `hostdir "apm-socket" (`) || !strings.Contains(string(out), `inside hostdir "apm-socket-dir"`) {
		t.Fatalf("nested entries: exit %v, output:\n%s", err, out)
	}
}
