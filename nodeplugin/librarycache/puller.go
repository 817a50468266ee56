package librarycache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sync/singleflight"
	"k8s.io/utils/clock"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/repoallow"
)

// puller is the cache's registry side: it resolves tags (through the remembered resolutions
// of refs.json), checks the allowlist and the grants of cached images (identity.go), picks
// credentials (credentials.go) and mirrors, and downloads images into the store, one flight
// per image however many volumes ask, within the download and resolution slots.
type puller struct {
	cfg       *Config
	log       *slog.Logger
	metrics   *metrics
	clock     clock.Clock
	store     *store
	life      *lifecycle
	transport http.RoundTripper
	platform  v1.Platform
	refs      *refStore
	insecure  map[string]bool
	// allowed is the repository allowlist (allow.go); ids the grants of cached images
	// (identity.go).
	allowed       *repoallow.List
	ids           *identities
	flights       singleflight.Group
	downloadSlots *downloadSlots
	// resolveSlots bounds concurrent tag resolutions (limits.go).
	resolveSlots chan struct{}

	// mu guards rejected and inFlight.
	mu       sync.Mutex
	rejected map[string]rejection
	// inFlight records when each running flight started, for "downloading for 2m" messages.
	inFlight map[string]time.Time
}

type rejection struct {
	err   error
	until time.Time
}

// fetch returns the cached image for ref, acquired (the caller releases it), downloading it
// with rq's credentials if needed. hit reports whether it was served without waiting for a
// download. Whether rq may have it is image's business (identity.go).
func (p *puller) fetch(ctx context.Context, ref libref.Ref, rq *requester) (e *entry, hit bool, err error) {
	if ref.Pinned() {
		return p.fetchDigest(ctx, ref, rq)
	}
	return p.fetchTag(ctx, ref, rq)
}

// fetchDigest: a digest names content, so once cached the registry is never asked again
// (unless the reference names a repository the image was not obtained through: identity.go).
func (p *puller) fetchDigest(ctx context.Context, ref libref.Ref, rq *requester) (*entry, bool, error) {
	if e := p.acquireDigest(ref.Digest); e != nil {
		return e, true, nil
	}
	key := "ref:" + ref.String() + "|" + rq.scopeKey
	return p.wait(ctx, p.startFlight(key, ref, rq, func(bg context.Context) (*entry, error) {
		return p.pull(bg, ref, ref.Digest)
	}), ref, key)
}

// fetchTag serves a tag from its last resolution while within the tag TTL; past it, the
// registry is asked (revalidate).
func (p *puller) fetchTag(ctx context.Context, ref libref.Ref, rq *requester) (*entry, bool, error) {
	rec, known := p.refs.tag(tagKey(ref))
	var cached *entry
	if known {
		cached = p.acquireDigest(rec.Digest)
	}
	if cached != nil && p.clock.Since(rec.Resolved) < p.cfg.TagTTL {
		return cached, true, nil
	}
	key := "tag:" + tagKey(ref) + "|" + rq.scopeKey
	ch := p.startFlight(key, ref, rq, func(bg context.Context) (*entry, error) {
		return p.resolveAndPull(bg, ref)
	})
	if cached == nil {
		return p.wait(ctx, ch, ref, key)
	}
	return p.revalidate(ctx, ch, ref, cached, rec.Digest)
}

// startFlight runs fetch (a download on rq's behalf) as the flight key, or joins the one
// running, and records the grant a successful flight obtained.
func (p *puller) startFlight(key string, ref libref.Ref, rq *requester, fetch func(bg context.Context) (*entry, error)) <-chan singleflight.Result {
	return p.flights.DoChan(key, p.flight(key, func(bg context.Context) (*entry, error) {
		e, err := fetch(withRequester(bg, rq))
		if err == nil {
			p.recordGrant(e, ref.Repository, rq)
		}
		return e, err
	}))
}

// revalidate waits for the registry to confirm a cached tag whose TTL expired, but never lets
// a slow or unreachable registry keep a pod from starting with the library this node already
// has (cached, acquired, with its last known digest).
func (p *puller) revalidate(ctx context.Context, ch <-chan singleflight.Result, ref libref.Ref, cached *entry, digest string) (*entry, bool, error) {
	timer := p.clock.NewTimer(revalidateWait)
	defer timer.Stop()
	select {
	case res := <-ch:
		if res.Err == nil {
			if fresh := p.store.acquireEntry(res.Val.(*entry)); fresh != nil {
				p.store.release(cached)
				return fresh, fresh == cached, nil
			}
			break
		}
		if errors.Is(res.Err, library.ErrImageNotFound) {
			p.store.release(cached)
			return nil, false, res.Err
		}
		p.log.Warn("registry did not confirm the tag; serving its last known digest", "image", ref.String(), "digest", digest, "err", res.Err)
	case <-timer.C():
		p.log.Info("registry slow to confirm the tag; serving its last known digest meanwhile", "image", ref.String(), "digest", digest)
	case <-ctx.Done():
	}
	p.metrics.staleServed.Inc()
	return cached, true, nil
}

func tagKey(ref libref.Ref) string { return ref.Repository + ":" + ref.Tag }

// flight wraps background work for singleflight: tracked by Close, timed for messages, and
// protected so a bug becomes an error instead of a crashed node plugin.
func (p *puller) flight(key string, fn func(context.Context) (*entry, error)) func() (any, error) {
	return func() (v any, err error) {
		if !p.life.enter() {
			return nil, errClosed
		}
		p.mu.Lock()
		p.inFlight[key] = p.clock.Now()
		p.mu.Unlock()
		defer func() {
			if r := recover(); r != nil {
				p.log.Error("library cache bug", "panic", r, "stack", string(debug.Stack()))
				v, err = nil, fmt.Errorf("internal error in the library cache: %v", r)
			}
			p.mu.Lock()
			delete(p.inFlight, key)
			p.mu.Unlock()
			p.life.wg.Done()
		}()
		e, err := fn(p.life.bg)
		if err != nil {
			return nil, err
		}
		return e, nil
	}
}

// wait waits for a flight or the caller's deadline, whichever comes first. The flight goes
// on after the caller gives up.
func (p *puller) wait(ctx context.Context, ch <-chan singleflight.Result, ref libref.Ref, key string) (*entry, bool, error) {
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, false, res.Err
		}
		if e := p.store.acquireEntry(res.Val.(*entry)); e != nil {
			return e, false, nil
		}
		return nil, false, fail(library.ErrDownloadInProgress, "it was evicted from the cache right after its download")
	case <-ctx.Done():
		p.mu.Lock()
		started, ok := p.inFlight[key]
		p.mu.Unlock()
		since := ""
		if ok {
			since = fmt.Sprintf(" (running for %s)", p.clock.Since(started).Round(time.Second))
		}
		return nil, false, fail(library.ErrDownloadInProgress, "its first download%s takes longer than this request may wait and goes on in the background", since)
	}
}

// acquireDigest finds a cached image by manifest digest, or by an index digest whose
// platform image is cached.
func (p *puller) acquireDigest(digest string) *entry {
	if e := p.store.acquire(kindImage, strings.TrimPrefix(digest, "sha256:")); e != nil {
		return e
	}
	if img, ok := p.refs.index(digest); ok {
		return p.store.acquire(kindImage, strings.TrimPrefix(img, "sha256:"))
	}
	return nil
}

// peekDigest is acquireDigest without acquiring, for background work that only needs to
// know whether a download is needed.
func (p *puller) peekDigest(digest string) *entry {
	keys := []string{strings.TrimPrefix(digest, "sha256:")}
	if img, ok := p.refs.index(digest); ok {
		keys = append(keys, strings.TrimPrefix(img, "sha256:"))
	}
	return p.store.peekImage(keys...)
}
