package tracer

import (
	"bytes"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/test/images"
)

//go:embed launcher/launcher.c
var launcherC []byte

// InjectorVersion is the version directory of the test apm-inject image (Datadog's images have
// /opt/datadog-packages/datadog-apm-inject/<version>/ and a "stable" link to it).
const InjectorVersion = "0.0.0-e2e"

// BuildLauncher compiles launcher/launcher.c (a stand-in for Datadog's launcher.preload.so,
// see its comment) with the machine's C compiler into the cache directory, once per source
// and compiler version, and returns the shared object's path. The compiler (gcc, or $CC) is a
// prerequisite of the Datadog drop-in end-to-end scenario: Debian's gcc package.
func BuildLauncher(ctx context.Context) (string, error) {
	cc := os.Getenv("CC")
	if cc == "" {
		cc = "gcc"
	}
	ccPath, err := exec.LookPath(cc)
	if err != nil {
		return "", fmt.Errorf("no C compiler %q on PATH to build the test launcher.preload.so: install Debian's gcc (apt-get install gcc) or set CC", cc)
	}
	ver, err := exec.CommandContext(ctx, ccPath, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", ccPath, err)
	}
	h := sha256.New()
	h.Write(launcherC)
	h.Write(ver)
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	out := filepath.Join(cache, "tracer", "launcher-"+hex.EncodeToString(h.Sum(nil))[:16]+".preload.so")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp(filepath.Dir(out), ".launcher-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	src := filepath.Join(dir, "launcher.c")
	if err := os.WriteFile(src, launcherC, 0o644); err != nil {
		return "", err
	}
	so := filepath.Join(dir, "launcher.preload.so")
	cmd := exec.CommandContext(ctx, ccPath, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", so, src)
	var msg bytes.Buffer
	cmd.Stdout, cmd.Stderr = &msg, &msg
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s launcher.c: %w\n%s", cc, err, msg.String())
	}
	return out, os.Rename(so, out)
}

// InjectorImage builds an apm-inject image in Datadog's layout around the launcher built by
// BuildLauncher: <libref.InjectorSource>/<InjectorVersion>/inject/launcher.preload.so and a
// relative "stable" link to the version, so that libref.LauncherPath (what
// /etc/ld.so.preload and LD_PRELOAD name) is the launcher.
func InjectorImage(launcher string) (v1.Image, error) {
	verDir := path.Join(libref.InjectorSource, InjectorVersion)
	return images.Build(images.Spec{
		Ref: "localhost/apm-csi/" + libref.InjectorPackage + ":" + InjectorVersion,
		Files: []images.File{
			{Path: path.Join(verDir, "inject", "launcher.preload.so"), Source: launcher, Mode: 0o755},
			{Path: path.Join(libref.InjectorSource, "stable"), Symlink: InjectorVersion},
		},
		Labels: map[string]string{
			images.LabelDescription: "apm-inject layout with a test launcher.preload.so that makes node require the injector layout's dd-trace",
			images.LabelVersion:     InjectorVersion,
		},
	})
}

// StartUnixIntake is StartIntake on a unix socket at path (the Datadog Agent's apm.socket),
// writable by every user, as the Agent's socket is.
func StartUnixIntake(path string) (*Intake, error) {
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("trace intake: %w", err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		ln.Close()
		return nil, err
	}
	in := &Intake{ln: ln, changed: make(chan struct{})}
	in.srv = &http.Server{Handler: in, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = in.srv.Serve(ln) }()
	return in, nil
}
