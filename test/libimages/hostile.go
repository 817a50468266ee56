package libimages

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/apm-csi/apm-csi/shared/libref"
)

// Hostile images: each is a valid dd-lib-<lang>-init library image (so only the trick can
// make the cache refuse it) with crafted entries. Functions that take outside aim the trick
// at that host path, so a test can check that nothing reached it.

// pkgDir is libref.LibrarySource without its leading slash, as tar names are written.
var pkgDir = strings.TrimPrefix(libref.LibrarySource, "/")

// withLayers returns a java library image with extra layers stacked on top.
func withLayers(extra ...v1.Layer) (v1.Image, error) {
	base, err := baseLayer()
	if err != nil {
		return nil, err
	}
	entries := append([]Entry{Dir("datadog-init", 0o755), Dir(pkgDir, 0o755)}, filesEntries(pkgDir, LibraryFiles("java", "hostile"))...)
	payload, err := Layer(entries...)
	if err != nil {
		return nil, err
	}
	return Image(append([]v1.Layer{base, payload}, extra...)...)
}

func withEntries(entries ...Entry) (v1.Image, error) {
	l, err := Layer(entries...)
	if err != nil {
		return nil, err
	}
	return withLayers(l)
}

// DotDot writes a file through "../" segments that climb to outside.
func DotDot(outside string) (v1.Image, error) {
	return withEntries(File(pkgDir+"/"+strings.Repeat("../", 16)+strings.TrimPrefix(outside, "/")+"/pwned", "pwned", 0o644))
}

// AbsoluteSymlinkWrite plants a symlink to the absolute host path outside and then writes a
// file through it, in the same layer.
func AbsoluteSymlinkWrite(outside string) (v1.Image, error) {
	return withEntries(Symlink(pkgDir+"/evil", outside), File(pkgDir+"/evil/pwned", "pwned", 0o644))
}

// AbsoluteSymlinkWriteAcrossLayers plants the symlink in one layer and writes through it in
// the layer above, so flattening sees the write first.
func AbsoluteSymlinkWriteAcrossLayers(outside string) (v1.Image, error) {
	lower, err := Layer(Symlink(pkgDir+"/evil", outside))
	if err != nil {
		return nil, err
	}
	upper, err := Layer(File(pkgDir+"/evil/pwned", "pwned", 0o644))
	if err != nil {
		return nil, err
	}
	return withLayers(lower, upper)
}

// HardlinkOutside hardlinks a package file to the host file outsideFile, by a relative path
// that climbs out of the image.
func HardlinkOutside(outsideFile string) (v1.Image, error) {
	return withEntries(Hardlink(pkgDir+"/stolen", strings.Repeat("../", 16)+strings.TrimPrefix(outsideFile, "/")))
}

// HardlinkAbsolute hardlinks a package file to the absolute host path outsideFile.
func HardlinkAbsolute(outsideFile string) (v1.Image, error) {
	return withEntries(Hardlink(pkgDir+"/stolen", outsideFile))
}

// DeviceNode puts a character device (/dev/mem) into the package.
func DeviceNode() (v1.Image, error) {
	return withEntries(Entry{Header: tar.Header{Typeflag: tar.TypeChar, Name: pkgDir + "/mem", Mode: 0o666, Devmajor: 1, Devminor: 1}})
}

// OverlayWhiteoutDevice puts a 0/0 character device, which overlayfs reads as a whiteout.
func OverlayWhiteoutDevice() (v1.Image, error) {
	return withEntries(Entry{Header: tar.Header{Typeflag: tar.TypeChar, Name: pkgDir + "/dd-java-agent.jar", Mode: 0o644}})
}

// FIFO puts a named pipe into the package.
func FIFO() (v1.Image, error) {
	return withEntries(Entry{Header: tar.Header{Typeflag: tar.TypeFifo, Name: pkgDir + "/pipe", Mode: 0o644}})
}

// Setuid adds a setuid-root binary and a setgid directory to the package.
func Setuid() (v1.Image, error) {
	suid := File(pkgDir+"/suid-shell", "\x7fELF", 0o4755)
	sgid := Dir(pkgDir+"/shared", 0o2775)
	return withEntries(suid, sgid, File(pkgDir+"/shared/f", "x", 0o2755))
}

// SetuidFiles are the paths (below the package) that Setuid marks setuid or setgid.
var SetuidFiles = []string{"suid-shell", "shared", "shared/f"}

// DecompressionBomb adds one file of size zero bytes: a few hundred KB compressed.
func DecompressionBomb(size int64) (v1.Image, error) {
	return bombImage(1, size)
}

// ManyFilesBomb adds n files of size bytes each: no single header is large, the total is.
func ManyFilesBomb(n int, size int64) (v1.Image, error) {
	return bombImage(n, size)
}

func bombImage(n int, size int64) (v1.Image, error) {
	var buf bytes.Buffer
	gz, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	tw := tar.NewWriter(gz)
	for i := range n {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%s/bomb-%06d", pkgDir, i), Mode: 0o644, Size: size}); err != nil {
			return nil, err
		}
		if _, err := io.CopyN(tw, zeros{}, size); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, err
	}
	compressed := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(compressed)), nil
	})
	if err != nil {
		return nil, err
	}
	return withLayers(l)
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// WhiteoutSource deletes the package directory in an upper layer.
func WhiteoutSource() (v1.Image, error) {
	return withEntries(File("datadog-init/.wh.package", "", 0o644))
}

// OpaqueRoot makes the image root opaque in an upper layer, hiding every lower file.
func OpaqueRoot() (v1.Image, error) {
	return withEntries(File(".wh..wh..opq", "", 0o644), File("innocent", "x", 0o644))
}

// WhiteoutTraversal names a whiteout that climbs out of the image, hoping a naive flattener
// deletes a host path.
func WhiteoutTraversal(outside string) (v1.Image, error) {
	return withEntries(File(strings.Repeat("../", 16)+strings.TrimPrefix(outside, "/")+"/.wh.sentinel", "", 0o644))
}

// SymlinkedSource replaces the package directory with an absolute symlink to outside, so a
// volume served from the package would expose a host directory if the link were followed.
func SymlinkedSource(outside string) (v1.Image, error) {
	base, err := baseLayer()
	if err != nil {
		return nil, err
	}
	l, err := Layer(Dir("datadog-init", 0o755), Symlink(pkgDir, outside))
	if err != nil {
		return nil, err
	}
	return Image(base, l)
}
