// Package librarycache downloads each tracer library image once per node into a
// content-addressed store and hands the CSI driver immutable directories to stack as
// overlayfs lower dirs. It implements library.Store.
//
// Downloads are single-flight (one per image however many volumes ask), detached from the
// caller (a publish that runs out of time gets ErrDownloadInProgress while the download goes
// on), bounded in parallelism, and atomic (work in tmp/, renamed into place). Tags resolve
// through a TTL cache that also lets a node keep serving cached tags while the registry is
// down. Archives are extracted by the extract package, which treats them as hostile.
// docs/library-cache.md describes the design.
package librarycache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"
	"k8s.io/utils/clock"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/repoallow"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

var _ library.Store = (*Cache)(nil)

const (
	// revalidateWait bounds how long a publish of a cached tag waits for the registry to
	// confirm the tag once its TTL expired; past it the last known digest is served.
	revalidateWait = 2 * time.Second
	// resolveTimeout bounds one tag resolution against all candidate registries.
	resolveTimeout = 30 * time.Second
	// rejectionTTL is how long a rejected image is remembered, so retries of a pod using a
	// hostile or oversized image do not download it again and again.
	rejectionTTL = 10 * time.Minute
)

var errClosed = errors.New("the library cache is shutting down")

// Cache is the node's library cache. It is safe for concurrent use.
type Cache struct {
	cfg       Config
	log       *slog.Logger
	dir       string
	root      *os.Root
	lockFile  *os.File
	token     string
	metrics   *metrics
	transport http.RoundTripper
	platform  v1.Platform
	refs      *refStore
	insecure  map[string]bool
	// allowed is the repository allowlist (allow.go); ids the grants of cached images
	// (identity.go).
	allowed *repoallow.List
	ids     *identities

	bg            context.Context
	stop          context.CancelFunc
	wg            sync.WaitGroup
	flights       singleflight.Group
	downloadSlots *downloadSlots
	// resolveSlots bounds concurrent tag resolutions (limits.go).
	resolveSlots chan struct{}
	clock        clock.Clock
	// gcMu serialises GC passes, and excludes them while an entry is recorded durable.
	gcMu sync.Mutex

	mu        sync.Mutex
	closed    bool
	started   bool
	orphans   []string
	images    map[string]*entry
	views     map[string]*entry
	generated map[string]*entry
	rejected  map[string]rejection
	// inFlight records when each running flight started, for "downloading for 2m" messages.
	inFlight map[string]time.Time
	// pendingDurable are entries published but not yet flushed (durability.go).
	pendingDurable []*entry
	durableSignal  chan struct{}
	bootID         string
	// beforeDurableRewrite, when set by a test, runs just before an entry's durability
	// rewrite.
	beforeDurableRewrite func()
}

type rejection struct {
	err   error
	until time.Time
}

// New opens (or creates) the store, takes its lock and loads its entries. Call Start to
// clean up what a previous run left and to prefetch, and Close to release the store.
func New(cfg Config) (*Cache, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.StoreDir, 0o700); err != nil {
		return nil, fmt.Errorf("library cache: %w", err)
	}
	// Handed-out paths must be the ones the mount table shows, so the paths in use that GC is
	// given match them.
	dir, err := filepath.EvalSymlinks(cfg.StoreDir)
	if err != nil {
		return nil, fmt.Errorf("library cache: %w", err)
	}
	lock, err := lockStore(dir, lockWait)
	if err != nil {
		return nil, err
	}
	c, err := open(cfg, dir, lock)
	if err != nil {
		_ = lock.Close()
		return nil, err
	}
	return c, nil
}

func open(cfg Config, dir string, lock *os.File) (*Cache, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("library cache: %w", err)
	}
	for _, sub := range []string{kindImage.dir(), kindView.dir(), kindGenerated.dir(), tmpDir} {
		if err := root.Mkdir(sub, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			root.Close()
			return nil, fmt.Errorf("library cache: %w", err)
		}
	}
	platform := v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	if cfg.Platform != nil {
		platform = *cfg.Platform
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		root.Close()
		return nil, fmt.Errorf("library cache metrics: %w", err)
	}
	refs, err := loadRefs(root, platform.String())
	if err != nil {
		if refs == nil {
			root.Close()
			return nil, fmt.Errorf("library cache: %w", err)
		}
		cfg.Logger.Warn("library cache: ignoring remembered tags", "error", err)
	}
	insecure := map[string]bool{}
	for _, r := range cfg.InsecureRegistries {
		insecure[r] = true
	}
	allowed, err := cfg.allowList()
	if err != nil {
		root.Close()
		return nil, fmt.Errorf("library cache: %w", err)
	}
	bg, stop := context.WithCancel(context.Background())
	c := &Cache{
		cfg:           cfg,
		log:           cfg.Logger.With("component", "librarycache"),
		dir:           dir,
		root:          root,
		lockFile:      lock,
		token:         fmt.Sprintf("p%d.%d", os.Getpid(), time.Now().UnixNano()),
		metrics:       m,
		transport:     &limitsTransport{base: &plainHTTPGuard{base: remote.DefaultTransport.(*http.Transport).Clone(), insecure: insecure}},
		platform:      platform,
		refs:          refs,
		insecure:      insecure,
		allowed:       allowed,
		bg:            bg,
		stop:          stop,
		downloadSlots: newDownloadSlots(cfg.MaxParallelDownloads, cfg.MaxDownloadsPerRegistry, cfg.Clock),
		resolveSlots:  make(chan struct{}, cfg.MaxParallelResolutions),
		clock:         cfg.Clock,
		images:        map[string]*entry{},
		views:         map[string]*entry{},
		generated:     map[string]*entry{},
		rejected:      map[string]rejection{},
		inFlight:      map[string]time.Time{},
		durableSignal: make(chan struct{}, 1),
		bootID:        readBootID(),
	}
	if c.cfg.DiskBudget, err = diskBudget(cfg); err != nil {
		stop()
		root.Close()
		return nil, fmt.Errorf("library cache: %w", err)
	}
	c.loadRejections()
	orphans, err := c.load()
	if err != nil {
		stop()
		root.Close()
		return nil, fmt.Errorf("library cache: reading the store: %w", err)
	}
	c.orphans = orphans
	if c.ids, err = loadIdentities(root, c.images); err != nil {
		c.log.Warn("library cache: ignoring recorded image origins", "error", err)
	}
	c.ids.live = func(key string) bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.images[key] != nil
	}
	c.mu.Lock()
	c.updateGaugesLocked()
	if len(c.pendingDurable) > 0 {
		c.durableSignal <- struct{}{}
	}
	c.mu.Unlock()
	c.wg.Add(1)
	go c.durabilityWorker()
	return c, nil
}

// Dir is the store directory (symlinks resolved): every path the cache hands out is below it.
func (c *Cache) Dir() string { return c.dir }

// Start removes what a crash or a previous process left in the store (work dirs, incomplete
// entries) and starts prefetching the configured libraries in the background. Prefetching
// stops when ctx ends or the cache is closed.
func (c *Cache) Start(ctx context.Context) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return errClosed
	}
	if c.started {
		c.mu.Unlock()
		return nil
	}
	c.started = true
	orphans := c.orphans
	c.orphans = nil
	c.mu.Unlock()

	c.sweep(orphans)

	pctx, cancel := context.WithCancel(c.bg)
	context.AfterFunc(ctx, cancel)
	for _, image := range c.cfg.Prefetch {
		c.goBackground(func() { c.prefetch(pctx, image) })
	}
	return nil
}

func (c *Cache) prefetch(ctx context.Context, image string) {
	ref, err := libref.Parse(image)
	if err != nil {
		c.log.Error("prefetch: invalid image reference", "image", image, "error", err)
		return
	}
	start := time.Now()
	e, _, err := c.image(ctx, ref, "")
	if err != nil {
		if ctx.Err() != nil {
			c.log.Info("prefetch stopped", "image", image)
			return
		}
		c.log.Error("prefetch failed; the first pod using this library will download it", "image", image, "error", err)
		return
	}
	defer c.release(e)
	c.log.Info("prefetched library", "image", image, "digest", e.meta.Digest, "seconds", time.Since(start).Seconds())
}

// Close stops background work (downloads in progress are abandoned and their work dirs
// removed), then releases the store.
func (c *Cache) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	c.stop()
	c.wg.Wait()
	err := c.root.Close()
	_ = unix.Flock(int(c.lockFile.Fd()), unix.LOCK_UN)
	return errors.Join(err, c.lockFile.Close())
}

// goBackground runs fn tracked by Close, unless the cache is closed.
func (c *Cache) goBackground(fn func()) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		fn()
	}()
	return true
}

// Layer is LayerFor a caller without a namespace: only credentials that serve every
// namespace are used.
func (c *Cache) Layer(ctx context.Context, lib volumeattrs.Library) (library.Layer, error) {
	return c.LayerFor(ctx, "", lib)
}

// LayerFor implements library.Store.
func (c *Cache) LayerFor(ctx context.Context, namespace string, lib volumeattrs.Library) (library.Layer, error) {
	ref, err := libref.Parse(lib.Image)
	if err != nil {
		return library.Layer{}, fmt.Errorf("%w: %v", library.ErrImageRejected, err)
	}
	source, target, err := cleanPlacement(lib.Source, lib.Target)
	if err != nil {
		return library.Layer{}, fmt.Errorf("%w: library %s: %v", library.ErrImageRejected, lib.Image, err)
	}
	if err := c.checkAllowed(lib.Image); err != nil {
		return library.Layer{}, err
	}
	img, hit, err := c.image(ctx, ref, namespace)
	if hit {
		c.metrics.hits.Inc()
	} else {
		c.metrics.misses.Inc()
	}
	if err != nil {
		return library.Layer{}, err
	}
	defer c.release(img)
	dir, err := c.place(img, ref.String(), source, target)
	if err != nil {
		return library.Layer{}, err
	}
	return library.Layer{Dir: dir, Digest: img.meta.Digest}, nil
}

// cleanPlacement re-validates what volumeattrs already validated: the cache must not trust
// its caller with paths.
func cleanPlacement(source, target string) (string, string, error) {
	if source == "" {
		source = libref.LibrarySource
	}
	if !path.IsAbs(source) || path.Clean(source) != source || strings.Contains(source, "/../") {
		return "", "", fmt.Errorf("source %q must be a clean absolute directory", source)
	}
	t, err := volumeattrs.CleanTarget(target)
	if err != nil {
		return "", "", fmt.Errorf("target %q: %v", target, err)
	}
	return source, t, nil
}

// fetch returns the cached image for ref, acquired (the caller releases it), downloading it
// with rq's credentials if needed. hit reports whether it was served without waiting for a
// download. Whether rq may have it is image's business (identity.go).
func (c *Cache) fetch(ctx context.Context, ref libref.Ref, rq *requester) (e *entry, hit bool, err error) {
	if ref.Pinned() {
		// A digest names content: once cached, the registry is never asked again (unless the
		// reference names a repository the image was not obtained through: identity.go).
		if e := c.acquireDigest(ref.Digest); e != nil {
			return e, true, nil
		}
		key := "ref:" + ref.String() + "|" + rq.scopeKey
		ch := c.flights.DoChan(key, c.flight(key, func(bg context.Context) (*entry, error) {
			e, err := c.pull(withRequester(bg, rq), ref, ref.Digest)
			if err == nil {
				c.recordGrant(e, ref.Repository, rq)
			}
			return e, err
		}))
		return c.wait(ctx, ch, ref, key)
	}

	tag := tagKey(ref)
	rec, known := c.refs.tag(tag)
	var cached *entry
	if known {
		cached = c.acquireDigest(rec.Digest)
	}
	if cached != nil && time.Since(rec.Resolved) < c.cfg.TagTTL {
		return cached, true, nil
	}
	key := "tag:" + tag + "|" + rq.scopeKey
	ch := c.flights.DoChan(key, c.flight(key, func(bg context.Context) (*entry, error) {
		e, err := c.resolveAndPull(withRequester(bg, rq), ref)
		if err == nil {
			c.recordGrant(e, ref.Repository, rq)
		}
		return e, err
	}))
	if cached == nil {
		return c.wait(ctx, ch, ref, key)
	}

	// The TTL expired on a cached tag: ask the registry, but never let a slow or unreachable
	// registry keep a pod from starting with the library this node already has.
	timer := time.NewTimer(revalidateWait)
	defer timer.Stop()
	select {
	case res := <-ch:
		if res.Err == nil {
			if fresh := c.acquireEntry(res.Val.(*entry)); fresh != nil {
				c.release(cached)
				return fresh, fresh == cached, nil
			}
			break
		}
		if errors.Is(res.Err, library.ErrImageNotFound) {
			c.release(cached)
			return nil, false, res.Err
		}
		c.log.Warn("registry did not confirm the tag; serving its last known digest", "image", ref.String(), "digest", rec.Digest, "error", res.Err)
	case <-timer.C:
		c.log.Info("registry slow to confirm the tag; serving its last known digest meanwhile", "image", ref.String(), "digest", rec.Digest)
	case <-ctx.Done():
	}
	c.metrics.staleServed.Inc()
	return cached, true, nil
}

func tagKey(ref libref.Ref) string { return ref.Repository + ":" + ref.Tag }

// flight wraps background work for singleflight: tracked by Close, timed for messages, and
// protected so a bug becomes an error instead of a crashed node plugin.
func (c *Cache) flight(key string, fn func(context.Context) (*entry, error)) func() (any, error) {
	return func() (v any, err error) {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, errClosed
		}
		c.wg.Add(1)
		c.inFlight[key] = time.Now()
		c.mu.Unlock()
		defer func() {
			if r := recover(); r != nil {
				c.log.Error("library cache bug", "panic", r, "stack", string(debug.Stack()))
				v, err = nil, fmt.Errorf("internal error in the library cache: %v", r)
			}
			c.mu.Lock()
			delete(c.inFlight, key)
			c.mu.Unlock()
			c.wg.Done()
		}()
		e, err := fn(c.bg)
		if err != nil {
			return nil, err
		}
		return e, nil
	}
}

// wait waits for a flight or the caller's deadline, whichever comes first. The flight goes
// on after the caller gives up.
func (c *Cache) wait(ctx context.Context, ch <-chan singleflight.Result, ref libref.Ref, key string) (*entry, bool, error) {
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, false, res.Err
		}
		if e := c.acquireEntry(res.Val.(*entry)); e != nil {
			return e, false, nil
		}
		return nil, false, fmt.Errorf("%w: %s was evicted right after its download; retry", library.ErrDownloadInProgress, ref)
	case <-ctx.Done():
		c.mu.Lock()
		started, ok := c.inFlight[key]
		c.mu.Unlock()
		since := ""
		if ok {
			since = fmt.Sprintf(" (running for %s)", time.Since(started).Round(time.Second))
		}
		return nil, false, fmt.Errorf("%w: the first download of %s on this node%s takes longer than this request may wait; it goes on in the background and kubelet's retry will find it ready", library.ErrDownloadInProgress, ref, since)
	}
}

// acquireDigest finds a cached image by manifest digest, or by an index digest whose
// platform image is cached.
func (c *Cache) acquireDigest(digest string) *entry {
	if e := c.acquire(kindImage, strings.TrimPrefix(digest, "sha256:")); e != nil {
		return e
	}
	if img, ok := c.refs.index(digest); ok {
		return c.acquire(kindImage, strings.TrimPrefix(img, "sha256:"))
	}
	return nil
}

// peekDigest is acquireDigest without acquiring, for background work that only needs to
// know whether a download is needed.
func (c *Cache) peekDigest(digest string) *entry {
	keys := []string{strings.TrimPrefix(digest, "sha256:")}
	if img, ok := c.refs.index(digest); ok {
		keys = append(keys, strings.TrimPrefix(img, "sha256:"))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range keys {
		if e := c.images[k]; e != nil && !e.removing {
			return e
		}
	}
	return nil
}

// acquireEntry acquires e if it is still the live entry for its key.
func (c *Cache) acquireEntry(e *entry) *entry {
	c.mu.Lock()
	cur := c.entries(e.kind)[e.key]
	if cur == nil || cur.removing {
		c.mu.Unlock()
		return nil
	}
	cur.busy++
	persist := c.touchLocked(cur, time.Now())
	c.mu.Unlock()
	if persist {
		c.persistUse(cur)
	}
	return cur
}
