// Package libimages builds tracer library images for tests: images in Datadog's layouts
// (dd-lib-<lang>-init, apm-inject), large images for benchmarks, hostile images for the
// extractor, and an in-process OCI registry that serves them on 127.0.0.1 and counts what
// clients fetch. No test needs a public registry.
package libimages

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"path"
	"runtime"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/apm-csi/apm-csi/shared/libref"
)

// Entry is one raw tar entry. Hostile layers are built from these, so any header a tool could
// write is possible.
type Entry struct {
	Header tar.Header
	Body   []byte
}

// File returns a regular file entry.
func File(name string, body string, mode int64) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(body)), ModTime: epoch}, Body: []byte(body)}
}

// Dir returns a directory entry.
func Dir(name string, mode int64) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, ModTime: epoch}}
}

// Symlink returns a symbolic link entry.
func Symlink(name, target string) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: epoch}}
}

// Hardlink returns a hard link entry; target is relative to the archive root.
func Hardlink(name, target string) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: 0o755, ModTime: epoch}}
}

// epoch is the modification time of generated files, fixed so images are reproducible.
var epoch = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

// Layer builds a gzip layer holding entries in order.
func Layer(entries ...Entry) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.Header
		if err := tw.WriteHeader(&h); err != nil {
			return nil, fmt.Errorf("tar header %q: %w", h.Name, err)
		}
		if _, err := tw.Write(e.Body); err != nil {
			return nil, fmt.Errorf("tar body %q: %w", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithCompressedCaching)
}

// Image stacks layers (first = bottom) into an image for linux and this machine's
// architecture, the platform the node plugin pulls for.
func Image(layers ...v1.Layer) (v1.Image, error) {
	return ImageFor(v1.Platform{OS: "linux", Architecture: runtime.GOARCH}, layers...)
}

// ImageFor is Image for another platform.
func ImageFor(p v1.Platform, layers ...v1.Layer) (v1.Image, error) {
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture, cfg.Variant = p.OS, p.Architecture, p.Variant
	cfg.Created = v1.Time{Time: epoch}
	return mutate.ConfigFile(img, cfg)
}

// Index builds a multi-platform image index from images keyed by platform.
func Index(images map[string]v1.Image) (v1.ImageIndex, error) {
	var adds []mutate.IndexAddendum
	for _, key := range slices.Sorted(maps.Keys(images)) {
		p, err := v1.ParsePlatform(key)
		if err != nil {
			return nil, err
		}
		adds = append(adds, mutate.IndexAddendum{Add: images[key], Descriptor: v1.Descriptor{Platform: p}})
	}
	return mutate.AppendManifests(empty.Index, adds...), nil
}

// baseLayer mimics the small base image Datadog's init images start from: a busybox binary
// reached through hardlinks and an absolute symlink, and /etc files.
func baseLayer() (v1.Layer, error) {
	return Layer(
		Dir("bin", 0o755),
		File("bin/busybox", "\x7fELF fake busybox", 0o755),
		Hardlink("bin/sh", "bin/busybox"),
		Hardlink("bin/cp", "bin/busybox"),
		Dir("etc", 0o755),
		File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
		Dir("usr", 0o755),
		Dir("usr/bin", 0o755),
		Symlink("usr/bin/env", "/bin/busybox"),
		Dir("tmp", 0o1777),
	)
}

// LibraryFiles returns the files (path below libref.LibrarySource -> content) that Library
// puts into a language's package, so tests can compare what a volume shows.
func LibraryFiles(lang, version string) map[string]string {
	stamp := fmt.Sprintf("%s tracer %s\n", lang, version)
	files := map[string]string{"version": version + "\n"}
	switch lang {
	case "java":
		files["dd-java-agent.jar"] = "PK\x03\x04 " + stamp
	case "js":
		files["node_modules/dd-trace/init.js"] = "// " + stamp
		files["node_modules/dd-trace/package.json"] = `{"name":"dd-trace","version":"` + version + `"}` + "\n"
	case "python":
		files["ddtrace/__init__.py"] = "# " + stamp
		files["ddtrace/bootstrap/sitecustomize.py"] = "# " + stamp
		files["sitecustomize.py"] = "from ddtrace.bootstrap import sitecustomize  # " + stamp
	case "dotnet":
		files["Datadog.Trace.ClrProfiler.Native.so"] = "\x7fELF " + stamp
		files["net6.0/Datadog.Trace.dll"] = "MZ " + stamp
		files["logs/.keep"] = ""
	case "ruby":
		files["auto_inject.rb"] = "# " + stamp
	case "php":
		files["dd-library-php/trace/datadog-setup.php"] = "<?php // " + stamp
	default:
		files["library.txt"] = stamp
	}
	return files
}

// Library builds a dd-lib-<lang>-init image: a base layer, then a layer with the tracer under
// /datadog-init/package and the copy script the init container runs.
func Library(lang, version string) (v1.Image, error) {
	base, err := baseLayer()
	if err != nil {
		return nil, err
	}
	pkg := strings.TrimPrefix(libref.LibrarySource, "/")
	entries := []Entry{Dir("datadog-init", 0o755), Dir(pkg, 0o755), File("datadog-init/copy-lib.sh", "#!/bin/sh\ncp -r /datadog-init/package/. \"$1\"\n", 0o755)}
	entries = append(entries, filesEntries(pkg, LibraryFiles(lang, version))...)
	payload, err := Layer(entries...)
	if err != nil {
		return nil, err
	}
	return Image(base, payload)
}

// InjectorFiles returns the files below libref.InjectorSource that Injector creates, with
// the stable symlink resolved (stable/inject/... appears as a path too).
func InjectorFiles(version string) map[string]string {
	files := map[string]string{}
	for name, body := range injectorVersionFiles(version) {
		files[path.Join(version, name)] = body
		files[path.Join("stable", name)] = body
	}
	return files
}

func injectorVersionFiles(version string) map[string]string {
	return map[string]string{
		"inject/launcher.preload.so": "\x7fELF launcher " + version + "\n",
		"inject/process":             "\x7fELF process " + version + "\n",
	}
}

// Injector builds an apm-inject image: /opt/datadog-packages/datadog-apm-inject/<version>/...
// plus a relative "stable" symlink to the version, which is what ld.so.preload names.
func Injector(version string) (v1.Image, error) {
	base, err := baseLayer()
	if err != nil {
		return nil, err
	}
	src := strings.TrimPrefix(libref.InjectorSource, "/")
	entries := []Entry{Dir("opt", 0o755), Dir("opt/datadog-packages", 0o755), Dir(src, 0o755)}
	entries = append(entries, filesEntries(path.Join(src, version), injectorVersionFiles(version))...)
	entries = append(entries, Symlink(path.Join(src, "stable"), version))
	payload, err := Layer(entries...)
	if err != nil {
		return nil, err
	}
	return Image(base, payload)
}

// filesEntries turns relative files into entries below dir, with their parent directories.
func filesEntries(dir string, files map[string]string) []Entry {
	var out []Entry
	seen := map[string]bool{}
	for _, name := range slices.Sorted(maps.Keys(files)) {
		full := path.Join(dir, name)
		var parents []string
		for p := path.Dir(full); p != dir && p != "." && !seen[p]; p = path.Dir(p) {
			parents = append(parents, p)
			seen[p] = true
		}
		slices.Reverse(parents)
		for _, p := range parents {
			out = append(out, Dir(p, 0o755))
		}
		mode := int64(0o644)
		if strings.HasSuffix(name, ".so") || strings.HasSuffix(name, "process") {
			mode = 0o755
		}
		out = append(out, File(full, files[name], mode))
	}
	return out
}

// LargeFileSize is the size of each file in a Large image: tracer jars and native libraries
// are a few MB each.
const LargeFileSize = 4 << 20

// Large builds a library image whose package holds about size bytes of incompressible data
// (like jars and shared objects) in LargeFileSize files, derived from seed. The layer is
// compressed at the fastest level so building a 100 MB image takes a second or two.
func Large(size int64, seed uint64) (v1.Image, error) {
	base, err := baseLayer()
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	rng := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), byte(seed >> 24)})
	pkg := strings.TrimPrefix(libref.LibrarySource, "/")
	for _, d := range []string{"datadog-init", pkg, pkg + "/lib"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch}); err != nil {
			return nil, err
		}
	}
	for i := 0; int64(i)*LargeFileSize < size; i++ {
		n := min(LargeFileSize, size-int64(i)*LargeFileSize)
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%s/lib/part-%04d.jar", pkg, i), Mode: 0o644, Size: n, ModTime: epoch}); err != nil {
			return nil, err
		}
		if _, err := io.CopyN(tw, rng, n); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	payload, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithCompressedCaching, tarball.WithCompressionLevel(gzip.BestSpeed))
	if err != nil {
		return nil, err
	}
	return Image(base, payload)
}

// NodeArch is the architecture Image builds for and the node plugin pulls.
func NodeArch() string { return runtime.GOARCH }
