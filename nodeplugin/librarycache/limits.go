package librarycache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	"k8s.io/utils/clock"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
	"github.com/apm-csi/apm-csi/shared/libref"
)

// maxManifestBytes caps a manifest or index the plugin reads, and the config blob an image
// manifest may name. Library image manifests are a few KB; go-containerregistry reads whole
// manifests into memory up to 100 MiB, which a few concurrent pulls turn into gigabytes.
const maxManifestBytes = 4 << 20

// errManifestTooLarge is what reading an oversized manifest fails with: the content is
// unusable from any registry.
type errManifestTooLarge struct {
	url    string
	length int64
}

func (e *errManifestTooLarge) Error() string {
	size := "more than"
	if e.length > 0 {
		size = fmt.Sprintf("%d bytes,", e.length)
	}
	return fmt.Sprintf("its manifest is %s over the %d byte limit for manifests and indexes (library image manifests are a few KB)", size, maxManifestBytes)
}

func (e *errManifestTooLarge) Is(target error) bool { return target == extract.ErrRejected }

// limitsTransport caps manifest responses and feeds each download's progress meter (found
// in the request's context) with the body bytes it receives.
type limitsTransport struct {
	base http.RoundTripper
}

func (t *limitsTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	p := progressFrom(req.Context())
	if p != nil {
		// In flight from now until the body is closed or read to its end: a registry that
		// stalls before its headers is as stalled as one that stalls a body.
		p.open.Add(1)
	}
	resp, err := t.base.RoundTrip(req)
	if err != nil || resp.Body == nil {
		if p != nil {
			p.open.Add(-1)
		}
		return resp, err
	}
	if p != nil {
		resp.Body = &progressBody{ReadCloser: resp.Body, p: p}
	}
	if req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/manifests/") && resp.StatusCode == http.StatusOK {
		if resp.ContentLength > maxManifestBytes {
			resp.Body.Close()
			return nil, &errManifestTooLarge{url: req.URL.Redacted(), length: resp.ContentLength}
		}
		resp.Body = &cappedBody{ReadCloser: resp.Body, left: maxManifestBytes, url: req.URL.Redacted()}
	}
	return resp, nil
}

// progress is what one download received: bytes, and requests in flight.
type progress struct {
	bytes atomic.Int64
	open  atomic.Int32
}

type progressBody struct {
	io.ReadCloser
	p    *progress
	once sync.Once
}

func (b *progressBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.p.bytes.Add(int64(n))
	if err != nil {
		b.done()
	}
	return n, err
}

func (b *progressBody) Close() error {
	b.done()
	return b.ReadCloser.Close()
}

func (b *progressBody) done() { b.once.Do(func() { b.p.open.Add(-1) }) }

type cappedBody struct {
	io.ReadCloser
	left int64
	url  string
}

func (b *cappedBody) Read(p []byte) (int, error) {
	if b.left < 0 {
		return 0, &errManifestTooLarge{url: b.url}
	}
	if int64(len(p)) > b.left+1 {
		p = p[:b.left+1]
	}
	n, err := b.ReadCloser.Read(p)
	b.left -= int64(n)
	if b.left < 0 {
		return 0, &errManifestTooLarge{url: b.url}
	}
	return n, err
}

// checkConfigSize refuses an image whose manifest names an oversized config blob, before
// anything reads it.
func checkConfigSize(img v1.Image) error {
	m, err := img.Manifest()
	if err != nil {
		return err
	}
	if m.Config.Size > maxManifestBytes {
		return &extract.RejectedError{Reason: fmt.Sprintf("has a config blob of %d bytes, over the %d byte limit", m.Config.Size, maxManifestBytes)}
	}
	return nil
}

type progressKey struct{}

// withProgress makes every registry request made under ctx count into p.
func withProgress(ctx context.Context, p *progress) context.Context {
	return context.WithValue(ctx, progressKey{}, p)
}

func progressFrom(ctx context.Context) *progress {
	p, _ := ctx.Value(progressKey{}).(*progress)
	return p
}

// errStalled is the cause a download is cancelled with when the registry sends too little.
type errStalled struct {
	host     string
	received int64
	window   time.Duration
	floor    int64
}

func (e *errStalled) Error() string {
	return fmt.Sprintf("download from %s aborted: it received %d bytes in %s, below the minimum of %d bytes/s (--min-download-rate over --min-download-rate-window); the registry is stalled or too slow", e.host, e.received, e.window, e.floor)
}

// watchThroughput cancels the download (through cancel) when fewer than floor*window bytes
// arrive in a window while a registry request is in flight, so a registry that stalls a blob
// cannot hold a download slot until --download-timeout. Windows with nothing in flight (the
// extractor finishing on a slow disk) do not count. It returns when ctx ends.
func watchThroughput(ctx context.Context, clk clock.Clock, p *progress, floor int64, window time.Duration, host string, cancel context.CancelCauseFunc) {
	if floor <= 0 || window <= 0 {
		return
	}
	last := p.bytes.Load()
	for {
		t := clk.NewTimer(window)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C():
		}
		now := p.bytes.Load()
		got := now - last
		last = now
		if p.open.Load() > 0 && float64(got) < float64(floor)*window.Seconds() {
			cancel(&errStalled{host: host, received: got, window: window, floor: floor})
			return
		}
	}
}

// stallError turns a download that failed because the watchdog cancelled it into an
// Unavailable error naming the cause; other errors pass unchanged.
func stallError(ctx context.Context, err error) error {
	var st *errStalled
	if err == nil || !errors.As(context.Cause(ctx), &st) {
		return err
	}
	return fail(library.ErrRegistryUnavailable, "%w", st)
}

// resolveBounded is resolveTag within the resolution slots: each resolution may read a
// manifest (up to maxManifestBytes), so their number bounds that memory.
func (p *puller) resolveBounded(bg context.Context, ref libref.Ref) (string, error) {
	select {
	case p.resolveSlots <- struct{}{}:
	case <-bg.Done():
		return "", fail(library.ErrRegistryUnavailable, "resolving its tag was abandoned: %w", errClosed)
	}
	defer func() { <-p.resolveSlots }()
	return p.resolveTag(bg, ref)
}

// diskBudget is the configured budget, or the configured share of the size of the
// filesystem holding the store.
func diskBudget(cfg Config) (int64, error) {
	if cfg.DiskBudget > 0 {
		return cfg.DiskBudget, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(cfg.StoreDir, &st); err != nil {
		return 0, fmt.Errorf("measuring the filesystem of %s for the default disk budget (set --cache-disk-budget): %w", cfg.StoreDir, err)
	}
	size := int64(st.Blocks) * int64(st.Bsize)
	return max(1, size/100*int64(cfg.DiskBudgetPercent)), nil
}

// cacheBytesLocked is what the cache's entries are charged (see extract.BlockSize).
func (s *store) cacheBytesLocked() int64 {
	var total int64
	for _, k := range kinds {
		for _, e := range s.entries(k) {
			if !e.removing {
				total += e.meta.Bytes
			}
		}
	}
	return total
}

// checkBudget refuses to add to a cache that is over its disk budget, whether or not the
// entries filling it are in use: GC can free only unused ones, and a pod must not be able
// to fill the node's disk by naming ever more libraries.
func (s *store) checkBudget(what string) error {
	s.mu.Lock()
	used := s.cacheBytesLocked()
	s.mu.Unlock()
	if used < s.cfg.DiskBudget {
		return nil
	}
	s.log.Warn("library cache over its disk budget: refusing a new library", "image", what, "bytes", used, "budget", s.cfg.DiskBudget)
	return fail(library.ErrCacheFull, "the library cache on this node holds %d bytes, at or over its disk budget of %d bytes (--cache-disk-budget, default %d%% of the filesystem); unused libraries are evicted by GC, so delete pods that use libraries this node no longer needs or raise the budget",
		used, s.cfg.DiskBudget, DefaultDiskBudgetPercent)
}
