package librarycache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/libref"
)

// Cache identity. An image is keyed by its digest, but a digest alone does not say who may
// have it: a private image of one team must not be served to a reference naming another
// repository (or an unreachable registry) that merely repeats its digest, nor to a namespace
// that could not have pulled it. So each cached image records the grants it was obtained
// through: the repository a registry served (or confirmed) it from, and the
// namespace-restricted pull secret that was needed, if any. A reference is served from the
// cache only if a grant names its repository and either needed no restricted secret or one
// its namespace is granted. Otherwise the registry is asked (HEAD of the digest in that
// repository, with the namespace's credentials): a yes adds a grant; "not found" is NotFound,
// a refusal is the registry's access error, and an unreachable registry is Unavailable
// (kubelet retries; the image is not served until the repository confirms it).

const identityFile = "identity.json"

// grant is one way an image was obtained.
type grant struct {
	Repository string `json:"repository"`
	// Secret is the namespace-restricted pull secret the registry needed; empty when the
	// credentials used serve every namespace.
	Secret string `json:"secret,omitempty"`
}

// identities persists the grants of every cached image (keyed like images/<hex>). It is
// written whole, atomically, on every change; grants are rare (one per repository and
// secret an image is fetched or confirmed through).
type identities struct {
	root *os.Root
	// live reports whether an image is still cached; grants of removed images are dropped
	// when the file is written.
	live func(key string) bool

	mu     sync.Mutex
	grants map[string][]grant
	// writeMu serialises file writes outside mu.
	writeMu sync.Mutex
}

// loadIdentities reads identity.json. When the file does not exist (a store written before
// grants were recorded), each cached image gets the repository it was first pulled as, with
// no restricted secret: secrets had no scopes then.
func loadIdentities(root *os.Root, images map[string]*entry) (*identities, error) {
	ids := &identities{root: root, grants: map[string][]grant{}}
	b, err := root.ReadFile(identityFile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		for key, e := range images {
			if ref, err := libref.Parse(e.meta.Image); err == nil {
				ids.grants[key] = []grant{{Repository: ref.Repository}}
			}
		}
		return ids, ids.save()
	case err != nil:
		return ids, err
	}
	if err := json.Unmarshal(b, &ids.grants); err != nil {
		// Unknown grants only cost a confirmation by the registry.
		ids.grants = map[string][]grant{}
		return ids, fmt.Errorf("%s is corrupt, cached images will be confirmed by their registries: %w", identityFile, err)
	}
	for key := range ids.grants {
		if images[key] == nil {
			delete(ids.grants, key)
		}
	}
	return ids, nil
}

func (ids *identities) list(key string) []grant {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	return slices.Clone(ids.grants[key])
}

func (ids *identities) add(key string, g grant) error {
	ids.mu.Lock()
	if slices.Contains(ids.grants[key], g) {
		ids.mu.Unlock()
		return nil
	}
	ids.grants[key] = append(ids.grants[key], g)
	ids.mu.Unlock()
	return ids.save()
}

func (ids *identities) save() error {
	ids.writeMu.Lock()
	defer ids.writeMu.Unlock()
	ids.mu.Lock()
	if ids.live != nil {
		for key := range ids.grants {
			if !ids.live(key) {
				delete(ids.grants, key)
			}
		}
	}
	b, err := json.MarshalIndent(ids.grants, "", " ") //nolint:gosec // G117: grant.Secret is a pull secret's name (its scope key), never its content
	ids.mu.Unlock()
	if err != nil {
		return err
	}
	return writeFileAtomic(ids.root, identityFile, b, 0o600)
}

// servable reports whether e may be served to a reference of repo from namespace.
func (p *puller) servable(e *entry, repo, namespace string) bool {
	for _, g := range p.ids.list(e.key) {
		if g.Repository != repo {
			continue
		}
		if g.Secret == "" {
			return true
		}
		sc, ok := p.scopeOf(g.Secret)
		if !ok || sc.Grants(namespace, repo) {
			// A secret whose scope was removed serves every namespace now.
			return true
		}
	}
	return false
}

// recordGrant remembers that the flight of rq obtained e through repo.
func (p *puller) recordGrant(e *entry, repo string, rq *requester) {
	resolved, secret := rq.used()
	if !resolved {
		// Nothing was asked of a registry in this flight: no evidence.
		return
	}
	if err := p.ids.add(e.key, grant{Repository: repo, Secret: secret}); err != nil {
		p.log.Warn("cannot record where a cached library came from; the registry will be asked again after a restart", "image", e.meta.Image, "digest", e.meta.Digest, "err", err)
	}
}

// image returns the cached image for ref on behalf of namespace, acquired, downloading it if
// needed and confirming with the registry that ref's repository holds it if no grant says so.
func (p *puller) image(ctx context.Context, ref libref.Ref, namespace string) (*entry, bool, error) {
	rq := p.newRequester(namespace)
	e, hit, err := p.fetch(ctx, ref, rq)
	if err != nil || p.servable(e, ref.Repository, namespace) {
		return e, hit, err
	}
	digest := ref.Digest
	if digest == "" {
		digest = e.meta.Digest
	}
	key := "confirm:" + ref.Repository + "@" + digest + "|" + rq.scopeKey
	vrq := p.newRequester(namespace)
	ch := p.flights.DoChan(key, p.flight(key, func(bg context.Context) (*entry, error) {
		if err := p.confirm(withRequester(bg, vrq), ref, digest); err != nil {
			return nil, err
		}
		p.recordGrant(e, ref.Repository, vrq)
		return e, nil
	}))
	select {
	case res := <-ch:
		if res.Err != nil {
			p.store.release(e)
			return nil, false, res.Err
		}
		if p.servable(e, ref.Repository, namespace) {
			return e, false, nil
		}
		p.store.release(e)
		return nil, false, fail(library.ErrRegistryUnavailable, "the registry confirmed the digest with credentials this pod's namespace is not granted")
	case <-ctx.Done():
		p.store.release(e)
		return nil, false, fail(library.ErrDownloadInProgress, "the registry is being asked whether the image's repository holds its digest")
	}
}

// confirm asks the mirrors, then the registry of ref, whether ref's repository holds digest.
func (p *puller) confirm(bg context.Context, ref libref.Ref, digest string) error {
	ctx, cancel := context.WithTimeout(bg, resolveTimeout)
	defer cancel()
	var received atomic.Int64
	defer func() { p.metrics.downloadedBytes.Add(float64(received.Load())) }()
	var attempts []attempt
	for _, repo := range p.candidates(ref.Repository) {
		d, err := name.NewDigest(repo+"@"+digest, p.nameOptions(repo)...)
		if err != nil {
			attempts = append(attempts, attempt{where: repo, err: err})
			continue
		}
		opts := p.remoteOptions(ctx, &received)
		_, err = remote.Head(d, opts...)
		if isStatus(err, http.StatusMethodNotAllowed) {
			_, err = remote.Get(d, opts...)
		}
		if err == nil {
			return nil
		}
		attempts = append(attempts, attempt{where: repo, err: err})
		if ctx.Err() != nil {
			break
		}
	}
	display := ref.Repository + "@" + digest
	p.logAttempts(display, attempts)
	err := registryError(attempts)
	if errors.Is(err, library.ErrRegistryUnavailable) {
		return fmt.Errorf("%w; a cached image is served for a repository only once it confirms that it holds the image's digest", err)
	}
	return err
}
