package nodeplugin

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// BenchmarkEmptyLowerOverlayAtScale: the read-only overlay of one library layer and the
// plugin's empty dir costs the same with 2,000 writable layers' tmpfs mounts in the state dir
// as with none, because the empty dir is a mount of its own (mounter.OwnMount): overlayfs
// clones the mount holding each lower dir and walks that mount's children. Per shape it
// reports the median time of mounting the overlay (µs), and the ratios to the empty node.
//
//	go test -run '^$' -bench EmptyLowerOverlayAtScale -benchtime 1x ./test/integration/nodeplugin/
func BenchmarkEmptyLowerOverlayAtScale(b *testing.B) {
	testenv.RequireRoot(b)
	root := b.TempDir()
	b.Cleanup(func() { nodeplugintest.UnmountUnder(b, root) })
	// A filesystem of its own for the node, as the state disk is.
	if err := unix.Mount("tmpfs", root, "tmpfs", 0, "size=64m"); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := unix.Unmount(root, unix.MNT_DETACH); err != nil {
			b.Error(err)
		}
	})
	state, layer, target := filepath.Join(root, "state"), filepath.Join(root, "store", "layer"), filepath.Join(root, "target")
	empty := filepath.Join(state, "empty")
	for _, d := range []string{empty, layer, target} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			b.Fatal(err)
		}
	}
	// The layer lies in the library store, a mount of its own.
	releaseStore, err := mounter.OwnMount(filepath.Dir(layer))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := releaseStore(); err != nil {
			b.Error(err)
		}
	})
	m := mounter.New()
	measure := func() time.Duration {
		var ds []time.Duration
		for range 300 {
			start := time.Now()
			if err := m.Overlay(target, mounter.Overlay{Lower: []string{layer, empty}}); err != nil {
				b.Fatal(err)
			}
			ds = append(ds, time.Since(start))
			if err := unix.Unmount(target, 0); err != nil {
				b.Fatal(err)
			}
		}
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	b.ResetTimer()
	none := measure()
	for i := range 2000 {
		dir := filepath.Join(state, "overlays", fmt.Sprint(i))
		if err := os.MkdirAll(dir, 0o700); err != nil {
			b.Fatal(err)
		}
		if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
			b.Fatal(err)
		}
	}
	shared := measure()
	release, err := mounter.OwnMount(empty)
	if err != nil {
		b.Fatal(err)
	}
	own := measure()
	if err := release(); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	b.ReportMetric(us(none), "live0-us")
	b.ReportMetric(us(shared), "live2000-shared-us")
	b.ReportMetric(us(own), "live2000-own-us")
	b.ReportMetric(float64(shared)/float64(none), "live2000-shared/live0-x")
	b.ReportMetric(float64(own)/float64(none), "live2000-own/live0-x")
}
