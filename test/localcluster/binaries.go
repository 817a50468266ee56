package localcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
)

// kubeBinaries are the programs BinDir must hold: the Kubernetes binaries and the container
// runtime, both built through the Go module proxy (hack/k8s-binaries.sh,
// hack/containerd-binaries.sh), and etcd, all linked there by hack/install-deps.sh.
var kubeBinaries = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl",
	"containerd", "containerd-shim-runc-v2", "ctr", "runc", "etcd"}

// Debian programs the cluster runs; hack/install-deps.sh installs their packages.
var hostPrograms = []string{"ip", "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"}

const projectModule = "github.com/apm-csi/apm-csi"

// FindRepoRoot walks up from dir to the apm-csi checkout (the directory of its go.mod).
func FindRepoRoot(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && regexp.MustCompile(`(?m)^module\s+`+regexp.QuoteMeta(projectModule)+`\s*$`).Match(data) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no %s checkout above the working directory", projectModule)
		}
		dir = parent
	}
}

// resolveBinaries fills in RepoRoot, BinDir and KubeProxy, installing and building what is
// missing: hack/install-deps.sh installs the Debian packages and builds the Kubernetes binaries
// and the container runtime through the Go module proxy (cached by version); EnsureKubeProxy
// adds kube-proxy.
// HackScript runs hack/<script> of the checkout at repoRoot, in repoRoot with env added to this
// process's environment, and returns its standard output with surrounding space trimmed; an
// error carries the script's standard error.
func HackScript(ctx context.Context, repoRoot, script string, env ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(repoRoot, "hack", script))
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("hack/%s: %w\n%s", script, err, stderr.String())
	}
	return strings.TrimSpace(string(out)), nil
}

func (o *Options) resolveBinaries(ctx context.Context) error {
	if o.BinDir == "" {
		if o.RepoRoot == "" {
			wd, err := os.Getwd()
			if err != nil {
				return err
			}
			if o.RepoRoot, err = FindRepoRoot(wd); err != nil {
				return err
			}
		}
		o.logf("up: hack/install-deps.sh (installs missing packages, builds missing binaries)")
		out, err := HackScript(ctx, o.RepoRoot, "install-deps.sh")
		if err != nil {
			return err
		}
		lines := strings.Split(out, "\n")
		o.BinDir = lines[len(lines)-1]
	}
	for _, b := range kubeBinaries {
		if _, err := os.Stat(filepath.Join(o.BinDir, b)); err != nil {
			return fmt.Errorf("%s missing in %s (run `make deps`)", b, o.BinDir)
		}
	}
	for _, p := range hostPrograms {
		if _, err := exec.LookPath(p); err != nil {
			return fmt.Errorf("%s not found on PATH (run `make deps`)", p)
		}
	}
	if o.KubeProxy == "" {
		kp, err := EnsureKubeProxy(ctx, o.BinDir, o.logf)
		if err != nil {
			return err
		}
		o.KubeProxy = kp
	}
	return nil
}

// program is the path of one of kubeBinaries: in BinDir, or looked up on PATH when BinDir is
// unknown (Down of a cluster whose state file is gone).
func (o Options) program(name string) string {
	if o.BinDir != "" {
		if p := filepath.Join(o.BinDir, name); fileExists(p) {
			return p
		}
	}
	return name
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// EnsureKubeProxy returns kube-proxy of the same Kubernetes version as the binaries in binDir
// (a <cache>/k8s/v<version>/bin directory made by hack/k8s-binaries.sh), building it on first
// use into <cache>/k8s/v<version>/extra/bin. It builds in a module of its own, seeded with the
// go.mod/go.sum of hack/k8s-binaries.sh's module (which re-points k8s.io/kubernetes' staging
// modules at their published versions), so that script's module is never touched.
func EnsureKubeProxy(ctx context.Context, binDir string, logf func(string, ...any)) (string, error) {
	versionDir := filepath.Dir(binDir)
	extra := filepath.Join(versionDir, "extra")
	out := filepath.Join(extra, "bin", "kube-proxy")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	seed := filepath.Join(versionDir, "module")
	if _, err := os.Stat(filepath.Join(seed, "go.mod")); err != nil {
		return "", fmt.Errorf("cannot build kube-proxy: %s has no go.mod from hack/k8s-binaries.sh", seed)
	}
	moduleDir := filepath.Join(extra, "module")
	for _, d := range []string{moduleDir, filepath.Dir(out)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	lock, err := os.OpenFile(filepath.Join(versionDir, "extra.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err
	}
	if _, err := os.Stat(out); err == nil {
		return out, nil // built by a concurrent caller while we waited for the lock
	}
	gomod, err := os.ReadFile(filepath.Join(seed, "go.mod"))
	if err != nil {
		return "", err
	}
	gomod = regexp.MustCompile(`(?m)^module .*$`).ReplaceAll(gomod, []byte("module apm-csi.local/k8s-extra-binaries"))
	if err := os.WriteFile(filepath.Join(moduleDir, "go.mod"), gomod, 0o644); err != nil {
		return "", err
	}
	if gosum, err := os.ReadFile(filepath.Join(seed, "go.sum")); err == nil {
		if err := os.WriteFile(filepath.Join(moduleDir, "go.sum"), gosum, 0o644); err != nil {
			return "", err
		}
	}
	tools := "//go:build tools\n\npackage tools\n\nimport _ \"k8s.io/kubernetes/cmd/kube-proxy\"\n"
	if err := os.WriteFile(filepath.Join(moduleDir, "tools.go"), []byte(tools), 0o644); err != nil {
		return "", err
	}
	version := strings.TrimPrefix(filepath.Base(versionDir), "v")
	if logf != nil {
		logf("up: building kube-proxy v%s through the Go module proxy (once; cached in %s)", version, out)
	}
	env := append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod")
	steps := [][]string{
		{"go", "mod", "tidy", "-e"},
		{"go", "build", "-trimpath", "-ldflags", "-s -w -X k8s.io/component-base/version.gitVersion=v" + version,
			"-o", out + ".tmp", "k8s.io/kubernetes/cmd/kube-proxy"},
	}
	for _, step := range steps {
		cmd := exec.CommandContext(ctx, step[0], step[1:]...)
		cmd.Dir = moduleDir
		cmd.Env = env
		if output, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("%s: %w\n%s", strings.Join(step, " "), err, output)
		}
	}
	if err := os.Rename(out+".tmp", out); err != nil {
		return "", err
	}
	return out, nil
}

// copyExecutable copies src to dst (mode 0755) through a temporary file, so a running copy of
// dst is never rewritten in place.
func copyExecutable(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	tmp := dst + ".tmp"
	if err := os.WriteFile(tmp, data, 0o755); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return errors.Join(err, os.Remove(tmp))
	}
	return nil
}
