package librarycache

import (
	"context"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// A four-layer image: its blobs are all requested while the first is still downloading, and
// the layers are still applied in order (a later layer's whiteout and override win).
func TestImageLayersDownloadConcurrentlyAndApplyInOrder(t *testing.T) {
	reg := libimages.Start(t)
	pkg := "datadog-init/package/"
	layers := []v1.Layer{
		must[v1.Layer](t)(libimages.Layer(libimages.Dir("datadog-init/", 0o755), libimages.Dir(pkg, 0o755),
			libimages.File(pkg+"base.txt", "base", 0o644), libimages.File(pkg+"gone.txt", "removed later", 0o644),
			libimages.File(pkg+"over.txt", "old", 0o644))),
		must[v1.Layer](t)(libimages.Layer(libimages.File(pkg+"second.txt", "second", 0o644))),
		must[v1.Layer](t)(libimages.Layer(libimages.File(pkg+".wh.gone.txt", "", 0o644), libimages.File(pkg+"over.txt", "new", 0o644))),
		must[v1.Layer](t)(libimages.Layer(libimages.File(pkg+"top.txt", "top", 0o644))),
	}
	img := must[v1.Image](t)(libimages.Image(layers...))
	if _, err := reg.Push("datadog/dd-lib-java-init", "layered", img); err != nil {
		t.Fatal(err)
	}
	c := newCache(t, Config{}, reg)

	release := reg.HoldBlobs(0)
	defer release()
	type result struct {
		dir string
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := c.Layer(t.Context(), volumeattrs.Library{Image: reg.Repo("datadog/dd-lib-java-init") + ":layered"})
		done <- result{l.Dir, err}
	}()
	requested := func() int {
		n := 0
		for _, l := range layers {
			if reg.BlobFetches(must[v1.Hash](t)(l.Digest())) > 0 {
				n++
			}
		}
		return n
	}
	if err := wait.PollUntilContextTimeout(t.Context(), 10*time.Millisecond, 10*time.Second, true, func(context.Context) (bool, error) {
		return requested() == len(layers), nil
	}); err != nil {
		t.Fatalf("%d of %d layer blobs were requested while the first was held, want all", requested(), len(layers))
	}
	release()
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	equalTrees(t, nodeplugintest.ReadTree(t, r.dir), map[string]string{
		"base.txt":   "base",
		"second.txt": "second",
		"over.txt":   "new",
		"top.txt":    "top",
	})
}
