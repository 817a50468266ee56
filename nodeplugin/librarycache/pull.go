package librarycache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/shared/version"
)

// maxLayers bounds the layers of one image (Docker's own limit is 127).
const maxLayers = 128

// resolveAndPull resolves a tag (unless its record is fresh) and makes sure the image it
// names is cached.
func (p *puller) resolveAndPull(bg context.Context, ref libref.Ref) (*entry, error) {
	tag := tagKey(ref)
	rec, ok := p.refs.tag(tag)
	digest := rec.Digest
	if !ok || p.clock.Since(rec.Resolved) >= p.cfg.TagTTL {
		d, err := p.resolveBounded(bg, ref)
		if err != nil {
			return nil, err
		}
		digest = d
		if err := p.refs.setTag(tag, d, p.clock.Now()); err != nil {
			p.log.Warn("cannot remember a tag resolution; it will be resolved again after a restart", "image", ref.String(), "err", err)
		}
		if ok && rec.Digest != d {
			p.log.Info("tag moved to a new digest", "image", ref.String(), "oldDigest", rec.Digest, "digest", d)
		}
	}
	if e := p.peekDigest(digest); e != nil {
		return e, nil
	}
	return p.pull(bg, ref, digest)
}

// resolveTag asks the mirrors, then the registry, which digest a tag names. HEAD is used
// because registries do not count it against pull rate limits.
func (p *puller) resolveTag(bg context.Context, ref libref.Ref) (string, error) {
	ctx, cancel := context.WithTimeout(bg, resolveTimeout)
	defer cancel()
	var received atomic.Int64
	defer func() { p.metrics.downloadedBytes.Add(float64(received.Load())) }()
	var attempts []attempt
	for _, repo := range p.candidates(ref.Repository) {
		t, err := name.NewTag(repo+":"+ref.Tag, p.nameOptions(repo)...)
		if err != nil {
			attempts = append(attempts, attempt{where: repo, err: err})
			continue
		}
		opts := p.remoteOptions(ctx, &received)
		desc, err := remote.Head(t, opts...)
		var terr *transport.Error
		if errors.As(err, &terr) && terr.StatusCode == http.StatusMethodNotAllowed {
			var d *remote.Descriptor
			if d, err = remote.Get(t, opts...); err == nil {
				desc = &d.Descriptor
			}
		}
		if err != nil {
			attempts = append(attempts, attempt{where: repo, err: err})
			if ctx.Err() != nil {
				break
			}
			continue
		}
		return desc.Digest.String(), nil
	}
	p.logAttempts(ref.String(), attempts)
	return "", registryError(attempts)
}

// pull makes sure the image with this manifest (or index) digest is cached: one download
// per digest at a time, within the download slots (slots.go), the disk budget and the
// minimum download rate (limits.go).
func (p *puller) pull(bg context.Context, ref libref.Ref, digest string) (*entry, error) {
	v, err, _ := p.flights.Do("pull:"+digest+"|"+requesterFrom(bg).scopeKey, func() (any, error) {
		if e := p.peekDigest(digest); e != nil {
			return e, nil
		}
		if err := p.rejection(digest); err != nil {
			return nil, err
		}
		if err := p.store.checkBudget(ref.String()); err != nil {
			return nil, err
		}
		host := registryHost(p.candidates(ref.Repository)[0])
		release, err := p.downloadSlots.acquire(bg, host, ref.String(), p.cfg.DownloadSlotWait)
		if err != nil {
			if bg.Err() != nil {
				return nil, fail(library.ErrRegistryUnavailable, "the download was abandoned: %w", errClosed)
			}
			return nil, err
		}
		defer release()
		if e := p.peekDigest(digest); e != nil {
			return e, nil
		}
		ctx, cancel := context.WithCancelCause(bg)
		defer cancel(nil)
		meter := new(progress)
		ctx = withProgress(ctx, meter)
		go watchThroughput(ctx, p.clock, meter, p.cfg.MinDownloadRate, p.cfg.MinDownloadRateWindow, host, cancel)
		e, err := p.download(ctx, ref, digest)
		if err = stallError(ctx, err); err != nil {
			if errors.Is(err, library.ErrImageRejected) {
				p.rememberRejection(digest, err)
			}
			return nil, err
		}
		return e, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*entry), nil
}

func (p *puller) rejection(digest string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.rejected[digest]
	if !ok {
		return nil
	}
	if p.clock.Now().After(r.until) {
		delete(p.rejected, digest)
		return nil
	}
	return r.err
}

// download fetches and extracts one image, trying the mirrors then the source.
func (p *puller) download(bg context.Context, ref libref.Ref, digest string) (*entry, error) {
	ctx, cancel := context.WithTimeout(bg, p.cfg.DownloadTimeout)
	defer cancel()
	start := p.clock.Now()
	var received atomic.Int64
	display := ref.String()
	if !ref.Pinned() {
		display += "@" + digest
	}
	p.log.Info("downloading library", "image", ref.String(), "digest", digest)

	var attempts []attempt
	var e *entry
	for _, repo := range p.candidates(ref.Repository) {
		var err error
		e, err = p.downloadFrom(ctx, repo, ref, digest, &received)
		if err == nil {
			break
		}
		attempts = append(attempts, attempt{where: repo, err: err})
		// Rejected or corrupted content from a mirror may be the mirror's fault: the next
		// location (finally the source) decides.
		if classify(err) == failLocal || bg.Err() != nil {
			break
		}
	}
	seconds := p.clock.Since(start).Seconds()
	p.metrics.downloadedBytes.Add(float64(received.Load()))
	if e != nil {
		p.metrics.downloads.WithLabelValues(resultSuccess).Inc()
		p.metrics.downloadSeconds.Observe(seconds)
		p.log.Info("library downloaded", "image", ref.String(), "digest", e.meta.Digest, "bytes", e.meta.Bytes,
			"files", e.meta.Files, "downloadedBytes", received.Load(), "seconds", seconds)
		return e, nil
	}
	err := registryError(attempts)
	f := classify(attempts[len(attempts)-1].err)
	if errors.Is(err, library.ErrImageNotFound) {
		f = failNotFound
	}
	p.metrics.downloads.WithLabelValues(downloadResult(f)).Inc()
	p.logAttempts(display, attempts)
	p.log.Warn("library download failed", "image", ref.String(), "digest", digest, "seconds", seconds, "err", err)
	if ttl := refusalTTL(err); ttl > 0 {
		p.mu.Lock()
		p.rejected[digest] = rejection{err: err, until: p.clock.Now().Add(ttl)}
		p.mu.Unlock()
	}
	return nil, err
}

// downloadFrom fetches the manifest of digest from repo (picking this node's platform from
// an index) and extracts the image into the store.
func (p *puller) downloadFrom(ctx context.Context, repo string, ref libref.Ref, digest string, received *atomic.Int64) (*entry, error) {
	dref, err := name.NewDigest(repo+"@"+digest, p.nameOptions(repo)...)
	if err != nil {
		return nil, err
	}
	desc, err := remote.Get(dref, p.remoteOptions(ctx, received)...)
	if err != nil {
		return nil, err
	}
	var img v1.Image
	switch {
	case desc.MediaType.IsIndex():
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, err
		}
		child, err := p.platformManifest(idx, ref)
		if err != nil {
			return nil, err
		}
		if err := p.refs.setIndex(digest, child.String()); err != nil {
			p.log.Warn("cannot remember an index's platform image", "image", ref.String(), "err", err)
		}
		if e := p.peekDigest(child.String()); e != nil {
			return e, nil
		}
		if img, err = idx.Image(child); err != nil {
			return nil, err
		}
	case desc.MediaType.IsImage():
		if img, err = desc.Image(); err != nil {
			return nil, err
		}
	default:
		return nil, fail(library.ErrImageRejected, "the reference names a %s, not a container image", desc.MediaType)
	}
	e, err := p.extractImage(ctx, img, ref)
	if err != nil && archiveReadFailed(err) {
		// Broken content, or bytes that are not the digest's (mirrors.go)?
		if verr := verifyBlobs(ctx, img); verr != nil && isIntegrityError(verr) {
			return nil, verr
		}
	}
	return e, err
}

// platformManifest picks this node's platform in an index.
func (p *puller) platformManifest(idx v1.ImageIndex, ref libref.Ref) (v1.Hash, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return v1.Hash{}, err
	}
	var available []string
	for _, m := range im.Manifests {
		if m.Platform == nil {
			continue
		}
		if m.Platform.Satisfies(p.platform) {
			return m.Digest, nil
		}
		available = append(available, m.Platform.String())
	}
	return v1.Hash{}, fail(library.ErrImageRejected, "its index has no image for this node's platform %s (it has: %s)", p.platform.String(), strings.Join(available, ", "))
}

// extractImage flattens img into a new image entry of the store (built in a work dir, then
// renamed into images/<hex>: store.buildEntry).
func (p *puller) extractImage(ctx context.Context, img v1.Image, ref libref.Ref) (*entry, error) {
	d, err := img.Digest()
	if err != nil {
		return nil, err
	}
	if err := checkConfigSize(img); err != nil {
		return nil, err
	}
	layers, err := img.Layers()
	if err != nil {
		return nil, err
	}
	if len(layers) > maxLayers {
		return nil, fail(library.ErrImageRejected, "it has %d layers, the limit is %d", len(layers), maxLayers)
	}
	var extracted int64
	// Reached through another index or reference meanwhile, the existing entry holds the
	// same content.
	e, fresh, err := p.store.buildEntry(kindImage, d.Hex, "pull", func(rootfs string) (entryMeta, error) {
		stats, err := p.extractLayers(ctx, img, layers, ref, rootfs)
		if err != nil {
			return entryMeta{}, err
		}
		extracted = stats.Bytes
		return entryMeta{Digest: d.String(), Image: ref.String(), Bytes: stats.DiskBytes, Files: stats.Files, Created: p.clock.Now().UTC(), BootID: p.store.bootID}, nil
	})
	if err == nil && fresh {
		p.metrics.extractedBytes.Add(float64(extracted))
	}
	return e, err
}

// extractLayers flattens the layers of img into the store directory rootfs (not created yet).
func (p *puller) extractLayers(ctx context.Context, img v1.Image, layers []v1.Layer, ref libref.Ref, rootfs string) (extract.Stats, error) {
	if err := p.store.root.Mkdir(rootfs, 0o755); err != nil {
		return extract.Stats{}, localErr(err)
	}
	// The layers' blobs download concurrently to files while mutate.Extract flattens them in
	// its order (prefetch.go).
	files, err := p.prefetchLayers(ctx, layers, p.layerLimit())
	if err != nil {
		return extract.Stats{}, err
	}
	rc := mutate.Extract(&limitedImage{Image: img, layers: files.wrap(), max: p.layerLimit()})
	stats, err := extract.Extract(ctx, rc, filepath.Join(p.store.dir, rootfs), extract.Options{
		MaxBytes:          p.cfg.MaxLibraryBytes,
		MaxEntries:        p.cfg.MaxLibraryFiles,
		PreserveOwnership: os.Geteuid() == 0,
	})
	// Closing the pipe ends mutate.Extract's goroutine; stop ends the downloads under it.
	_ = rc.Close()
	files.stop()
	if err != nil {
		var re *extract.ReadError
		if errors.As(err, &re) || errors.Is(err, extract.ErrRejected) || ctx.Err() != nil {
			return stats, err
		}
		return stats, localErr(err)
	}
	if stats.RewrittenSymlinks > 0 || stats.SetIDStripped > 0 || stats.Skipped > 0 {
		d, _ := img.Digest()
		p.log.Info("library image neutralised while extracting", "image", ref.String(), "digest", d.String(),
			"absoluteSymlinksMadeRelative", stats.RewrittenSymlinks, "setidBitsStripped", stats.SetIDStripped,
			"entriesSkipped", stats.Skipped, "skippedSample", stats.SkippedSample)
	}
	return stats, nil
}

// layerLimit bounds the decompressed size of one layer: the library cap plus generous tar
// framing. mutate.Extract decompresses entries it drops (shadowed, whited out, trailing
// data) without showing them to the extractor, so they need their own bound.
func (p *puller) layerLimit() int64 {
	return p.cfg.MaxLibraryBytes + int64(p.cfg.MaxLibraryFiles)*2048 + 16<<20
}

// candidates lists where repo can be pulled from: matching mirrors in order, then repo.
func (p *puller) candidates(repo string) []string {
	var out []string
	for _, m := range p.cfg.Mirrors {
		if r, ok := m.rewrite(repo); ok {
			out = append(out, r)
		}
	}
	return append(out, repo)
}

func (p *puller) nameOptions(repo string) []name.Option {
	host, _, _ := strings.Cut(repo, "/")
	if p.insecure[host] {
		return []name.Option{name.Insecure}
	}
	return nil
}

func (p *puller) remoteOptions(ctx context.Context, received *atomic.Int64) []remote.Option {
	return []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(p.keychainFor(ctx)),
		remote.WithPlatform(p.platform),
		remote.WithTransport(&countingTransport{base: p.transport, n: received}),
		remote.WithUserAgent(names.NodeBinary + "/" + version.Version),
		// A down registry answers "connection refused" at once; retry briefly for flakes
		// only, so a publish learns quickly that it must use the cache or fail.
		remote.WithRetryBackoff(remote.Backoff{Duration: 250 * time.Millisecond, Factor: 2, Jitter: 0.1, Steps: 3}),
	}
}

// countingTransport counts response body bytes: what the download cost the network.
type countingTransport struct {
	base http.RoundTripper
	n    *atomic.Int64
}

func (t *countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err != nil || resp.Body == nil {
		return resp, err
	}
	resp.Body = &countingBody{ReadCloser: resp.Body, n: t.n}
	return resp, nil
}

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}

// limitedImage caps the decompressed size of each layer mutate.Extract reads; layers, when
// set, replace the image's own (downloaded blobs: prefetch.go).
type limitedImage struct {
	v1.Image
	layers []v1.Layer
	max    int64
}

func (l *limitedImage) Layers() ([]v1.Layer, error) {
	layers := l.layers
	if layers == nil {
		var err error
		if layers, err = l.Image.Layers(); err != nil {
			return nil, err
		}
	}
	out := make([]v1.Layer, len(layers))
	for i, layer := range layers {
		out[i] = &limitedLayer{Layer: layer, max: l.max}
	}
	return out, nil
}

type limitedLayer struct {
	v1.Layer
	max int64
}

func (l *limitedLayer) Uncompressed() (io.ReadCloser, error) {
	rc, err := boundedUncompressed(l.Layer)
	if err != nil {
		return nil, err
	}
	return &limitedReader{ReadCloser: rc, left: l.max, max: l.max}, nil
}

type limitedReader struct {
	io.ReadCloser
	left, max int64
}

func (r *limitedReader) Read(p []byte) (int, error) {
	if r.left <= 0 {
		// Probe: a layer that ends exactly at the limit is fine.
		var one [1]byte
		if n, err := r.ReadCloser.Read(one[:]); n == 0 {
			return 0, err
		}
		return 0, &extract.RejectedError{Reason: fmt.Sprintf("has a layer that decompresses to more than %d bytes", r.max)}
	}
	if int64(len(p)) > r.left {
		p = p[:r.left]
	}
	n, err := r.ReadCloser.Read(p)
	r.left -= int64(n)
	return n, err
}
