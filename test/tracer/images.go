package tracer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/apm-csi/apm-csi/test/images"
)

// AppRef is the reference of the demo application image (no tracer inside).
const AppRef = "localhost/apm-csi/node-app:local"

// AppPort is the port the demo application serves HTTP on.
const AppPort = 8080

// AppUID is the non-root user the application image runs as (Pod Security "restricted").
const AppUID = 65532

//go:embed app/server.js
var serverJS []byte

// imageFormat is bumped whenever the image builders below change, so cached tarballs of an
// older layout are rebuilt.
const imageFormat = "1"

// copyLibScript is what the image runs as an init container (the classic injection): copy
// the package into the volume shared with the application.
const copyLibScript = `#!/bin/sh
# Copies the JavaScript tracer into the directory given as $1 (the emptyDir shared with the
# application), as Datadog's init-container injection runs it.
set -e
cp -r ` + LibraryPackageDir + `/. "${1:?usage: copy-lib.sh DIR}"
`

// LibraryImage returns the dd-lib-js-init image of the dd-trace installed in ddTraceDir (see
// InstallDDTrace): Datadog's layout, a busybox userland (so it also works as an init
// container), /datadog-init/copy-lib.sh and the tracer under /datadog-init/package/node_modules.
// The image is built once per dd-trace version and kept as a tarball in the cache.
func LibraryImage(ctx context.Context, ddTraceDir string) (v1.Image, error) {
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	ref := "localhost/apm-csi/" + JSLibraryPackage + ":" + DDTraceVersion
	file := filepath.Join(cache, "tracer", fmt.Sprintf("%s-%s-f%s.tar", JSLibraryPackage, DDTraceVersion, imageFormat))
	return cachedImage(file, ref, func() (images.Spec, error) {
		files, busyboxVersion, err := images.BusyboxUserland(ctx, images.DebianBusybox)
		if err != nil {
			return images.Spec{}, err
		}
		files = append(files, images.File{Path: LibraryCopyScript, Data: []byte(copyLibScript), Mode: 0o755})
		pkg, err := treeFiles(filepath.Join(ddTraceDir, "node_modules"), path.Join(LibraryPackageDir, "node_modules"))
		if err != nil {
			return images.Spec{}, err
		}
		return images.Spec{
			Ref:        ref,
			Files:      append(files, pkg...),
			WorkingDir: path.Dir(LibraryCopyScript),
			Cmd:        []string{"/bin/sh", LibraryCopyScript, "/datadog-lib"},
			Labels: map[string]string{
				images.LabelDescription: fmt.Sprintf("dd-trace %s (npm) in Datadog's dd-lib-js-init layout, busybox %s", DDTraceVersion, busyboxVersion),
				images.LabelVersion:     DDTraceVersion,
				images.LabelLicenses:    "Apache-2.0 OR BSD-3-Clause",
			},
		}, nil
	})
}

// AppImage writes the demo application image tarball (AppRef): the machine's node binary with
// the shared libraries it loads (from ldd), the server, and a non-root user; no tracer. The
// tarball is cached in the cache directory, keyed by the binary's and the server's content.
func AppImage(ctx context.Context, node *Node) (string, error) {
	libs, err := sharedLibraries(ctx, node.Binary)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "format %s\n%s\n", imageFormat, serverJS)
	for _, f := range append([]string{node.Binary}, libs...) {
		if err := hashFile(h, f); err != nil {
			return "", err
		}
	}
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	file := filepath.Join(cache, "tracer", "node-app-"+hex.EncodeToString(h.Sum(nil))[:16]+".tar")
	if _, err := os.Stat(file); err == nil {
		return file, nil
	}
	files := []images.File{
		{Path: "/usr/bin/node", Source: node.Binary, Mode: 0o755},
		{Path: "/app/server.js", Data: serverJS},
		{Path: "/etc/passwd", Data: fmt.Appendf(nil, "root:x:0:0:root:/root:/sbin/nologin\napp:x:%d:%d:app:/app:/sbin/nologin\n", AppUID, AppUID)},
		{Path: "/etc/group", Data: fmt.Appendf(nil, "root:x:0:\napp:x:%d:\n", AppUID)},
		{Path: "/tmp", Dir: true, Mode: 0o777 | os.ModeSticky},
	}
	for _, l := range libs {
		files = append(files, images.File{Path: l, Source: l})
	}
	desc := "Node.js " + node.Version + " and a demo HTTP server, without any tracer"
	if node.Package != "" {
		desc += "; node from the Debian package " + node.Package
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return "", err
	}
	if _, err := images.BuildAndWrite(images.Spec{
		Ref:        AppRef,
		Files:      files,
		Entrypoint: []string{"/usr/bin/node", "/app/server.js"},
		Env:        []string{fmt.Sprintf("PORT=%d", AppPort)},
		WorkingDir: "/app",
		User:       fmt.Sprintf("%d:%d", AppUID, AppUID),
		Labels: map[string]string{
			images.LabelDescription: desc,
			images.LabelVersion:     node.Version,
		},
	}, file); err != nil {
		return "", err
	}
	return file, nil
}

// cachedImage loads the image tarball at file, building and writing it first if missing.
func cachedImage(file, ref string, spec func() (images.Spec, error)) (v1.Image, error) {
	tag, err := name.NewTag(ref)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(file); err != nil {
		s, err := spec()
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
			return nil, err
		}
		if _, err := images.BuildAndWrite(s, file); err != nil {
			return nil, err
		}
	}
	return tarball.ImageFromPath(file, &tag)
}

// treeFiles lists a host directory tree as image entries below dst: directories, regular files
// and symbolic links (npm's .bin links), keeping permission bits.
func treeFiles(src, dst string) ([]images.File, error) {
	var out []images.File
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := path.Join(dst, filepath.ToSlash(rel))
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			out = append(out, images.File{Path: target, Dir: true, Mode: info.Mode().Perm()})
		case d.Type()&fs.ModeSymlink != 0:
			link, err := os.Readlink(p)
			if err != nil {
				return err
			}
			out = append(out, images.File{Path: target, Symlink: link})
		case d.Type().IsRegular():
			out = append(out, images.File{Path: target, Source: p, Mode: info.Mode().Perm()})
		default:
			return fmt.Errorf("%s: unsupported file type %s", p, d.Type())
		}
		return nil
	})
	return out, err
}

// sharedLibraries returns the absolute paths of the shared objects binary loads, including
// the dynamic loader, as ldd reports them.
func sharedLibraries(ctx context.Context, binary string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", binary).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", binary, err)
	}
	return parseLdd(out)
}

// parseLdd reads ldd's output: "name => /path (addr)", "/path (addr)" for the loader, and
// "linux-vdso.so.1 (addr)" for the kernel's vDSO, which has no file.
func parseLdd(out []byte) ([]string, error) {
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.Contains(line, "statically linked") {
			continue
		}
		if strings.Contains(line, "not found") {
			return nil, fmt.Errorf("ldd: %s", line)
		}
		p := line
		if _, after, ok := strings.Cut(line, "=>"); ok {
			p = strings.TrimSpace(after)
		}
		p, _, _ = strings.Cut(p, " (")
		p = strings.TrimSpace(p)
		if !strings.HasPrefix(p, "/") {
			continue // vDSO
		}
		libs = append(libs, path.Clean(p))
	}
	return libs, sc.Err()
}

func hashFile(h io.Writer, p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	fmt.Fprintf(h, "%s\n", p)
	_, err = io.Copy(h, f)
	return err
}
