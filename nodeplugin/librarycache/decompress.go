package librarycache

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
)

// maxZstdWindow bounds the history a zstd layer may make the decoder keep. The zstd format
// recommends that every decoder support windows up to 8 MiB, and the compressor's levels
// 1-19 (what registries and image builders use; containerd and buildkit default to level 3,
// a 2 MiB window) stay within it; only --long or --ultra levels declare more. go-
// containerregistry's decoder accepts the decoder default of 512 MiB, so a layer of a few
// dozen KB could make the plugin allocate and fill 512 MiB.
const maxZstdWindow = 8 << 20

// maxTrailingCompressed is how much may follow the end of a compressed stream (padding);
// it is read so that the layer's digest is verified over every byte.
const maxTrailingCompressed = 1 << 20

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// boundedUncompressed is layer.Uncompressed() with bounded decoders.
func boundedUncompressed(layer v1.Layer) (io.ReadCloser, error) {
	rc, err := layer.Compressed()
	if err != nil {
		return nil, err
	}
	return decompressLayer(rc)
}

// decompressLayer returns the tar stream of a layer from its compressed (digest-verified)
// stream, decoding it with bounded decoders: gzip keeps a 32 KiB window; zstd is limited to
// maxZstdWindow and decodes synchronously with lazily grown buffers. The compression is told
// by the stream's magic bytes, as registries do not always label media types correctly; a
// stream with neither magic is read as an uncompressed tar.
func decompressLayer(compressed io.ReadCloser) (io.ReadCloser, error) {
	br := bufio.NewReaderSize(compressed, 64<<10)
	magic, err := br.Peek(18)
	if err != nil && !errors.Is(err, io.EOF) {
		compressed.Close()
		return nil, err
	}
	switch {
	case bytes.HasPrefix(magic, gzipMagic):
		zr, err := gzip.NewReader(br)
		if err != nil {
			compressed.Close()
			return nil, &extract.ReadError{Err: fmt.Errorf("gzip layer: %w", err)}
		}
		return &decodedLayer{r: zr, src: br, closeFns: []func(){func() { zr.Close() }}, under: compressed}, nil
	case bytes.HasPrefix(magic, zstdMagic):
		// Refused before a decoder exists, so the message can say what the layer asked for.
		if w, ok := zstdFrameWindow(magic); ok && w > maxZstdWindow {
			compressed.Close()
			return nil, windowRejection(fmt.Sprintf("%d bytes", w))
		}
		zr, err := zstd.NewReader(br,
			zstd.WithDecoderMaxWindow(maxZstdWindow),
			zstd.WithDecoderLowmem(true),
			zstd.WithDecoderConcurrency(1))
		if err != nil {
			compressed.Close()
			return nil, err
		}
		return &decodedLayer{r: zr, src: br, closeFns: []func(){zr.Close}, under: compressed, zstd: true}, nil
	default:
		return &decodedLayer{r: br, under: compressed}, nil
	}
}

// decodedLayer is a layer's decompressed stream. At its end it reads what follows the
// compressed data (bounded), so the digest check of the compressed stream, which happens at
// its EOF, always runs.
type decodedLayer struct {
	r        io.Reader
	src      io.Reader
	under    io.ReadCloser
	closeFns []func()
	zstd     bool
	done     bool
}

func (l *decodedLayer) Read(p []byte) (int, error) {
	if l.done {
		return 0, io.EOF
	}
	n, err := l.r.Read(p)
	if err == nil {
		return n, nil
	}
	if !errors.Is(err, io.EOF) {
		return n, l.explain(err)
	}
	if l.src != nil {
		m, derr := io.Copy(io.Discard, io.LimitReader(l.src, maxTrailingCompressed+1))
		if derr != nil {
			return n, derr
		}
		if m > maxTrailingCompressed {
			return n, &extract.RejectedError{Reason: fmt.Sprintf("has a layer with more than %d bytes after its compressed data", maxTrailingCompressed)}
		}
	}
	l.done = true
	return n, io.EOF
}

// explain turns decoder limit errors into rejections an administrator can act on.
func (l *decodedLayer) explain(err error) error {
	if l.zstd && (errors.Is(err, zstd.ErrWindowSizeExceeded) || errors.Is(err, zstd.ErrDecoderSizeExceeded)) {
		return windowRejection("more than the limit")
	}
	return err
}

func windowRejection(window string) error {
	return &extract.RejectedError{Reason: fmt.Sprintf("has a zstd layer that needs a decompression window of %s; the node plugin decodes windows up to %d bytes (zstd levels 1-19 without --long); recompress the image's layers with ordinary settings", window, maxZstdWindow)}
}

func (l *decodedLayer) Close() error {
	for _, f := range l.closeFns {
		f()
	}
	return l.under.Close()
}

// zstdFrameWindow returns the window the zstd frame header at the start of h declares (for a
// single-segment frame, its content size), or false if h is too short to tell.
func zstdFrameWindow(h []byte) (uint64, bool) {
	if len(h) < 6 || !bytes.HasPrefix(h, zstdMagic) {
		return 0, false
	}
	fhd := h[4]
	if fhd&(1<<5) == 0 {
		wd := h[5]
		exp, mantissa := uint64(wd>>3), uint64(wd&7)
		base := uint64(1) << (10 + exp)
		return base + base/8*mantissa, true
	}
	dictSize := [4]int{0, 1, 2, 4}[fhd&3]
	fcsSize := [4]int{1, 2, 4, 8}[fhd>>6]
	off := 5 + dictSize
	if len(h) < off+fcsSize {
		return 0, false
	}
	var fcs uint64
	for i := fcsSize - 1; i >= 0; i-- {
		fcs = fcs<<8 | uint64(h[off+i])
	}
	if fcsSize == 2 {
		fcs += 256
	}
	return fcs, true
}
