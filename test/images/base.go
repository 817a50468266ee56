package images

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

// References of the images every local cluster imports. The "local" tag is not "latest", so
// pods that name them get imagePullPolicy IfNotPresent and never try to pull; "localhost" as
// the registry host means that even a mistaken pull stays on this machine.
const (
	PauseRef   = "localhost/apm-csi/pause:local"
	BusyboxRef = "localhost/apm-csi/busybox:local"
)

// DebianBusybox is where Debian's busybox-static package installs its static binary.
const DebianBusybox = "/bin/busybox"

// PausePackage is the Go package of the sandbox process.
const PausePackage = "github.com/apm-csi/apm-csi/test/images/pause"

// StaticBinary returns the layer entry for a statically linked host binary, refusing a
// dynamically linked one: the images have no libc, so such a binary would fail at exec with
// a confusing "no such file or directory".
func StaticBinary(src, dst string) (File, error) {
	f, err := elf.Open(src)
	if err != nil {
		return File{}, fmt.Errorf("%s: not an ELF binary: %w", src, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return File{}, fmt.Errorf("%s is dynamically linked; build it with CGO_ENABLED=0", src)
		}
	}
	return File{Path: dst, Source: src, Mode: 0o755}, nil
}

// BuildGoBinary compiles a Go main package statically (CGO_ENABLED=0, trimmed, stripped) to out.
// moduleDir is the directory the go command runs in (the module holding pkg).
func BuildGoBinary(ctx context.Context, moduleDir, pkg, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
	cmd.Dir = moduleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if output, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, output)
	}
	return nil
}

// PauseSpec is the pod sandbox image around a pause binary built from PausePackage.
func PauseSpec(pauseBinary string) (Spec, error) {
	bin, err := StaticBinary(pauseBinary, "/pause")
	if err != nil {
		return Spec{}, err
	}
	return Spec{
		Ref:        PauseRef,
		Files:      []File{bin},
		Entrypoint: []string{"/pause"},
		User:       "65535:65535",
		Labels: map[string]string{
			LabelDescription: "Pod sandbox process for the apm-csi local cluster",
		},
	}, nil
}

// BusyboxSpec is a minimal userland image (sh, wget, httpd, nc, ...) around a static busybox.
func BusyboxSpec(ctx context.Context, busyboxPath string) (Spec, error) {
	files, version, err := BusyboxUserland(ctx, busyboxPath)
	if err != nil {
		return Spec{}, err
	}
	return Spec{
		Ref:   BusyboxRef,
		Files: files,
		Cmd:   []string{"sh"},
		Labels: map[string]string{
			LabelDescription: "BusyBox userland from Debian's busybox-static",
			LabelVersion:     version,
			LabelLicenses:    "GPL-2.0-only",
		},
	}, nil
}

var busyboxVersion = regexp.MustCompile(`BusyBox v([0-9][^ ]*)`)

// BusyboxUserland returns the layer entries of a busybox userland: the binary, one symlink per
// applet in /bin, /etc/passwd and /etc/group with root and nobody, and a sticky /tmp. It also
// returns busybox's version. Binary images add these for a shell to debug with.
func BusyboxUserland(ctx context.Context, busyboxPath string) ([]File, string, error) {
	bin, err := StaticBinary(busyboxPath, "/bin/busybox")
	if err != nil {
		return nil, "", err
	}
	list, err := exec.CommandContext(ctx, busyboxPath, "--list").Output()
	if err != nil {
		return nil, "", fmt.Errorf("%s --list: %w", busyboxPath, err)
	}
	// busybox prints its banner on stdout and exits non-zero when run without an applet.
	banner, _ := exec.CommandContext(ctx, busyboxPath).Output()
	m := busyboxVersion.FindSubmatch(banner)
	if m == nil {
		return nil, "", errors.New("cannot read busybox version from its banner")
	}
	files := []File{
		bin,
		{Path: "/etc/passwd", Data: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		{Path: "/etc/group", Data: []byte("root:x:0:\nnobody:x:65534:\n")},
		{Path: "/tmp", Dir: true, Mode: 0o777 | os.ModeSticky},
		{Path: "/root", Dir: true, Mode: 0o700},
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" || strings.ContainsRune(applet, '/') {
			continue
		}
		files = append(files, File{Path: "/bin/" + applet, Symlink: "busybox"})
	}
	return files, string(bytes.TrimSpace(m[1])), nil
}

// BuildBase writes the pause and busybox image tarballs into outDir (pause.tar, busybox.tar),
// compiling the pause program from moduleDir (the apm-csi repository root).
func BuildBase(ctx context.Context, moduleDir, outDir string) ([]Tarball, error) {
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, err
	}
	buildDir, err := os.MkdirTemp(outDir, ".build-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(buildDir)
	pauseBin := filepath.Join(buildDir, "pause")
	if err := BuildGoBinary(ctx, moduleDir, PausePackage, pauseBin); err != nil {
		return nil, err
	}
	pause, err := PauseSpec(pauseBin)
	if err != nil {
		return nil, err
	}
	busybox, err := BusyboxSpec(ctx, DebianBusybox)
	if err != nil {
		return nil, err
	}
	var out []Tarball
	for _, image := range []struct {
		file string
		spec Spec
	}{{"pause.tar", pause}, {"busybox.tar", busybox}} {
		tb, err := BuildAndWrite(image.spec, filepath.Join(outDir, image.file))
		if err != nil {
			return nil, err
		}
		out = append(out, tb)
	}
	return out, nil
}
