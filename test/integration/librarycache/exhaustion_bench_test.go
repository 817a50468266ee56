package librarycache_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
)

// Peak resident memory of a plugin process (this test binary re-executed) facing what a pod
// author can name: a zstd window bomb, many concurrent oversized manifests, and a set of
// large libraries published at once. Each reports peak-rss-MiB (VmHWM, the largest over the
// iterations) and how many publishes failed (refusals are the expected outcome for the
// hostile cases).
//
//	go test -run '^$' -bench 'PeakRSS' -benchtime 3x ./test/integration/librarycache/

// childManyEnv carries a list of images for runChildMany.
const childManyEnv = "APM_CSI_LIBRARYCACHE_CHILD_MANY"

type childManyRequest struct {
	// Registry is the test registry's host:port, which every image names.
	Registry string
	Store    string
	Images   []string
}

// runChildMany publishes every image at once and reports each outcome and the peak RSS,
// whether the publishes succeeded or not.
func runChildMany(raw string) int {
	var req childManyRequest
	if err := json.Unmarshal([]byte(raw), &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	c, err := startChildCache(req.Store, req.Registry)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, image := range req.Images {
		wg.Go(func() {
			_, err := c.Layer(ctx, volumeattrs.Library{Image: image})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				fmt.Printf("FAILED: %s: %.300s\n", image, err)
			} else {
				fmt.Printf("OK: %s\n", image)
			}
		})
	}
	wg.Wait()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			fmt.Println(line)
		}
	}
	return 0
}

// peakRSSMany runs the child over images b.N times and reports its peak RSS and failures.
func peakRSSMany(b *testing.B, images []string) {
	base := b.TempDir()
	var peakKiB int64
	failed := 0
	b.ResetTimer()
	for range b.N {
		store := filepath.Join(base, "store")
		registry, _, _ := strings.Cut(images[0], "/")
		raw, err := json.Marshal(childManyRequest{Registry: registry, Store: store, Images: images})
		if err != nil {
			b.Fatal(err)
		}
		cmd, out := startChildEnv(b, childManyEnv+"="+string(raw))
		if err := cmd.Wait(); err != nil {
			b.Fatalf("plugin process: %v: %s", err, out)
		}
		var kib int64
		failed = 0
		for _, line := range strings.Split(out.String(), "\n") {
			if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
				kib, _ = strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			}
			if strings.HasPrefix(line, "FAILED:") {
				failed++
			}
		}
		if kib == 0 {
			b.Fatalf("the plugin process did not report VmHWM: %s", out)
		}
		if b.N == 1 || peakKiB == 0 {
			b.Logf("plugin process output:\n%s", out)
		}
		peakKiB = max(peakKiB, kib)
		_ = os.RemoveAll(store)
	}
	b.StopTimer()
	b.ReportMetric(float64(peakKiB)/1024, "peak-rss-MiB")
	b.ReportMetric(float64(failed), "failed-publishes")
}

func pushAll(b *testing.B, imgs map[string]v1.Image) []string {
	reg := libimages.NewRegistry()
	if err := reg.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = reg.Stop() })
	var out []string
	for tag, img := range imgs {
		if _, err := reg.Push("datadog/dd-lib-java-init", tag, img); err != nil {
			b.Fatal(err)
		}
		out = append(out, reg.Repo("datadog/dd-lib-java-init")+":"+tag)
	}
	return out
}

// BenchmarkPeakRSSZstdWindowBomb: one zstd layer of a few dozen KB declaring a 512 MiB
// window and decompressing to 600 MiB.
func BenchmarkPeakRSSZstdWindowBomb(b *testing.B) {
	img, err := libimages.ZstdWindowBomb(29, 600<<20)
	if err != nil {
		b.Fatal(err)
	}
	peakRSSMany(b, pushAll(b, map[string]v1.Image{"bomb": img}))
}

// BenchmarkPeakRSSOversizedManifests: 8 concurrent publishes of images whose manifests are
// about 95 MiB each.
func BenchmarkPeakRSSOversizedManifests(b *testing.B) {
	base, err := libimages.OversizedManifest(95 << 20)
	if err != nil {
		b.Fatal(err)
	}
	imgs := map[string]v1.Image{}
	for i := range 8 {
		imgs[fmt.Sprintf("big%d", i)] = mutate.Annotations(base, map[string]string{"variant": strconv.Itoa(i)}).(v1.Image)
	}
	peakRSSMany(b, pushAll(b, imgs))
}

// BenchmarkPeakRSSLibrarySet: three 50 MiB libraries (150 MiB) published at once.
func BenchmarkPeakRSSLibrarySet(b *testing.B) {
	imgs := map[string]v1.Image{}
	for i := range 3 {
		img, err := libimages.Large(50<<20, uint64(100+i))
		if err != nil {
			b.Fatal(err)
		}
		imgs[fmt.Sprintf("set%d", i)] = img
	}
	peakRSSMany(b, pushAll(b, imgs))
}

// BenchmarkPeakRSSEightLibraries: eight 20 MiB libraries from one registry published at
// once, as many as the default download slots let run together (seven from one registry).
func BenchmarkPeakRSSEightLibraries(b *testing.B) {
	imgs := map[string]v1.Image{}
	for i := range 8 {
		img, err := libimages.Large(20<<20, uint64(200+i))
		if err != nil {
			b.Fatal(err)
		}
		imgs[fmt.Sprintf("eight%d", i)] = img
	}
	peakRSSMany(b, pushAll(b, imgs))
}
