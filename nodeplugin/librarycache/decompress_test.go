package librarycache

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
)

// TestZstdFrameWindow reads the window a frame header declares, in both header forms.
func TestZstdFrameWindow(t *testing.T) {
	tests := []struct {
		name   string
		header []byte
		want   uint64
	}{
		{"window descriptor 512 MiB", []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 19 << 3}, 512 << 20},
		{"window descriptor 8 MiB", []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 13 << 3}, 8 << 20},
		{"window descriptor with mantissa", []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 13<<3 | 1}, 9 << 20},
		// Single segment, 8-byte content size of 1 GiB: the window is the content size.
		{"single segment", []byte{0x28, 0xb5, 0x2f, 0xfd, 0xe0, 0, 0, 0, 0x40, 0, 0, 0, 0}, 1 << 30},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := zstdFrameWindow(tt.header)
			if !ok || got != tt.want {
				t.Errorf("zstdFrameWindow = %d, %v; want %d", got, ok, tt.want)
			}
		})
	}
}

func readLayer(t *testing.T, compressed []byte) ([]byte, error) {
	t.Helper()
	rc, err := decompressLayer(io.NopCloser(bytes.NewReader(compressed)))
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

// TestDecompressLayer: gzip, zstd and plain streams are told by their magic bytes; a
// single-segment zstd frame declaring a huge content size is refused like a huge window.
func TestDecompressLayer(t *testing.T) {
	payload := []byte(strings.Repeat("library bytes ", 10000))
	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	if _, err := w.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	enc, err := zstd.NewWriter(nil, zstd.WithWindowSize(1<<20))
	if err != nil {
		t.Fatal(err)
	}
	zs := enc.EncodeAll(payload, nil)
	for name, in := range map[string][]byte{"gzip": gz.Bytes(), "zstd": zs, "plain": payload} {
		got, err := readLayer(t, in)
		if err != nil || !bytes.Equal(got, payload) {
			t.Errorf("%s: %d bytes, %v; want the payload", name, len(got), err)
		}
	}
	huge := []byte{0x28, 0xb5, 0x2f, 0xfd, 0xe0, 0, 0, 0, 0x40, 0, 0, 0, 0, 1, 0, 0}
	if _, err := readLayer(t, huge); !errors.Is(err, extract.ErrRejected) || !strings.Contains(err.Error(), "1073741824") {
		t.Errorf("single-segment frame of 1 GiB: %v, want a rejection naming its size", err)
	}
	zsTrailing := append(append([]byte(nil), zs...), bytes.Repeat([]byte{0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0}, 1)...)
	if got, err := readLayer(t, zsTrailing); err != nil || !bytes.Equal(got, payload) {
		t.Errorf("zstd with an empty skippable frame after it: %d bytes, %v; want the payload", len(got), err)
	}
	trailing := append(append([]byte(nil), gz.Bytes()...), make([]byte, 2<<20)...)
	if _, err := readLayer(t, trailing); err == nil {
		t.Error("2 MiB of garbage after the gzip stream was accepted")
	}
}
