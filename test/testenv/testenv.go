// Package testenv holds the prerequisite checks shared by the root-only test suites under
// test/. A missing prerequisite skips the test on a developer machine but fails it under CI
// (CI=true): CI must never turn green by skipping.
package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// InCI reports whether the tests run under CI.
func InCI() bool { return os.Getenv("CI") == "true" }

// Missing reports a missing prerequisite: it skips the test locally and fails it under CI.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("prerequisite missing under CI=true: "+format, args...)
	}
	t.Skipf("prerequisite missing: "+format, args...)
}

// Unsupported skips a test whose prerequisite is a property of the kernel or of the sandbox
// the tests run in (a kernel built without a quota format, a capability the container runtime
// withholds), which no install step of the project can provide. Unlike Missing it skips under
// CI too, and says so in the test output; use it only after probing the feature itself, never
// for a program or package the project can install.
func Unsupported(t testing.TB, format string, args ...any) {
	t.Helper()
	t.Skipf("not supported by this kernel or sandbox (cannot be installed by the project): "+format, args...)
}

// RequireRoot needs uid 0 (real mounts, network namespaces).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "root is required (real mounts); run `sudo make test-integration`")
	}
}

// RequireBinary returns the path of a program on PATH.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, "%s not on PATH; run `make deps`", name)
	}
	return p
}

// KubebuilderAssets returns the directory holding kube-apiserver, etcd and kubectl, as set by
// the Makefile (hack/install-deps.sh prints it).
func KubebuilderAssets(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("KUBEBUILDER_ASSETS")
	if dir == "" {
		Missing(t, "KUBEBUILDER_ASSETS is not set; run through `make test-integration`")
	}
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			Missing(t, "%s not found in KUBEBUILDER_ASSETS=%s; run `make deps`", b, dir)
		}
	}
	return dir
}

// Step runs f as the subtest name of a test whose steps build on each other (a process
// started, then served, then stopped) and reports whether f ran to its end: false after a
// Fatal or Skip, true after only Errorf. The caller returns when a step the next ones need
// did not complete, so that one failure is reported once and not again by every later step.
func Step(t *testing.T, name string, f func(t *testing.T)) bool {
	t.Helper()
	completed := false
	t.Run(name, func(t *testing.T) {
		f(t)
		completed = true
	})
	return completed
}
