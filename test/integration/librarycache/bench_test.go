package librarycache_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
)

// benchLibrarySize is a 100 MB library, the size the cache's benchmarks are quoted for.
const benchLibrarySize = 100 << 20

var largeImage struct {
	once  sync.Once
	reg   *libimages.Registry
	image string
	err   error
}

// largeLibrary builds the 100 MB library once per process and serves it from a registry that
// lives as long as the process.
func largeLibrary(b *testing.B) string {
	b.Helper()
	largeImage.once.Do(func() {
		img, err := libimages.Large(benchLibrarySize, 42)
		if err != nil {
			largeImage.err = err
			return
		}
		largeImage.reg = libimages.NewRegistry()
		if largeImage.err = largeImage.reg.Start(); largeImage.err != nil {
			return
		}
		if _, largeImage.err = largeImage.reg.Push("datadog/dd-lib-java-init", "large", img); largeImage.err != nil {
			return
		}
		largeImage.image = largeImage.reg.Repo("datadog/dd-lib-java-init") + ":large"
	})
	if largeImage.err != nil {
		b.Fatal(largeImage.err)
	}
	return largeImage.image
}

// BenchmarkFirstVolumeVsPlainPull compares the first volume of an uncached 100 MB library
// (resolve, download, hostile-safe extraction, fsync, atomic rename, view at the injector
// target) with a plain go-containerregistry pull and a naive extraction of the same image.
// Both arms run in each iteration, alternating which goes first; the page cache is flushed
// before each arm so neither pays for the other's dirty data.
//
//	go test -run '^$' -bench FirstVolumeVsPlainPull -benchtime 5x ./test/integration/librarycache/
func BenchmarkFirstVolumeVsPlainPull(b *testing.B) {
	image := largeLibrary(b)
	base := b.TempDir()
	var cacheTotal, plainTotal time.Duration
	cacheArm := func(i int) {
		store := filepath.Join(base, "store")
		registry, _, _ := strings.Cut(image, "/")
		c, err := librarycache.New(librarycache.Config{StoreDir: store, Logger: slog.New(slog.DiscardHandler),
			AllowedRepositories: []string{registry}, InsecureRegistries: []string{registry}})
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Start(context.Background()); err != nil {
			b.Fatal(err)
		}
		unix.Sync()
		start := time.Now()
		if _, err := c.Layer(context.Background(), volumeattrs.Library{Image: image, Target: libref.LanguageTarget("java")}); err != nil {
			b.Fatal(err)
		}
		cacheTotal += time.Since(start)
		_ = c.Close()
		_ = os.RemoveAll(store)
	}
	plainArm := func(i int) {
		dir := filepath.Join(base, "plain")
		unix.Sync()
		start := time.Now()
		if err := libimages.PlainPull(image, dir); err != nil {
			b.Fatal(err)
		}
		plainTotal += time.Since(start)
		_ = os.RemoveAll(dir)
	}
	b.ResetTimer()
	for i := range b.N {
		if i%2 == 0 {
			cacheArm(i)
			plainArm(i)
		} else {
			plainArm(i)
			cacheArm(i)
		}
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(cacheTotal.Seconds()/n, "cache-s/op")
	b.ReportMetric(plainTotal.Seconds()/n, "plain-s/op")
	b.ReportMetric(cacheTotal.Seconds()/plainTotal.Seconds(), "ratio")
}

// BenchmarkPeakRSSExtract measures the peak resident memory of a plugin process (this test
// binary re-executed) that publishes an uncached 100 MB library: download and extraction
// stream, so it must stay far below the library's size.
//
//	go test -run '^$' -bench PeakRSSExtract -benchtime 3x ./test/integration/librarycache/
func BenchmarkPeakRSSExtract(b *testing.B) {
	image := largeLibrary(b)
	base := b.TempDir()
	var peakKiB int64
	b.ResetTimer()
	for range b.N {
		store := filepath.Join(base, "store")
		cmd, out := startChild(b, store, image, "")
		if err := cmd.Wait(); err != nil {
			b.Fatalf("plugin process: %v: %s", err, out)
		}
		var kib int64
		for _, line := range strings.Split(out.String(), "\n") {
			if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
				kib, _ = strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			}
		}
		if kib == 0 {
			b.Fatalf("the plugin process did not report VmHWM: %s", out)
		}
		peakKiB = max(peakKiB, kib)
		_ = os.RemoveAll(store)
	}
	b.StopTimer()
	b.ReportMetric(float64(peakKiB)/1024, "peak-rss-MiB")
}
