package librarycache

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
)

// waitFor waits (real time, bounded) for background work to reach a state the test then
// acts on with the fake clock.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	err := wait.PollUntilContextTimeout(t.Context(), 5*time.Millisecond, 20*time.Second, true, func(context.Context) (bool, error) {
		return cond(), nil
	})
	if err != nil {
		t.Fatalf("timed out waiting for %s", what)
	}
}

func payloadLayer(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	ls := must[[]v1.Layer](t)(img.Layers())
	return must[v1.Hash](t)(ls[len(ls)-1].Digest())
}

type layerResult struct {
	err error
}

func publishAsync(c *Cache, image string) <-chan layerResult {
	ch := make(chan layerResult, 1)
	go func() {
		_, err := c.Layer(context.Background(), volumeattrs.Library{Image: image})
		ch <- layerResult{err}
	}()
	return ch
}

// TestStalledRegistryDoesNotStarveOthers: two publishes from a registry that stalls its
// blobs take at most the per-registry share of the download slots, so a library from a
// healthy registry still downloads meanwhile; the stalled download is aborted by the
// minimum download rate once a window passes without data, freeing its slot.
func TestStalledRegistryDoesNotStarveOthers(t *testing.T) {
	stalled, healthy := libimages.Start(t), libimages.Start(t)
	javaRef, javaImg := pushLibrary(t, stalled, "java", "v1")
	pythonRef, _ := pushLibrary(t, stalled, "python", "v1")
	rubyRef, _ := pushLibrary(t, healthy, "ruby", "v1")
	release := stalled.HoldBlobs(0)
	defer release()
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCache(t, Config{MaxParallelDownloads: 2, Clock: clk, DownloadSlotWait: time.Hour, MinDownloadRateWindow: 30 * time.Second}, stalled, healthy)

	java := publishAsync(c, javaRef)
	waitFor(t, "the stalled download to start", func() bool { return stalled.BlobFetches(payloadLayer(t, javaImg)) > 0 })
	python := publishAsync(c, pythonRef)

	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if _, err := c.Layer(ctx, volumeattrs.Library{Image: rubyRef}); err != nil {
		t.Fatalf("library from the healthy registry: %v, want it served while the other registry stalls", err)
	}

	// The stalled download receives nothing for a whole window: aborted, not held until
	// --download-timeout.
	waitFor(t, "the throughput watchdog", clk.HasWaiters)
	clk.Step(30 * time.Second)
	var res layerResult
	select {
	case res = <-java:
	case <-time.After(20 * time.Second):
		t.Fatal("the stalled download was not aborted after a window without data")
	}
	if !errors.Is(res.err, library.ErrRegistryUnavailable) || !strings.Contains(res.err.Error(), "below the minimum") {
		t.Fatalf("stalled publish = %v, want ErrRegistryUnavailable naming the minimum download rate", res.err)
	}
	t.Logf("aborted: %v", res.err)
	// The freed slot goes to the waiting publish from the same registry.
	waitFor(t, "the second download from the stalled registry", func() bool {
		return stalled.Count(func(q libimages.Request) bool { return q.Kind == "blob" && strings.Contains(q.Repo, "python") }) > 0
	})
	release()
	if r := <-python; r.err != nil {
		t.Errorf("second publish after the registry recovered: %v", r.err)
	}
}

// TestDownloadSlotWaitBounded: a publish that cannot get a download slot fails after the
// configured wait with a retryable error that says which registries hold the slots.
func TestDownloadSlotWaitBounded(t *testing.T) {
	reg := libimages.Start(t)
	javaRef, javaImg := pushLibrary(t, reg, "java", "v1")
	rubyRef, _ := pushLibrary(t, reg, "ruby", "v1")
	release := reg.HoldBlobs(0)
	defer release()
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCache(t, Config{MaxParallelDownloads: 1, Clock: clk, DownloadSlotWait: 20 * time.Second, MinDownloadRate: -1}, reg)

	java := publishAsync(c, javaRef)
	waitFor(t, "the first download to start", func() bool { return reg.BlobFetches(payloadLayer(t, javaImg)) > 0 })
	ruby := publishAsync(c, rubyRef)
	waitFor(t, "the second publish to wait for a slot", clk.HasWaiters)
	clk.Step(20 * time.Second)
	var res layerResult
	select {
	case res = <-ruby:
	case <-time.After(20 * time.Second):
		t.Fatal("the wait for a download slot has no bound")
	}
	if !errors.Is(res.err, library.ErrDownloadSlotsBusy) {
		t.Fatalf("publish waiting for a slot = %v, want ErrDownloadSlotsBusy", res.err)
	}
	want := "all 1 download slots are busy with downloads from " + reg.Addr() + " (1)"
	if !strings.Contains(res.err.Error(), want) {
		t.Errorf("message %q should say %q", res.err, want)
	}
	t.Logf("refused: %v", res.err)
	release()
	if r := <-java; r.err != nil {
		t.Errorf("first publish: %v", r.err)
	}
}

// TestThroughputWatchdog: a window with a request in flight and too few bytes aborts the
// download; a window with nothing in flight (the extractor finishing) does not.
func TestThroughputWatchdog(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	ctx, cancel := context.WithCancelCause(t.Context())
	defer cancel(nil)
	p := new(progress)
	done := make(chan struct{})
	go func() {
		watchThroughput(ctx, clk, p, 1000, 10*time.Second, "registry.test", cancel)
		close(done)
	}()
	// Each window ends when the watchdog has armed its timer and the clock passes it; the
	// watchdog has judged the window once it arms the next one (or stops).
	step := func() {
		clk.Step(10 * time.Second)
		waitFor(t, "the watchdog to judge the window", func() bool {
			select {
			case <-done:
				return true
			default:
				return clk.HasWaiters()
			}
		})
	}
	waitFor(t, "the watchdog's timer", clk.HasWaiters)
	// Idle: nothing in flight.
	step()
	// Fast enough.
	p.open.Add(1)
	p.bytes.Add(20_000)
	step()
	if ctx.Err() != nil {
		t.Fatalf("download aborted while idle or fast enough: %v", context.Cause(ctx))
	}
	// In flight, 5 KB in 10 s with a floor of 1000 B/s: aborted.
	p.bytes.Add(5_000)
	step()
	<-done
	var st *errStalled
	if !errors.As(context.Cause(ctx), &st) || st.received != 5_000 {
		t.Fatalf("cause = %v, want a stall after 5000 bytes", context.Cause(ctx))
	}
}

// TestStoreFlushWaitsForRunningDownloads: the store flush (durability.go) waits while a
// download holds a slot, goes ahead as soon as the last one ends, and waits no longer than
// its bound on a node that is never idle.
func TestStoreFlushWaitsForRunningDownloads(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	s := newDownloadSlots(2, 1, clk)
	flush := func() <-chan struct{} {
		done := make(chan struct{})
		go func() {
			s.waitIdle(t.Context(), clk, maxFlushDelay)
			close(done)
		}()
		return done
	}
	select {
	case <-flush():
	case <-time.After(20 * time.Second):
		t.Fatal("flush waited on an idle node")
	}

	release, err := s.acquire(t.Context(), "registry.test", "java", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	done := flush()
	waitFor(t, "the flush to wait", clk.HasWaiters)
	select {
	case <-done:
		t.Fatal("flush did not wait for the running download")
	default:
	}
	release()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("flush still waiting after the last download ended")
	}

	release, err = s.acquire(t.Context(), "registry.test", "java", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	done = flush()
	waitFor(t, "the flush to wait", clk.HasWaiters)
	clk.Step(maxFlushDelay)
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("flush waited more than %s for a busy node", maxFlushDelay)
	}
}
