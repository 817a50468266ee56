package images

import (
	"archive/tar"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// extractFiles flattens img into a map of path -> header (and content for regular files).
func extractFiles(t *testing.T, rc io.ReadCloser) (map[string]*tar.Header, map[string]string) {
	t.Helper()
	defer rc.Close()
	headers := map[string]*tar.Header{}
	contents := map[string]string{}
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		// mutate.Extract keeps names as written; normalise directories to their bare path.
		headers[strings.TrimSuffix(hdr.Name, "/")] = hdr
		if hdr.Typeflag == tar.TypeReg {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			contents[hdr.Name] = string(b)
		}
	}
	return headers, contents
}

func TestBuildWritesLoadableReproducibleImage(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "tool")
	if err := os.WriteFile(src, []byte("#!/bin/sh\necho hi\n"), 0o750); err != nil {
		t.Fatal(err)
	}
	spec := Spec{
		Ref: "localhost/apm-csi/example:dev",
		Files: []File{
			{Path: "/usr/local/bin/tool", Source: src},
			{Path: "/etc/example/config", Data: []byte("k=v\n")},
			{Path: "/usr/local/bin/alias", Symlink: "tool"},
		},
		Entrypoint: []string{"/usr/local/bin/tool"},
		Env:        []string{"MODE=test"},
		Labels:     map[string]string{LabelVersion: "1.2.3"},
	}
	first, err := BuildAndWrite(spec, filepath.Join(dir, "a.tar"))
	if err != nil {
		t.Fatal(err)
	}
	second, err := BuildAndWrite(spec, filepath.Join(dir, "b.tar"))
	if err != nil {
		t.Fatal(err)
	}
	if first.Digest != second.Digest {
		t.Fatalf("same spec built twice gave digests %s and %s; builds must be reproducible", first.Digest, second.Digest)
	}

	tag, err := name.NewTag(spec.Ref)
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(first.Path, &tag)
	if err != nil {
		t.Fatalf("tarball does not load back: %v", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != runtime.GOARCH {
		t.Errorf("platform %s/%s, want linux/%s", cfg.OS, cfg.Architecture, runtime.GOARCH)
	}
	if got := cfg.Config.Entrypoint; len(got) != 1 || got[0] != "/usr/local/bin/tool" {
		t.Errorf("entrypoint %v", got)
	}
	wantLabels := map[string]string{
		LabelTitle:   "example",
		LabelSource:  ProjectSource,
		LabelVersion: "1.2.3",
		LabelCreated: "1970-01-01T00:00:00Z",
	}
	for k, v := range wantLabels {
		if cfg.Config.Labels[k] != v {
			t.Errorf("label %s = %q, want %q", k, cfg.Config.Labels[k], v)
		}
	}
	if cfg.Config.Env[0] != DefaultPath || cfg.Config.Env[1] != "MODE=test" {
		t.Errorf("env %v, want default PATH then MODE=test", cfg.Config.Env)
	}

	headers, contents := extractFiles(t, mutate.Extract(img))
	if h := headers["usr/local/bin/tool"]; h == nil || h.Mode != 0o750 || h.Uid != 0 {
		t.Errorf("tool entry %+v, want mode 0750 owned by root", h)
	}
	if contents["etc/example/config"] != "k=v\n" || headers["etc/example/config"].Mode != 0o644 {
		t.Errorf("inline file wrong: %q mode %o", contents["etc/example/config"], headers["etc/example/config"].Mode)
	}
	if h := headers["usr/local/bin/alias"]; h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != "tool" {
		t.Errorf("symlink entry %+v", h)
	}
	for _, d := range []string{"usr", "usr/local", "usr/local/bin", "etc", "etc/example"} {
		if h := headers[d]; h == nil || h.Typeflag != tar.TypeDir {
			t.Errorf("parent directory %s missing", d)
		}
	}
}

func TestBuildUsesOCIMediaTypes(t *testing.T) {
	img, err := Build(Spec{Ref: "localhost/apm-csi/x:1", Files: []File{{Path: "/x", Data: []byte("x")}}})
	if err != nil {
		t.Fatal(err)
	}
	mt, err := img.MediaType()
	if err != nil || mt != types.OCIManifestSchema1 {
		t.Errorf("manifest media type %s (%v), want %s", mt, err, types.OCIManifestSchema1)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %d (%v), want 1", len(layers), err)
	}
	if lmt, _ := layers[0].MediaType(); lmt != types.OCILayer {
		t.Errorf("layer media type %s, want %s", lmt, types.OCILayer)
	}
}

func TestBuildRejectsBadFiles(t *testing.T) {
	for name, files := range map[string][]File{
		"relative path":     {{Path: "etc/x", Data: []byte("x")}},
		"duplicate":         {{Path: "/x", Data: []byte("a")}, {Path: "/x", Data: []byte("b")}},
		"file under a file": {{Path: "/a", Data: []byte("a")}, {Path: "/a/b", Data: []byte("b")}},
	} {
		if _, err := Build(Spec{Ref: "localhost/apm-csi/x:1", Files: files}); err == nil {
			t.Errorf("%s: Build accepted %+v", name, files)
		}
	}
}

func TestStaticBinaryRejectsDynamicExecutables(t *testing.T) {
	// The go command itself is a static Go binary on the machines we run on only sometimes;
	// /bin/sh (dash/bash) is always dynamically linked on Debian.
	if _, err := StaticBinary("/bin/sh", "/sh"); err == nil {
		t.Error("StaticBinary accepted dynamically linked /bin/sh")
	}
	if _, err := StaticBinary("/etc/hostname", "/x"); err == nil {
		t.Error("StaticBinary accepted a non-ELF file")
	}
}

func TestBuildBaseImages(t *testing.T) {
	if _, err := os.Stat(DebianBusybox); err != nil {
		t.Skipf("%s missing (Debian busybox-static, installed by `make deps`)", DebianBusybox)
	}
	ctx := context.Background()
	out := t.TempDir()
	tarballs, err := BuildBase(ctx, "../..", out)
	if err != nil {
		t.Fatal(err)
	}
	if len(tarballs) != 2 {
		t.Fatalf("got %d tarballs, want pause and busybox", len(tarballs))
	}
	for _, tb := range tarballs {
		tag, err := name.NewTag(tb.Ref)
		if err != nil {
			t.Fatal(err)
		}
		img, err := tarball.ImageFromPath(tb.Path, &tag)
		if err != nil {
			t.Fatalf("%s: %v", tb.Path, err)
		}
		headers, _ := extractFiles(t, mutate.Extract(img))
		switch tb.Ref {
		case PauseRef:
			if h := headers["pause"]; h == nil || h.Mode&0o111 == 0 {
				t.Errorf("pause image lacks an executable /pause: %+v", h)
			}
		case BusyboxRef:
			if h := headers["bin/sh"]; h == nil || h.Linkname != "busybox" {
				t.Errorf("busybox image lacks /bin/sh -> busybox: %+v", h)
			}
			if h := headers["tmp"]; h == nil || h.Mode != 0o1777 {
				t.Errorf("busybox /tmp entry %+v, want mode 1777", h)
			}
			cfg, _ := img.ConfigFile()
			if cfg.Config.Labels[LabelVersion] == "" {
				t.Error("busybox image has no version label")
			}
		default:
			t.Errorf("unexpected image %s", tb.Ref)
		}
	}
}
