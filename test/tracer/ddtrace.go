// Package tracer provides the real tracer for the end-to-end tests and `make demo`: Datadog's
// JavaScript tracer (the dd-trace npm package, installed with npm) packaged as a library
// image in Datadog's dd-lib-js-init layout, an application image with Node.js taken from the
// machine's Debian package and no tracer in it, and a small trace intake that stands in for
// the Datadog Agent's trace API and decodes what the tracer sends.
package tracer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// DDTraceVersion is the pinned dd-trace release. dd-trace 6.x needs Node.js >= 22; the 5.x
// line supports Node.js >= 18, which covers Debian 12's nodejs package (18.20.4) and the
// Node.js 20 packages found on the development machines. Change it together with
// MinNodeMajor.
const DDTraceVersion = "5.132.0"

// MinNodeMajor is the oldest Node.js major version DDTraceVersion supports (its package.json
// "engines" field, checked again after installing).
const MinNodeMajor = 18

// JSLibraryPackage is the repository name of Datadog's JavaScript library image.
const JSLibraryPackage = "dd-lib-js-init"

// Paths of Datadog's dd-lib-js-init layout: the package directory holds node_modules with
// dd-trace and its dependencies; copy-lib.sh copies the package into the shared volume when
// the image runs as an init container.
const (
	LibraryPackageDir = "/datadog-init/package"
	LibraryCopyScript = "/datadog-init/copy-lib.sh"
	// InitModule is dd-trace's auto-initialising entry point, relative to the package dir.
	InitModule = "node_modules/dd-trace/init"
)

// CacheDir is the directory that keeps what is slow to rebuild between runs: the same place
// hack/k8s-binaries.sh and hack/helm.sh use ($APM_CSI_CACHE, else ~/.cache/apm-csi).
func CacheDir() (string, error) {
	if d := os.Getenv("APM_CSI_CACHE"); d != "" {
		return d, nil
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", err
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "apm-csi"), nil
}

// Node describes the Node.js runtime found on the machine.
type Node struct {
	// Binary is the resolved path of the node executable.
	Binary string
	// Version is what `node --version` prints, without the leading v.
	Version string
	Major   int
	// Package is the Debian package (name and version) that installed Binary.
	Package string
}

var nodeVersion = regexp.MustCompile(`^v(\d+)\.\d+\.\d+`)

// FindNode locates node and npm on PATH and checks that the node version runs DDTraceVersion.
// On a machine without them, install Debian's: apt-get install nodejs npm.
func FindNode(ctx context.Context) (*Node, error) {
	var missing []string
	for _, p := range []string{"node", "npm"} {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%s not on PATH: install Debian's Node.js with `apt-get install nodejs npm`", strings.Join(missing, " and "))
	}
	p, _ := exec.LookPath("node")
	bin, err := filepath.EvalSymlinks(p)
	if err != nil {
		return nil, err
	}
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --version: %w", bin, err)
	}
	v := strings.TrimSpace(string(out))
	m := nodeVersion.FindStringSubmatch(v)
	if m == nil {
		return nil, fmt.Errorf("cannot parse the Node.js version %q", v)
	}
	major, _ := strconv.Atoi(m[1])
	n := &Node{Binary: bin, Version: strings.TrimPrefix(v, "v"), Major: major}
	if major < MinNodeMajor {
		return nil, fmt.Errorf("the Node.js %s at %s is older than %d, the oldest dd-trace %s supports", v, bin, MinNodeMajor, DDTraceVersion)
	}
	n.Package = debianPackage(ctx, p, bin)
	return n, nil
}

// debianPackage names the package that owns the binary ("" if dpkg does not know it).
func debianPackage(ctx context.Context, paths ...string) string {
	for _, p := range paths {
		out, err := exec.CommandContext(ctx, "dpkg-query", "-S", p).Output()
		if err != nil {
			continue
		}
		pkg, _, ok := strings.Cut(strings.TrimSpace(string(out)), ":")
		if !ok {
			continue
		}
		ver, err := exec.CommandContext(ctx, "dpkg-query", "-W", "-f=${Version}", pkg).Output()
		if err != nil {
			return pkg
		}
		return pkg + " " + strings.TrimSpace(string(ver))
	}
	return ""
}

// InstallDDTrace installs dd-trace@DDTraceVersion with npm into
// <CacheDir>/tracer/dd-trace-<version> (once; later calls reuse it) and returns that directory,
// which holds node_modules/dd-trace and its dependencies, as Datadog's image build does.
// Install scripts are not run: every native part of dd-trace ships prebuilt.
func InstallDDTrace(ctx context.Context, logf func(string, ...any)) (string, error) {
	return npmInstallation{
		name:      "dd-trace-" + DDTraceVersion,
		tmpPrefix: ".dd-trace-",
		project:   "apm-csi-dd-lib-js-init",
		label:     "dd-trace@" + DDTraceVersion,
		packages:  []string{"dd-trace@" + DDTraceVersion},
		check:     checkDDTrace,
	}.install(ctx, logf)
}

// checkDDTrace verifies an installation: the pinned version and the init module.
func checkDDTrace(dir string) error {
	pj, err := os.ReadFile(filepath.Join(dir, "node_modules", "dd-trace", "package.json"))
	if err != nil {
		return err
	}
	var meta struct {
		Version string            `json:"version"`
		Engines map[string]string `json:"engines"`
	}
	if err := json.Unmarshal(pj, &meta); err != nil {
		return err
	}
	if meta.Version != DDTraceVersion {
		return fmt.Errorf("dd-trace %s installed, want %s", meta.Version, DDTraceVersion)
	}
	if want := fmt.Sprintf(">=%d", MinNodeMajor); !strings.HasPrefix(strings.ReplaceAll(meta.Engines["node"], " ", ""), want) {
		return fmt.Errorf("dd-trace %s declares engines.node %q; MinNodeMajor (%d) is out of date", meta.Version, meta.Engines["node"], MinNodeMajor)
	}
	if _, err := os.Stat(filepath.Join(dir, InitModule+".js")); err != nil {
		return errors.New("dd-trace has no init.js: the direct layout's NODE_OPTIONS=--require=.../dd-trace/init would fail")
	}
	return nil
}
