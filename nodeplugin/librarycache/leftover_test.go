package librarycache

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// A directory already at an entry's key must never block that library for good: whatever a
// crash, a removal in progress or an earlier process left there, the next publish either uses
// it, replaces it, or asks kubelet to retry.
func TestEntryAlreadyOnDiskIsSettled(t *testing.T) {
	cases := []struct {
		name string
		// leave turns the cached image entry into the leftover under test.
		leave func(t *testing.T, c *Cache, e *entry)
		// wantInProgress: the publish is refused as retryable instead of served.
		wantInProgress bool
	}{
		{
			name: "complete entry on disk but not indexed is adopted",
			leave: func(t *testing.T, c *Cache, e *entry) {
				c.store.mu.Lock()
				delete(c.store.images, e.key)
				c.store.mu.Unlock()
			},
		},
		{
			name: "incomplete directory without its metadata is replaced by a fresh copy",
			leave: func(t *testing.T, c *Cache, e *entry) {
				c.store.mu.Lock()
				delete(c.store.images, e.key)
				c.store.mu.Unlock()
				if err := os.Remove(filepath.Join(c.Dir(), e.rel(), metaFile)); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "entry being removed by garbage collection asks for a retry",
			leave: func(t *testing.T, c *Cache, e *entry) {
				c.store.mu.Lock()
				e.removing = true
				c.store.mu.Unlock()
			},
			wantInProgress: true,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			reg := libimages.Start(t)
			image, img := pushLibrary(t, reg, "python", "v2.1.0")
			digest := must[v1.Hash](t)(img.Digest())
			ref := image[:strings.LastIndex(image, ":")] + "@" + digest.String()
			c := newCache(t, Config{}, reg)
			lib := volumeattrs.Library{Image: ref, Source: libref.LibrarySource}
			if _, err := c.Layer(t.Context(), lib); err != nil {
				t.Fatalf("first Layer: %v", err)
			}
			e := c.pull.peekDigest(digest.String())
			if e == nil {
				t.Fatalf("image %s is not indexed after its first publish", digest)
			}
			// Only the image entry is under test: drop the views built on it.
			c.store.mu.Lock()
			for k := range c.store.views {
				delete(c.store.views, k)
			}
			c.store.mu.Unlock()
			tc.leave(t, c, e)

			layer, err := c.Layer(t.Context(), lib)
			if tc.wantInProgress {
				if !errors.Is(err, library.ErrDownloadInProgress) {
					t.Fatalf("Layer = %v, want an error that is library.ErrDownloadInProgress", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Layer with a leftover at the image's key: %v", err)
			}
			equalTrees(t, nodeplugintest.ReadTree(t, layer.Dir), libimages.LibraryFiles("python", "v2.1.0"))
			if got := c.pull.peekDigest(digest.String()); got == nil {
				t.Errorf("image %s is not indexed after the leftover was settled", digest)
			}
			if _, err := os.Stat(filepath.Join(c.Dir(), e.rel(), metaFile)); err != nil {
				t.Errorf("the settled entry has no metadata: %v", err)
			}
		})
	}
}
