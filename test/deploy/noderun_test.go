package deploy

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/eventually"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// TestNodePluginStartsWithRenderedFlags runs the node plugin built from this tree with each
// variant's rendered command line and configuration file, relocated to temporary directories:
// the binary itself parses every value (durations, quantities, mirrors, image references,
// hostdir entries), starts, and must answer /healthz (a CSI Probe over its socket) and /readyz.
// --help only proves that flag names exist; this proves the values are accepted.
//
// Only loopback is used: prefetch images are pointed at 127.0.0.1:1, where nothing listens.
func TestNodePluginStartsWithRenderedFlags(t *testing.T) {
	testenv.RequireRoot(t)
	bin := BuiltBinary(t, names.NodeBinary)
	forEachVariant(t, func(t *testing.T, v Variant, s Set) {
		in := install(t, s)
		c := in.NodeContainer
		// Short paths: a unix socket path is limited to 108 bytes.
		dir, err := os.MkdirTemp("", "apmnode")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		kubeletDir := FlagValue(t, c, "kubelet-dir", "/var/lib/kubelet")
		localKubelet := filepath.Join(dir, "kubelet")
		for _, d := range []string{filepath.Join(localKubelet, "pods"), filepath.Join(dir, "secrets")} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		healthPort, metricsPort := freePort(t), freePort(t)
		var args []string
		prefetch := false
		for _, a := range Args(c) {
			flagName, value, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
			switch flagName {
			case "endpoint":
				sock := strings.TrimPrefix(value, "unix://")
				rel, ok := strings.CutPrefix(sock, kubeletDir+"/")
				if !ok {
					t.Fatalf("--endpoint %s is not under --kubelet-dir %s", value, kubeletDir)
				}
				a = "--endpoint=unix://" + filepath.Join(localKubelet, rel)
			case "kubelet-dir":
				a = "--kubelet-dir=" + localKubelet
			case "state-dir":
				a = "--state-dir=" + filepath.Join(dir, "state")
			case "config":
				data, err := FileFromConfigMap(t, s, in.Node.Namespace, &in.Node.Spec.Template.Spec, c, value)
				if err != nil {
					t.Fatal(err)
				}
				p := filepath.Join(dir, "config.yaml")
				if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
					t.Fatal(err)
				}
				a = "--config=" + p
			case "pull-secret-dir":
				a = "--pull-secret-dir=" + filepath.Join(dir, "secrets")
			case "health-addr":
				a = fmt.Sprintf("--health-addr=127.0.0.1:%d", healthPort)
			case "metrics-addr":
				a = fmt.Sprintf("--metrics-addr=127.0.0.1:%d", metricsPort)
			case "node-id":
				a = strings.ReplaceAll(a, "$(NODE_NAME)", "deploy-test-node")
			case "prefetch":
				ref, err := name.ParseReference(value)
				if err != nil {
					t.Fatalf("--prefetch=%s: %v", value, err)
				}
				a = "--prefetch=127.0.0.1:1/" + ref.Context().RepositoryStr() + strings.TrimPrefix(ref.String(), ref.Context().String())
				prefetch = true
			}
			args = append(args, a)
		}
		if prefetch {
			// The redirected prefetches must be allowed, as the rendered ones are.
			args = append(args, "--allowed-repository=127.0.0.1:1")
		}
		cmd := exec.Command(bin, args...)
		var logs bytes.Buffer
		cmd.Stdout, cmd.Stderr = &logs, &logs
		cmd.Env = append(os.Environ(), "NODE_NAME=deploy-test-node")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		if keepNeedsProjectQuotas(t, args, filepath.Join(dir, "state")) {
			// Kept writable layers need a state dir filesystem that enforces project quotas,
			// which a temporary dir here does not have: the plugin must parse every value and
			// then refuse to start for that reason alone.
			select {
			case err := <-exited:
				out := logs.String()
				if err == nil || !strings.Contains(out, "project-quota") || strings.Contains(out, "invalid value") {
					t.Fatalf("want a refusal for the missing project quotas after the flags were parsed; exit %v, logs:\n%s", err, out)
				}
				t.Logf("refused as expected without project quotas: %s", firstLines(strings.TrimSpace(out), 2))
			case <-time.After(30 * time.Second):
				_ = cmd.Process.Kill()
				t.Fatalf("the node plugin started with --keep-writable-layers on a state dir without project quotas (killed: %v):\n%s", <-exited, logs.String())
			}
			return
		}
		stopped := false
		defer func() {
			if !stopped {
				_ = cmd.Process.Kill()
				t.Logf("apm-csi-node killed: %v", <-exited)
			}
			if t.Failed() {
				t.Logf("apm-csi-node %s\nlogs:\n%s", strings.Join(args, " "), logs.String())
			}
		}()

		for _, path := range []string{"/readyz", "/healthz"} {
			url := fmt.Sprintf("http://127.0.0.1:%d%s", healthPort, path)
			eventually.Require(t, t.Context(), 30*time.Second, 200*time.Millisecond, "the node plugin's "+path+" to answer 200", func(context.Context) error {
				select {
				case err := <-exited:
					stopped = true
					return eventually.Stop(fmt.Errorf("the node plugin exited: %v", err))
				default:
				}
				return httpOK(url)
			})
		}
		if resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort)); err != nil || resp.StatusCode != http.StatusOK {
			t.Errorf("metrics endpoint: %v", err)
		} else {
			resp.Body.Close()
		}

		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			stopped = true
			if err != nil {
				t.Errorf("the node plugin did not stop cleanly on SIGTERM: %v", err)
			}
		case <-time.After(40 * time.Second):
			t.Errorf("the node plugin did not stop within 40s of SIGTERM")
		}
	})
}

// keepNeedsProjectQuotas reports whether the command line keeps writable layers
// (--keep-writable-layers) while stateDir's filesystem does not enforce project quotas, so
// that the plugin must refuse to start.
func keepNeedsProjectQuotas(t *testing.T, args []string, stateDir string) bool {
	t.Helper()
	keep := false
	for _, a := range args {
		if a == "--keep-writable-layers" || a == "--keep-writable-layers=true" {
			keep = true
		}
	}
	if !keep {
		return false
	}
	_, err := writablelayer.New(filepath.Join(stateDir, "overlays"), writablelayer.ProjectQuota)
	if err != nil {
		t.Logf("%s: %v", stateDir, err)
	}
	return err != nil
}
