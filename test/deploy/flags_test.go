package deploy

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/testenv"
	webhookconfig "github.com/apm-csi/apm-csi/webhook/config"
)

// binaryPackages are the main packages of the two programs the manifests run.
var binaryPackages = map[string]string{
	names.NodeBinary:    "./nodeplugin/cmd/apm-csi-node",
	names.WebhookBinary: "./webhook/cmd/apm-csi-webhook",
}

// FlagInfo is what a binary's --help says about one flag.
type FlagInfo struct {
	Name string
	// Bool flags take no separate value (only --name or --name=true|false).
	Bool bool
}

var built struct {
	sync.Mutex
	flags map[string]map[string]FlagInfo
	paths map[string]string
	dir   string
}

// helpFlagLine matches a flag line of Go's flag package ("  -name type") and of pflag
// ("  -n, --name type"); group 2 is the type word, absent for bool flags.
var helpFlagLine = regexp.MustCompile(`(?m)^\s{1,8}(?:-[A-Za-z0-9], )?--?([A-Za-z0-9][A-Za-z0-9._-]*)(?:[ \t]+([A-Za-z0-9.\[\]<>]+))?[ \t]*(?:\t.*)?$`)

// ParseHelp extracts the flags from a --help text.
func ParseHelp(help string) map[string]FlagInfo {
	out := map[string]FlagInfo{}
	for _, m := range helpFlagLine.FindAllStringSubmatch(help, -1) {
		typ := m[2]
		out[m[1]] = FlagInfo{Name: m[1], Bool: typ == "" || typ == "bool"}
	}
	return out
}

// BinaryFlags builds a binary from this tree with `go build` and returns the flags its
// --help lists. A binary that does not build, or lists too few flags to be a real parse, fails
// the test: under CI a missing binary is a failure, never a skip.
func BinaryFlags(t testing.TB, binary string) map[string]FlagInfo {
	t.Helper()
	built.Lock()
	defer built.Unlock()
	return binaryFlagsLocked(t, binary)
}

// BuiltBinary returns the path of the binary built by BinaryFlags.
func BuiltBinary(t testing.TB, binary string) string {
	t.Helper()
	built.Lock()
	defer built.Unlock()
	binaryFlagsLocked(t, binary)
	return built.paths[binary]
}

func binaryFlagsLocked(t testing.TB, binary string) map[string]FlagInfo {
	t.Helper()
	if f, ok := built.flags[binary]; ok {
		return f
	}
	pkg := binaryPackages[binary]
	root := repoRoot(t)
	if _, err := os.Stat(filepath.Join(root, pkg, "main.go")); err != nil {
		msg := fmt.Sprintf("%s has no main.go yet: the manifests run a binary that does not exist", pkg)
		testenv.Missing(t, "%s", msg)
	}
	// One directory for the whole test binary (t.TempDir would vanish with the first test).
	if built.dir == "" {
		dir, err := os.MkdirTemp("", "apm-csi-deploy-test-")
		if err != nil {
			t.Fatal(err)
		}
		built.dir = dir
	}
	out := filepath.Join(built.dir, binary)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	// --help exits non-zero with some flag libraries; only the text matters.
	help := exec.CommandContext(ctx, out, "--help")
	var buf bytes.Buffer
	help.Stdout, help.Stderr = &buf, &buf
	_ = help.Run()
	flags := ParseHelp(buf.String())
	delete(flags, "help")
	delete(flags, "h")
	if len(flags) < 3 {
		t.Fatalf("%s --help lists %d flags; cannot check the manifests against it:\n%s", binary, len(flags), buf.String())
	}
	if built.flags == nil {
		built.flags = map[string]map[string]FlagInfo{}
		built.paths = map[string]string{}
	}
	built.flags[binary] = flags
	built.paths[binary] = out
	return flags
}

// checkArgs: every word of a container's command line is a flag the binary accepts, written
// --name=value (or --name alone for a bool flag), so that no value is mistaken for a flag.
func checkArgs(c *corev1.Container, flags map[string]FlagInfo) []error {
	var errs []error
	for _, a := range Args(c) {
		if !strings.HasPrefix(a, "--") {
			errs = append(errs, fmt.Errorf("container %s: argument %q: write every flag as --name=value", c.Name, a))
			continue
		}
		name, _, hasValue := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		info, ok := flags[name]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("container %s: flag --%s is not accepted by %s (it accepts: %s)", c.Name, name, Binary(c), flagNames(flags)))
		case !hasValue && !info.Bool:
			errs = append(errs, fmt.Errorf("container %s: flag --%s needs =value", c.Name, name))
		}
	}
	return errs
}

// checkEnv: APM_CSI_* variables of the node plugin name real flags (the binary reads every
// flag from APM_CSI_<FLAG> too, and ignores a variable that names none).
func checkEnv(c *corev1.Container, flags map[string]FlagInfo) []error {
	var errs []error
	for _, e := range c.Env {
		if rest, ok := strings.CutPrefix(e.Name, "APM_CSI_"); ok {
			name := strings.ToLower(strings.ReplaceAll(rest, "_", "-"))
			if _, ok := flags[name]; !ok {
				errs = append(errs, fmt.Errorf("container %s: env %s names no flag of %s", c.Name, e.Name, Binary(c)))
			}
		}
	}
	return errs
}

func flagNames(flags map[string]FlagInfo) string {
	var ns []string
	for n := range flags {
		ns = append(ns, "--"+n)
	}
	sort.Strings(ns)
	return strings.Join(ns, " ")
}

// TestFlagsMatchBinaries builds both binaries and checks every flag of every rendered
// manifest against their --help.
func TestFlagsMatchBinaries(t *testing.T) {
	nodeFlags := BinaryFlags(t, names.NodeBinary)
	webhookFlags := BinaryFlags(t, names.WebhookBinary)

	// Negative control: the checker rejects an unknown flag and a bool-less value-less flag.
	probe := &corev1.Container{Name: "probe", Image: "x/apm-csi-node:1", Args: []string{"--no-such-flag=1", "--state-dir"}}
	if errs := checkArgs(probe, nodeFlags); len(errs) != 2 {
		t.Fatalf("flag checker missed a bad command line: %v", errs)
	}

	forEachVariant(t, func(t *testing.T, v Variant, s Set) {
		in := install(t, s)
		for _, spec := range podSpecs(in) {
			all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
			for i := range all {
				c := &all[i]
				var flags map[string]FlagInfo
				switch Binary(c) {
				case names.NodeBinary:
					flags = nodeFlags
				case names.WebhookBinary:
					flags = webhookFlags
				default:
					continue
				}
				if len(c.Command) > 0 && filepath.Base(c.Command[0]) != Binary(c) {
					t.Errorf("container %s: command %v does not run %s", c.Name, c.Command, Binary(c))
				}
				report(t, checkArgs(c, flags))
				report(t, checkEnv(c, flags))
			}
		}
	})
}

// TestConfigFiles parses the configuration files the manifests mount with the binaries' own
// parsers: the node plugin's --config (hostdir allowlist) and the webhook's --config.
func TestConfigFiles(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant, s Set) {
		in := install(t, s)

		nodeSpec := &in.Node.Spec.Template.Spec
		if p := FlagValue(t, in.NodeContainer, "config", ""); p != "" {
			data, err := FileFromConfigMap(t, s, in.Node.Namespace, nodeSpec, in.NodeContainer, p)
			if err != nil {
				t.Fatalf("node plugin --config: %v", err)
			}
			cfg, err := hostdir.ParseConfig([]byte(data))
			if err != nil {
				t.Fatalf("node plugin --config %s is refused by the node plugin: %v\n%s", p, err, data)
			}
			set, err := hostdir.NewSet(cfg.HostDirs)
			if err != nil {
				t.Errorf("node plugin --config: %v", err)
			} else if _, err := hostdir.Resolve(set); err != nil {
				// Nesting: an entry inside a writable or created entry is refused at start.
				t.Errorf("node plugin --config is refused at start: %v", err)
			}
			// Every allowlisted path must exist inside the container: the node plugin
			// bind-mounts it by that path, so it needs a hostPath volume mounted at the same
			// place (for a socket, its directory).
			for _, e := range cfg.HostDirs {
				hp := HostPathOf(nodeSpec, in.NodeContainer, e.Path)
				if hp != e.Path {
					t.Errorf("hostdir %s=%s: the path is not a hostPath mounted at the same path in the node container (got %q)", e.Name, e.Path, hp)
				}
			}
			for _, f := range FlagValues(t, in.NodeContainer, "hostdir") {
				e, err := hostdir.ParseEntry(f)
				if err != nil {
					t.Errorf("--hostdir=%s: %v", f, err)
					continue
				}
				if hp := HostPathOf(nodeSpec, in.NodeContainer, e.Path); hp != e.Path {
					t.Errorf("--hostdir=%s is not mounted at the same path (got %q)", f, hp)
				}
			}
		}

		if in.DropIn {
			return // no webhook: checkDatadogDropIn checks the socket entries
		}
		whSpec := &in.Webhook.Spec.Template.Spec
		p := FlagValue(t, in.WebhookCont, "config", "")
		if p == "" {
			t.Fatalf("the webhook container has no --config flag")
		}
		data, err := FileFromConfigMap(t, s, in.Webhook.Namespace, whSpec, in.WebhookCont, p)
		if err != nil {
			t.Fatalf("webhook --config: %v", err)
		}
		cfg, err := webhookconfig.Parse([]byte(data))
		if err != nil {
			t.Fatalf("webhook --config %s is refused by the webhook: %v\n%s", p, err, data)
		}
		if cfg.DriverName != names.DriverName {
			t.Errorf("webhook driverName %q, but the CSIDriver is %s", cfg.DriverName, names.DriverName)
		}
		// The webhook's own exclusions and the configuration's must agree with the selector:
		// a namespace the configuration excludes is never sent to it at all.
		for _, ns := range cfg.ExcludedNamespaces {
			if slices.Contains([]string{"kube-system", v.Namespace}, ns) {
				continue
			}
			report(t, checkWebhookSelectors(in.WebhookConfigs, ns))
		}
	})
}
