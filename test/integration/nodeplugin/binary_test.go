package nodeplugin

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/eventually"
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

func freeAddr(t testing.TB) string {
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
func rssKiB(tb testing.TB, pid int) int {
	tb.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kib int
			if n, err := fmt.Sscanf(strings.TrimSpace(v), "%d", &kib); n != 1 || err != nil {
				tb.Fatalf("VmRSS of process %d: %q: %v", pid, v, err)
			}
			return kib
		}
	}
	tb.Fatal("no VmRSS")
	return 0
}

// binaryEnv is a built apm-csi-node with everything its command line names: a kubelet dir
// holding a stale CSI socket, host directories and a --config file, and a loopback registry
// with a python library (prefetched at start) and a java library (pulled by a publish).
type binaryEnv struct {
	root, bin, kubelet, host, sock, config string
	reg                                    *libimages.Registry
	pythonRepo, javaRepo                   string
	pythonDigest, javaDigest               v1.Hash
	health, metrics                        string

	mu    sync.Mutex
	procs []*exec.Cmd // every process started, killed when the test that made e ends
}

func newBinaryEnv(tb testing.TB) *binaryEnv {
	tb.Helper()
	goBin := testenv.RequireBinary(tb, "go")
	e := &binaryEnv{root: tb.TempDir()}
	tb.Cleanup(func() { nodeplugintest.UnmountUnder(tb, e.root) })
	tb.Cleanup(func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		for _, cmd := range e.procs {
			if cmd.ProcessState == nil {
				if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
					tb.Errorf("kill the node plugin: %v", err)
				}
				// Killed: its exit status says only that.
				_ = cmd.Wait()
			}
		}
	})
	e.bin = filepath.Join(e.root, "apm-csi-node")
	build := exec.Command(goBin, "build", "-trimpath", "-ldflags", "-s -w", "-o", e.bin, "github.com/apm-csi/apm-csi/nodeplugin/cmd/apm-csi-node")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		tb.Fatalf("build: %v\n%s", err, out)
	}

	e.kubelet = filepath.Join(e.root, "kubelet")
	e.host = filepath.Join(e.root, "host")
	e.sock = filepath.Join(e.kubelet, "plugins", "csi.apm-csi.io", "csi.sock")
	if err := os.MkdirAll(filepath.Join(e.host, "data"), 0o755); err != nil {
		tb.Fatal(err)
	}
	// A socket left by a crashed predecessor.
	if err := os.MkdirAll(filepath.Dir(e.sock), 0o755); err != nil {
		tb.Fatal(err)
	}
	stale, err := net.Listen("unix", e.sock)
	if err != nil {
		tb.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	e.config = filepath.Join(e.root, "config.yaml")
	config := "hostdirs:\n- name: demo\n  path: " + filepath.Join(e.host, "demo") + "\n  create: true\n  namespaces: [shop]\n"
	if err := os.WriteFile(e.config, []byte(config), 0o644); err != nil {
		tb.Fatal(err)
	}

	// Library images on a loopback registry: python is prefetched at start, java is pulled by
	// the first publish that names it.
	e.reg = libimages.Start(tb)
	python, err := libimages.Library("python", "v3.1.0")
	if err != nil {
		tb.Fatal(err)
	}
	e.pythonRepo = "datadog/" + libref.PackageName("python")
	if _, err := e.reg.Push(e.pythonRepo, "v3.1.0", python); err != nil {
		tb.Fatal(err)
	}
	java, err := libimages.Library("java", "v1.40.0")
	if err != nil {
		tb.Fatal(err)
	}
	e.javaRepo = "datadog/" + libref.PackageName("java")
	if _, err := e.reg.Push(e.javaRepo, "v1.40.0", java); err != nil {
		tb.Fatal(err)
	}
	e.pythonDigest, _ = python.Digest()
	e.javaDigest, _ = java.Digest()
	e.health, e.metrics = freeAddr(tb), freeAddr(tb)
	return e
}

// start runs the binary with flags and environment and waits until /readyz answers 200. The
// process outlives tb (a subtest): it runs until stop or the end of the test that made e.
func (e *binaryEnv) start(tb testing.TB) (*exec.Cmd, *syncBuffer) {
	tb.Helper()
	cmd := exec.Command(e.bin, "--kubelet-dir", e.kubelet, "--health-addr", e.health, "--metrics-addr", e.metrics, "--config", e.config,
		"--insecure-registry", e.reg.Addr(), "--allowed-repository", e.reg.Addr(), "--prefetch", e.reg.Repo(e.pythonRepo)+":v3.1.0")
	cmd.Env = append(os.Environ(),
		"APM_CSI_STATE_DIR="+filepath.Join(e.root, "state"),
		"APM_CSI_NODE_ID=node-bin",
		"APM_CSI_HOSTDIR=data="+filepath.Join(e.host, "data")+",namespaces=*;shared="+filepath.Join(e.host, "data")+",ro,namespaces=*",
		"APM_CSI_LOG_LEVEL=debug",
	)
	logs := &syncBuffer{mu: make(chan struct{}, 1)}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, cmd)
	e.mu.Unlock()
	err := eventually.Wait(context.Background(), 15*time.Second, 50*time.Millisecond, "the node plugin's /readyz to answer 200", func(context.Context) error {
		if code, body := httpGet("http://" + e.health + "/readyz"); code != http.StatusOK {
			return fmt.Errorf("/readyz = %d %s", code, body)
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("%v; logs:\n%s", err, logs.String())
	}
	return cmd, logs
}

// stop sends SIGTERM and waits for a clean exit.
func (e *binaryEnv) stop(tb testing.TB, cmd *exec.Cmd, logs *syncBuffer) {
	tb.Helper()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		tb.Fatalf("SIGTERM: %v\n%s", err, logs.String())
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			tb.Fatalf("exit after SIGTERM: %v\n%s", err, logs.String())
		}
	case <-time.After(30 * time.Second):
		tb.Fatalf("no exit after SIGTERM\n%s", logs.String())
	}
}

// waitPrefetched waits until --prefetch has cached the python library.
func (e *binaryEnv) waitPrefetched(tb testing.TB, logs *syncBuffer) {
	tb.Helper()
	err := eventually.Wait(context.Background(), 30*time.Second, 50*time.Millisecond, "--prefetch to cache "+e.reg.Repo(e.pythonRepo), func(context.Context) error {
		_, err := os.Stat(filepath.Join(e.root, "state", "store", "images", e.pythonDigest.Hex, "entry.json"))
		return err
	})
	if err != nil {
		tb.Fatalf("%v; logs:\n%s", err, logs.String())
	}
}

// libraryRequest asks for a library volume in the injector layout's language dirs: python
// (prefetched) and java (pulled by the publish), writable overlay.
func (e *binaryEnv) libraryRequest(id, target string) *csi.NodePublishVolumeRequest {
	spec := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Libraries: []volumeattrs.Library{
		{Image: e.reg.Repo(e.pythonRepo) + ":v3.1.0", Target: libref.LanguageTarget("python")},
		{Image: e.reg.Repo(e.javaRepo) + ":v1.40.0", Target: libref.LanguageTarget("java")},
	}}
	return &csi.NodePublishVolumeRequest{VolumeId: id, TargetPath: target, VolumeCapability: mountCapability, VolumeContext: spec.Attributes()}
}

var mountCapability = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

// TestBinary runs the built apm-csi-node as a DaemonSet runs it. Its subtests are the binary's
// behaviours in the order a node sees them, from start-up over publishes to SIGTERM and a
// restart; a step the later ones build on ends the test when it fails.
func TestBinary(t *testing.T) {
	testenv.RequireRoot(t)
	e := newBinaryEnv(t)
	kubelet, host, root, sock, reg := e.kubelet, e.host, e.root, e.sock, e.reg

	var cmd *exec.Cmd
	var logs *syncBuffer
	if !testenv.Step(t, "starts from flags and environment over a stale socket and becomes ready", func(t *testing.T) {
		cmd, logs = e.start(t)
	}) {
		return
	}
	if !testenv.Step(t, "answers /healthz and registers with kubelet", func(t *testing.T) {
		if code, body := httpGet("http://" + e.health + "/healthz"); code != http.StatusOK {
			t.Fatalf("/healthz = %d %s", code, body)
		}
		regConn, err := grpc.NewClient("unix://"+filepath.Join(kubelet, "plugins_registry", "csi.apm-csi.io-reg.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer regConn.Close()
		// The registration socket is served once the plugin is ready: wait for it as kubelet's
		// plugin watcher does.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		info, err := registerapi.NewRegistrationClient(regConn).GetInfo(ctx, &registerapi.InfoRequest{}, grpc.WaitForReady(true))
		if err != nil || info.Name != "csi.apm-csi.io" || info.Endpoint != sock || info.Type != registerapi.CSIPlugin {
			t.Fatalf("registration GetInfo = %+v, %v", info, err)
		}
	}) {
		return
	}

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	node := csi.NewNodeClient(conn)
	ident := csi.NewIdentityClient(conn)
	if !testenv.Step(t, "reports the node ID of APM_CSI_NODE_ID", func(t *testing.T) {
		if ni, err := node.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{}); err != nil || ni.NodeId != "node-bin" {
			t.Fatalf("NodeGetInfo = %v, %v (APM_CSI_NODE_ID)", ni, err)
		}
	}) {
		return
	}

	targetDir := filepath.Join(kubelet, "pods", "uid-1", "volumes", "kubernetes.io~csi", "data")
	target := filepath.Join(targetDir, "mount")
	req := &csi.NodePublishVolumeRequest{
		VolumeId:         "csi-bin",
		TargetPath:       target,
		VolumeCapability: mountCapability,
		VolumeContext:    map[string]string{"type": "hostdir", "name": "demo", "csi.storage.k8s.io/pod.name": "web", "csi.storage.k8s.io/pod.namespace": "shop"},
	}
	if !testenv.Step(t, "publishes an entry of the --config file, creating its directory", func(t *testing.T) {
		if err := os.MkdirAll(targetDir, 0o750); err != nil {
			t.Fatal(err)
		}
		if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(host, "demo")); err != nil {
			t.Fatal("the --config entry with create was not created")
		}
	}) {
		return
	}
	// The demo entry is for namespace shop only: a pod of another namespace is refused.
	if !testenv.Step(t, "refuses the entry to a pod of a namespace it does not list, leaving no target", func(t *testing.T) {
		intruder := &csi.NodePublishVolumeRequest{VolumeId: "csi-intruder", TargetPath: filepath.Join(kubelet, "pods", "uid-intruder", "volumes", "kubernetes.io~csi", "data", "mount"), VolumeCapability: req.VolumeCapability,
			VolumeContext: map[string]string{"type": "hostdir", "name": "demo", "csi.storage.k8s.io/pod.name": "thief", "csi.storage.k8s.io/pod.namespace": "other"}}
		if _, err := node.NodePublishVolume(context.Background(), intruder); status.Code(err) != codes.PermissionDenied ||
			!strings.Contains(err.Error(), "namespace other is not allowed; the entry allows namespaces shop") {
			t.Fatalf("publish of the shop-only entry for namespace other = %v, want PermissionDenied", err)
		}
		if _, err := os.Lstat(intruder.TargetPath); !os.IsNotExist(err) {
			t.Fatalf("the refused publish left its target: %v", err)
		}
	}) {
		return
	}
	// The prefetched library is in the cache before any volume asks for it: pulled once, stored
	// under its manifest digest.
	if !testenv.Step(t, "--prefetch caches a library with one pull before any volume asks for it", func(t *testing.T) {
		e.waitPrefetched(t, logs)
		if n := reg.ManifestFetches(e.pythonRepo, e.pythonDigest.String()); n != 1 {
			t.Fatalf("prefetch fetched the manifest %d times, want 1", n)
		}
	}) {
		return
	}
	libTarget := filepath.Join(kubelet, "pods", "uid-1", "volumes", "kubernetes.io~csi", "lib", "mount")
	if !testenv.Step(t, "serves a library volume from the prefetched library and one it pulls, in the injector layout", func(t *testing.T) {
		if _, err := node.NodePublishVolume(context.Background(), e.libraryRequest("csi-lib", libTarget)); err != nil {
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
		if n := reg.ManifestFetches(e.pythonRepo, e.pythonDigest.String()); n != 1 {
			t.Errorf("the publish fetched the prefetched library again (%d manifest GETs)", n)
		}
		if n := reg.ManifestFetches(e.javaRepo, e.javaDigest.String()); n != 1 {
			t.Errorf("java manifest fetched %d times, want 1", n)
		}
		writeFile(t, filepath.Join(libTarget, "tracer.log"), "pod's own\n")
	}) {
		return
	}
	if !testenv.Step(t, "counts publishes, published volumes and cache use in its metrics", func(t *testing.T) {
		if code, body := httpGet("http://" + e.metrics + "/metrics"); code != http.StatusOK ||
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
	}) {
		return
	}
	// Unpublish frees the overlay's private dirs; the libraries stay cached.
	if !testenv.Step(t, "unpublish frees the overlay's private dirs and keeps the libraries cached", func(t *testing.T) {
		if _, err := node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "csi-lib", TargetPath: libTarget}); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Lstat(libTarget); !os.IsNotExist(err) {
			t.Fatalf("library target left after unpublish: %v", err)
		}
		if overlays, err := os.ReadDir(filepath.Join(root, "state", "overlays")); err != nil || len(overlays) != 0 {
			t.Fatalf("overlay dirs left after unpublish: %v, %v", overlays, err)
		}
		for _, d := range []string{e.pythonDigest.Hex, e.javaDigest.Hex} {
			if _, err := os.Stat(filepath.Join(root, "state", "store", "images", d)); err != nil {
				t.Fatalf("library %s not cached: %v", d, err)
			}
		}
	}) {
		return
	}

	if !testenv.Step(t, "exits on SIGTERM, unregistering from kubelet and leaving its volumes mounted", func(t *testing.T) {
		e.stop(t, cmd, logs)
		if _, err := os.Stat(filepath.Join(kubelet, "plugins_registry", "csi.apm-csi.io-reg.sock")); !os.IsNotExist(err) {
			t.Fatal("registration socket left after SIGTERM: kubelet would keep the plugin registered")
		}
		if nodeplugintest.CountMounts(t, target) != 1 {
			t.Fatal("the volume must stay mounted while the plugin restarts")
		}
	}) {
		return
	}
	// Every log line is JSON; the publish call's line carries the pod and the volume.
	if !testenv.Step(t, "logs JSON records: the publish call with pod and volume, the host path calls and each entry's resolved path", func(t *testing.T) {
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
	}) {
		return
	}

	// Restart: the mounted volume is reconciled, kubelet's republish is a no-op.
	if !testenv.Step(t, "after a restart keeps the mounted volume and republishing it stacks no mount", func(t *testing.T) {
		cmd, logs = e.start(t)
		// The targets are checked in the background once the plugin is ready.
		if err := eventually.Wait(context.Background(), 15*time.Second, 20*time.Millisecond, "the start-up check to keep the mounted volume", func(context.Context) error {
			if !strings.Contains(logs.String(), `"kept":1`) {
				return errors.New("no start-up check line with kept=1 yet")
			}
			return nil
		}); err != nil {
			t.Fatalf("restart did not keep the mounted volume: %v\n%s", err, logs.String())
		}
		if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
			t.Fatal(err)
		}
		if nodeplugintest.CountMounts(t, target) != 1 {
			t.Fatal("republish after restart stacked a mount")
		}
	}) {
		return
	}
	t.Run("after unpublish and SIGTERM leaves no mount, having answered Probe ready", func(t *testing.T) {
		if _, err := node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "csi-bin", TargetPath: target}); err != nil {
			t.Fatal(err)
		}
		if probe, err := ident.Probe(context.Background(), &csi.ProbeRequest{}); err != nil || !probe.GetReady().GetValue() {
			t.Fatalf("Probe = %v, %v", probe, err)
		}
		e.stop(t, cmd, logs)
		if left := nodeplugintest.MountsUnder(t, root); len(left) != 0 {
			t.Fatalf("mounts left: %q", left)
		}
	})

	// An entry inside a writable entry is refused at start, naming both.
	t.Run("refuses at start an entry inside a writable entry, naming both", func(t *testing.T) {
		nested := exec.Command(e.bin, "--kubelet-dir", kubelet, "--health-addr", "", "--metrics-addr", "", "--kubelet-registration=false",
			"--endpoint", "unix://"+filepath.Join(root, "nested.sock"), "--state-dir", filepath.Join(root, "state"), "--node-id", "n",
			"--hostdir", "apm-socket-dir="+host+",namespaces=*", "--hostdir", "apm-socket="+filepath.Join(host, "data")+",namespaces=*")
		out, err := nested.CombinedOutput()
		if err == nil || !strings.Contains(string(out), `hostdir "apm-socket" (`) || !strings.Contains(string(out), `inside hostdir "apm-socket-dir"`) {
			t.Fatalf("nested entries: exit %v, output:\n%s", err, out)
		}
	})
}
