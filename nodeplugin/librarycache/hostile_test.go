package librarycache

import (
	"errors"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
)

// TestHostileImages pulls crafted images through the whole cache (registry, flattening,
// extraction, source check). Each must be refused with a clear error or neutralised, and
// nothing may be written outside the store.
func TestHostileImages(t *testing.T) {
	const limit = 8 << 20
	tests := []struct {
		name  string
		build func(outside string) (v1.Image, error)
		// wantErr, if set, must appear in an ErrImageRejected message; otherwise the image
		// must be served and check passes on its package directory.
		wantErr string
		check   func(t *testing.T, pkg string)
	}{
		{name: "dotdot path", build: libimages.DotDot, wantErr: "unsafe tar path"},
		{name: "absolute symlink then a write through it", build: libimages.AbsoluteSymlinkWrite, check: func(t *testing.T, pkg string) {
			target, err := os.Readlink(filepath.Join(pkg, "evil"))
			if err != nil || filepath.IsAbs(target) {
				t.Errorf("evil -> %q (%v): want a relative link", target, err)
			}
		}},
		{name: "absolute symlink, write through it in an upper layer", build: libimages.AbsoluteSymlinkWriteAcrossLayers, check: func(t *testing.T, pkg string) {
			fi, err := os.Lstat(filepath.Join(pkg, "evil"))
			if err != nil || !fi.IsDir() {
				t.Errorf("evil = %v, %v: want the upper layer's directory, not the link", fi, err)
			}
		}},
		{name: "hardlink climbing out", build: func(o string) (v1.Image, error) { return libimages.HardlinkOutside(filepath.Join(o, "sentinel")) }, check: func(t *testing.T, pkg string) {
			if _, err := os.Lstat(filepath.Join(pkg, "stolen")); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the escaping hardlink was created: %v", err)
			}
		}},
		{name: "hardlink to an absolute path", build: func(o string) (v1.Image, error) { return libimages.HardlinkAbsolute(filepath.Join(o, "sentinel")) }, wantErr: "outside the image root"},
		{name: "device node", build: func(string) (v1.Image, error) { return libimages.DeviceNode() }, wantErr: "device node"},
		{name: "overlayfs whiteout device", build: func(string) (v1.Image, error) { return libimages.OverlayWhiteoutDevice() }, wantErr: "device node"},
		{name: "fifo", build: func(string) (v1.Image, error) { return libimages.FIFO() }, wantErr: "FIFO"},
		{name: "setuid binary", build: func(string) (v1.Image, error) { return libimages.Setuid() }, check: func(t *testing.T, pkg string) {
			for _, f := range libimages.SetuidFiles {
				fi, err := os.Lstat(filepath.Join(pkg, f))
				if err != nil {
					t.Fatal(err)
				}
				if fi.Mode()&(fs.ModeSetuid|fs.ModeSetgid) != 0 {
					t.Errorf("%s keeps mode %v", f, fi.Mode())
				}
			}
		}},
		{name: "decompression bomb", build: func(string) (v1.Image, error) { return libimages.DecompressionBomb(64 << 20) }, wantErr: "byte limit"},
		{name: "many files adding up", build: func(string) (v1.Image, error) { return libimages.ManyFilesBomb(16, 1<<20) }, wantErr: "byte limit"},
		{name: "too many entries", build: func(string) (v1.Image, error) { return libimages.ManyFilesBomb(1100, 0) }, wantErr: "more than 1000 entries"},
		{name: "whiteout of the source", build: func(string) (v1.Image, error) { return libimages.WhiteoutSource() }, wantErr: "has no directory /datadog-init/package"},
		{name: "opaque root", build: func(string) (v1.Image, error) { return libimages.OpaqueRoot() }, wantErr: "has no directory /datadog-init/package"},
		{name: "whiteout climbing out", build: libimages.WhiteoutTraversal, wantErr: "unsafe tar path"},
		{name: "source is a symlink to the host", build: libimages.SymlinkedSource, wantErr: "is a symlink"},
	}
	reg := libimages.Start(t)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := t.TempDir()
			outside := filepath.Join(base, "outside")
			if err := os.Mkdir(outside, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(outside, "sentinel"), []byte("untouched"), 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := tt.build(outside)
			if err != nil {
				t.Fatal(err)
			}
			repo := "hostile/case" + string(rune('a'+i))
			if _, err := reg.Push(repo, "v1", img); err != nil {
				t.Fatal(err)
			}
			c := newCache(t, Config{StoreDir: filepath.Join(base, "store"), MaxLibraryBytes: limit, MaxLibraryFiles: 1000}, reg)
			image := reg.Repo(repo) + ":v1"
			layer, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
			if tt.wantErr != "" {
				if !errors.Is(err, library.ErrImageRejected) {
					t.Fatalf("Layer = %v, want ErrImageRejected", err)
				}
				checkMessage(t, err, image, tt.wantErr)
				// A rejected image is remembered: a retry does not download it again. The
				// aborted first download may still have a blob request on the wire (the
				// flattening goroutine of mutate.Extract fetches the next layer while the
				// extractor rejects), so let the registry go quiet before counting.
				if err := reg.WaitQuiet(250*time.Millisecond, 5*time.Second); err != nil {
					t.Fatal(err)
				}
				reg.ResetCounts()
				if _, err2 := c.Layer(t.Context(), volumeattrs.Library{Image: image}); !errors.Is(err2, library.ErrImageRejected) {
					t.Errorf("retry = %v, want the same rejection", err2)
				}
				if n := reg.Count(func(q libimages.Request) bool { return q.Kind == "blob" && q.Method == http.MethodGet }); n != 0 && !strings.Contains(tt.wantErr, "has no directory") {
					t.Errorf("retry of a rejected image fetched %d blobs", n)
				}
			} else {
				if err != nil {
					t.Fatalf("Layer = %v, want the image served with the trick neutralised", err)
				}
				tt.check(t, layer.Dir)
			}
			checkNothingOutside(t, base, outside)
			if n := dirEntries(t, filepath.Join(c.Dir(), tmpDir)); n != 0 {
				t.Errorf("%d work dirs left in tmp/", n)
			}
		})
	}
}

// checkNothingOutside fails if anything but the sentinel is in outside, if the sentinel
// changed, or if anything but the store and outside appeared in base.
func checkNothingOutside(t *testing.T, base, outside string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(outside, "sentinel"))
	if err != nil || string(b) != "untouched" {
		t.Errorf("sentinel changed: %q, %v", b, err)
	}
	if n := dirEntries(t, outside); n != 1 {
		t.Errorf("outside holds %d entries, want only the sentinel", n)
	}
	if n := dirEntries(t, base); n != 2 {
		t.Errorf("%s holds %d entries, want store and outside", base, n)
	}
	var pwned []string
	_ = filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Name() == "pwned" && !strings.Contains(p, "/store/") {
			pwned = append(pwned, p)
		}
		return nil
	})
	if len(pwned) > 0 {
		t.Errorf("files written outside the store: %v", pwned)
	}
}

func dirEntries(t *testing.T, dir string) int {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return len(des)
}

// TestLayerSizeLimit covers data mutate.Extract decompresses without emitting (entries
// shadowed by upper layers, bytes after the end of the archive): the per-layer limit stops it.
func TestLayerSizeLimit(t *testing.T) {
	tests := []struct {
		name    string
		data    int
		limit   int64
		wantErr bool
	}{
		{"under", 10, 20, false},
		{"exactly at", 20, 20, false},
		{"over", 21, 20, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &limitedReader{ReadCloser: io.NopCloser(strings.NewReader(strings.Repeat("x", tt.data))), left: tt.limit, max: tt.limit}
			_, err := io.Copy(io.Discard, r)
			if tt.wantErr != errors.Is(err, extract.ErrRejected) {
				t.Errorf("err = %v, want rejected: %v", err, tt.wantErr)
			}
		})
	}
}
