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
	"maps"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"k8s.io/utils/clock"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/libref"
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

// Cache is the node's library cache: a front over the store (disk entries, store.go) and the
// puller (registries, puller.go) that keeps the API the driver uses. It is safe for
// concurrent use.
type Cache struct {
	cfg   Config
	log   *slog.Logger
	clock clock.Clock
	life  *lifecycle
	store *store
	pull  *puller

	// mu guards started.
	mu      sync.Mutex
	started bool
}

// lifecycle tracks the cache's background work (downloads, prefetches, the durability
// worker), so that Close stops it and waits for it.
type lifecycle struct {
	bg   context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup

	// mu guards closed, and orders wg.Add after a check of closed before Close's wg.Wait.
	mu     sync.Mutex
	closed bool
}

// enter counts one more piece of background work (the caller calls wg.Done), unless the
// cache is closed.
func (l *lifecycle) enter() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.wg.Add(1)
	return true
}

// goBackground runs fn tracked by Close, unless the cache is closed.
func (l *lifecycle) goBackground(fn func()) bool {
	if !l.enter() {
		return false
	}
	go func() {
		defer l.wg.Done()
		fn()
	}()
	return true
}

// close stops background work and waits for it; it reports false if already closed.
func (l *lifecycle) close() bool {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return false
	}
	l.closed = true
	l.mu.Unlock()
	l.stop()
	l.wg.Wait()
	return true
}

func (l *lifecycle) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
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
	lock, err := lockStore(dir, lockWait, cfg.Clock)
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
	if cfg.DiskBudget == 0 {
		var err error
		if cfg.DiskBudget, err = diskBudget(cfg); err != nil {
			return nil, fmt.Errorf("library cache: %w", err)
		}
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("library cache metrics: %w", err)
	}
	bg, stop := context.WithCancel(context.Background())
	c := &Cache{cfg: cfg, log: cfg.Logger.With("component", "librarycache"), clock: cfg.Clock, life: &lifecycle{bg: bg, stop: stop}}
	if c.store, err = openStore(&c.cfg, dir, lock, m, c.life); err != nil {
		stop()
		return nil, err
	}
	if c.pull, err = newPuller(&c.cfg, c.store, m, c.life); err != nil {
		stop()
		c.store.root.Close()
		return nil, err
	}
	c.store.waitIdle = func(ctx context.Context, limit time.Duration) {
		c.pull.downloadSlots.waitIdle(ctx, c.clock, limit)
	}
	c.store.startDurability()
	return c, nil
}

// newPuller sets up the registry side over s: the transport, the platform, the remembered
// tags, the allowlist, the grants of the images s holds and the remembered rejections.
func newPuller(cfg *Config, s *store, m *metrics, life *lifecycle) (*puller, error) {
	platform := v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	if cfg.Platform != nil {
		platform = *cfg.Platform
	}
	refs, err := loadRefs(s.root, platform.String())
	if err != nil {
		if refs == nil {
			return nil, fmt.Errorf("library cache: %w", err)
		}
		cfg.Logger.Warn("library cache: ignoring remembered tags", "err", err)
	}
	insecure := map[string]bool{}
	for _, r := range cfg.InsecureRegistries {
		insecure[r] = true
	}
	allowed, err := cfg.allowList()
	if err != nil {
		return nil, fmt.Errorf("library cache: %w", err)
	}
	p := &puller{
		cfg:           cfg,
		log:           s.log,
		metrics:       m,
		clock:         cfg.Clock,
		store:         s,
		life:          life,
		transport:     &limitsTransport{base: &plainHTTPGuard{base: remote.DefaultTransport.(*http.Transport).Clone(), insecure: insecure}},
		platform:      platform,
		refs:          refs,
		insecure:      insecure,
		allowed:       allowed,
		downloadSlots: newDownloadSlots(cfg.MaxParallelDownloads, cfg.MaxDownloadsPerRegistry, cfg.Clock),
		resolveSlots:  make(chan struct{}, cfg.MaxParallelResolutions),
		rejected:      map[string]rejection{},
		inFlight:      map[string]time.Time{},
	}
	p.loadRejections()
	s.mu.Lock()
	images := maps.Clone(s.images)
	s.mu.Unlock()
	if p.ids, err = loadIdentities(s.root, images); err != nil {
		p.log.Warn("library cache: ignoring recorded image origins", "err", err)
	}
	p.ids.live = func(key string) bool { return s.hasImage(key) }
	return p, nil
}

// Dir is the store directory (symlinks resolved): every path the cache hands out is below it.
func (c *Cache) Dir() string { return c.store.dir }

// Start removes what a crash or a previous process left in the store (work dirs, incomplete
// entries) and starts prefetching the configured libraries in the background. Prefetching
// stops when ctx ends or the cache is closed.
func (c *Cache) Start(ctx context.Context) error {
	if c.life.isClosed() {
		return errClosed
	}
	c.mu.Lock()
	if c.started {
		c.mu.Unlock()
		return nil
	}
	c.started = true
	c.mu.Unlock()

	c.store.sweep(c.store.takeOrphans())

	pctx, cancel := context.WithCancel(c.life.bg)
	context.AfterFunc(ctx, cancel)
	for _, image := range c.cfg.Prefetch {
		c.life.goBackground(func() { c.prefetch(pctx, image) })
	}
	return nil
}

func (c *Cache) prefetch(ctx context.Context, image string) {
	ref, err := libref.Parse(image)
	if err != nil {
		c.log.Error("prefetch: invalid image reference", "image", image, "err", err)
		return
	}
	start := c.clock.Now()
	e, _, err := c.pull.image(ctx, ref, "")
	if err != nil {
		if ctx.Err() != nil {
			c.log.Info("prefetch stopped", "image", image)
			return
		}
		c.log.Error("prefetch failed; the first pod using this library will download it", "image", image, "err", err)
		return
	}
	defer c.store.release(e)
	c.log.Info("prefetched library", "image", image, "digest", e.meta.Digest, "seconds", c.clock.Since(start).Seconds())
}

// Close stops background work (downloads in progress are abandoned and their work dirs
// removed), then releases the store.
func (c *Cache) Close() error {
	if !c.life.close() {
		return nil
	}
	return c.store.close()
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
		return library.Layer{}, fail(library.ErrImageRejected, "%v", err)
	}
	source, target, err := cleanPlacement(lib.Source, lib.Target)
	if err != nil {
		return library.Layer{}, fail(library.ErrImageRejected, "%v", err)
	}
	if err := c.pull.checkAllowed(lib.Image); err != nil {
		return library.Layer{}, err
	}
	img, hit, err := c.pull.image(ctx, ref, namespace)
	if hit {
		c.store.metrics.hits.Inc()
	} else {
		c.store.metrics.misses.Inc()
	}
	if err != nil {
		return library.Layer{}, err
	}
	defer c.store.release(img)
	dir, err := c.store.place(img, source, target)
	if err != nil {
		return library.Layer{}, err
	}
	return library.Layer{Dir: dir, Digest: img.meta.Digest}, nil
}

// GeneratedFiles implements library.Store: an immutable directory holding exactly files,
// shared by every caller asking for the same content.
func (c *Cache) GeneratedFiles(files map[string]string) (string, error) {
	return c.store.generatedFiles(files)
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
