package librarycache

import (
	"log/slog"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// BenchmarkCachedDigestLayer is the hot path of every publish after the first: a cached digest
// reference (allowlist check and cache identity check included), no registry request.
func BenchmarkCachedDigestLayer(b *testing.B) {
	reg := libimages.Start(b)
	lib := nodeplugintest.PushLibrary(b, reg, "python", "v1")
	image := reg.Repo(lib.Repo) + "@" + must[v1.Hash](b)(lib.Image.Digest()).String()
	c, err := New(trust(Config{StoreDir: filepath.Join(b.TempDir(), "store"), Logger: slog.New(slog.DiscardHandler), Registerer: prometheus.NewRegistry()}, reg))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Layer(b.Context(), volumeattrs.Library{Image: image}); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Layer(b.Context(), volumeattrs.Library{Image: image}); err != nil {
			b.Fatal(err)
		}
	}
}
