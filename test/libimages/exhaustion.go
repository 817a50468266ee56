package libimages

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Images that aim at the node's resources rather than its files: memory (a zstd layer that
// declares a huge window, an oversized manifest) and disk (a layer of empty directories).
// Each is a valid java library image apart from the trick.

// ZstdWindowBomb returns a library image with a zstd layer whose frame declares a window of
// 1<<windowLog bytes and that decompresses to a tar stream of `size` zero bytes hidden in a
// whiteout entry (flattening reads and drops it, so nothing reaches the disk). A decoder that
// honours the declared window fills a history buffer of that size: 2^29 (512 MiB) with a
// layer of a few dozen KB. The stream is written by hand (raw and RLE blocks), so building
// it costs the test process no memory.
func ZstdWindowBomb(windowLog int, size int64) (v1.Image, error) {
	if windowLog < 10 || windowLog > 41 {
		return nil, fmt.Errorf("window log %d out of range", windowLog)
	}
	size = (size + 511) &^ 511
	var hdr bytes.Buffer
	tw := tar.NewWriter(&hdr)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: pkgDir + "/.wh.window-bomb", Mode: 0o644, Size: size, ModTime: epoch}); err != nil {
		return nil, err
	}
	tw.Flush()
	header := hdr.Bytes()
	// What follows the header is zeros: the file body, then the end-of-archive marker.
	zeros := size + 1024

	var z bytes.Buffer
	z.Write([]byte{0x28, 0xb5, 0x2f, 0xfd}) // magic
	z.WriteByte(0x00)                       // no content size, not single segment, no checksum
	z.WriteByte(byte(windowLog-10) << 3)    // window descriptor: 2^windowLog
	block := func(last bool, typ, n uint32) {
		v := n<<3 | typ<<1
		if last {
			v |= 1
		}
		z.Write([]byte{byte(v), byte(v >> 8), byte(v >> 16)})
	}
	block(false, 0, uint32(len(header))) // raw block
	z.Write(header)
	const maxBlock = 128 << 10
	for left := zeros; left > 0; {
		n := min(left, maxBlock)
		left -= n
		block(left == 0, 1, uint32(n)) // RLE block of n zero bytes
		z.WriteByte(0)
	}
	h := sha256.New()
	h.Write(header)
	if _, err := io.CopyN(h, zeros0{}, zeros); err != nil {
		return nil, err
	}
	l := &handLayer{
		compressed: z.Bytes(),
		diffID:     v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", h.Sum(nil))},
		mediaType:  types.OCILayerZStd,
		uncompressed: func() io.Reader {
			return io.MultiReader(bytes.NewReader(header), io.LimitReader(zeros0{}, zeros))
		},
	}
	return withLayers(l)
}

// DirectoryBomb returns a library image with n empty directories in its package: a small
// gzip layer (about 150 KB for 20,000) whose entries hold no file bytes at all.
func DirectoryBomb(n int) (v1.Image, error) {
	entries := make([]Entry, 0, n)
	for i := range n {
		entries = append(entries, Dir(fmt.Sprintf("%s/d%03d/%06d", pkgDir, i/1000, i), 0o755))
	}
	return withEntries(entries...)
}

// OversizedManifest returns a library image whose manifest is padded with an annotation to
// about size bytes.
func OversizedManifest(size int) (v1.Image, error) {
	img, err := Library("java", "padded")
	if err != nil {
		return nil, err
	}
	return mutate.Annotations(img, map[string]string{"pad": strings.Repeat("x", size)}).(v1.Image), nil
}

type zeros0 struct{}

func (zeros0) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// handLayer is a layer whose compressed bytes and diff id are given, so its compression
// is never run in the test process.
type handLayer struct {
	compressed   []byte
	diffID       v1.Hash
	mediaType    types.MediaType
	uncompressed func() io.Reader
}

func (l *handLayer) Digest() (v1.Hash, error) {
	s := sha256.Sum256(l.compressed)
	return v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", s[:])}, nil
}
func (l *handLayer) DiffID() (v1.Hash, error) { return l.diffID, nil }
func (l *handLayer) Compressed() (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(l.compressed)), nil
}
func (l *handLayer) Uncompressed() (io.ReadCloser, error) {
	return io.NopCloser(l.uncompressed()), nil
}
func (l *handLayer) Size() (int64, error)                { return int64(len(l.compressed)), nil }
func (l *handLayer) MediaType() (types.MediaType, error) { return l.mediaType, nil }
