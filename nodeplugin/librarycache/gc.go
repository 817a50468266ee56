package librarycache

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/libref"
)

// handoutProtection keeps the disk budget from evicting an entry just handed out and not yet
// mounted: kubelet's publish deadline is about two minutes.
const handoutProtection = 2 * time.Minute

type victim struct {
	e      *entry
	reason string
}

// GC removes cache entries that nothing uses: an entry is in use if inUse (built by the
// driver: its mount records, publishes in progress, and what the mount table references:
// driver.LibrariesInUse) names a path inside it, or inside a view derived from it. An unused
// entry is removed once unused for the grace period; with a disk budget, the least recently
// used unused libraries go first until the cache fits. Libraries listed for prefetch are
// kept. If inUse fails, nothing is removed.
//
// The driver runs GC periodically and once at start-up, after its reconcile: entries whose
// pods were deleted while the node was down are unused and age out like any other.
func (c *Cache) GC(ctx context.Context, inUse func() (library.InUse, error)) error {
	c.gcMu.Lock()
	defer c.gcMu.Unlock()
	used, err := inUse()
	if err != nil {
		return fmt.Errorf("library cache GC: listing the layers in use: %w (nothing removed)", err)
	}
	now := time.Now()
	pinned := c.pinned()

	c.mu.Lock()
	referenced := map[*entry]bool{}
	mark := func(p string) {
		e := c.entryForPathLocked(p)
		if e == nil {
			return
		}
		referenced[e] = true
		if e.kind == kindView {
			// A view's files are the image's inodes: keep the image while a view is used.
			if img := c.images[e.meta.ImageKey]; img != nil {
				referenced[img] = true
			}
		}
	}
	for p := range used {
		mark(p)
	}
	var victims []victim
	var persist []*entry
	inUseImages := 0
	// Views before images: an image stays while a view of it (its inodes) stays.
	liveViews := map[string]bool{}
	for _, k := range []kind{kindView, kindGenerated, kindImage} {
		for _, e := range c.entries(k) {
			switch {
			case e.removing:
			case referenced[e]:
				if c.touchLocked(e, now) {
					persist = append(persist, e)
				}
				if k == kindImage {
					inUseImages++
				}
			case e.busy > 0, k == kindImage && (pinned[e.key] || liveViews[e.key]):
			case now.Sub(e.lastUsed) >= c.cfg.GCGracePeriod:
				e.removing = true
				victims = append(victims, victim{e, evictUnused})
			}
			if k == kindView && !e.removing {
				liveViews[e.meta.ImageKey] = true
			}
		}
	}
	if c.cfg.DiskBudget > 0 {
		victims = append(victims, c.budgetVictimsLocked(now, referenced, pinned)...)
	}
	c.metrics.librariesInUse.Set(float64(inUseImages))
	c.mu.Unlock()

	for _, e := range persist {
		c.persistUse(e)
	}
	var errs []error
	for i, v := range victims {
		if err := ctx.Err(); err != nil {
			c.mu.Lock()
			for _, rest := range victims[i:] {
				rest.e.removing = false
			}
			c.mu.Unlock()
			errs = append(errs, err)
			break
		}
		err := c.removeTree(v.e.rel())
		c.mu.Lock()
		if err != nil {
			v.e.removing = false
		} else {
			delete(c.entries(v.e.kind), v.e.key)
		}
		c.updateGaugesLocked()
		c.mu.Unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("removing %s: %w", filepath.Join(c.dir, v.e.rel()), err))
			continue
		}
		c.metrics.evictions.WithLabelValues(v.reason).Inc()
		c.log.Info("removed an unused cache entry", "entry", v.e.rel(), "image", v.e.meta.Image, "digest", v.e.meta.Digest,
			"bytes", v.e.meta.Bytes, "reason", v.reason, "unused_for_seconds", now.Sub(v.e.lastUsed).Seconds())
	}
	cached := func(digest string) bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.images[strings.TrimPrefix(digest, "sha256:")] != nil
	}
	if err := c.refs.prune(cached, max(c.cfg.TagTTL, 24*time.Hour), now); err != nil {
		c.log.Warn("cannot prune remembered tags", "error", err)
	}
	return errors.Join(errs...)
}

// budgetVictimsLocked picks least recently used unreferenced images (with their views, which
// share their inodes) until the cache fits the disk budget.
func (c *Cache) budgetVictimsLocked(now time.Time, referenced map[*entry]bool, pinned map[string]bool) []victim {
	var total int64
	for _, k := range kinds {
		for _, e := range c.entries(k) {
			if !e.removing {
				total += e.meta.Bytes
			}
		}
	}
	if total <= c.cfg.DiskBudget {
		return nil
	}
	viewsOf := map[string][]*entry{}
	for _, v := range c.views {
		viewsOf[v.meta.ImageKey] = append(viewsOf[v.meta.ImageKey], v)
	}
	var candidates []*entry
	for _, e := range c.images {
		if e.removing || referenced[e] || e.busy > 0 || pinned[e.key] || now.Sub(e.lastUsed) < handoutProtection {
			continue
		}
		candidates = append(candidates, e)
	}
	slices.SortFunc(candidates, func(a, b *entry) int { return a.lastUsed.Compare(b.lastUsed) })
	var out []victim
	for _, e := range candidates {
		if total <= c.cfg.DiskBudget {
			break
		}
		views := viewsOf[e.key]
		if slices.ContainsFunc(views, func(v *entry) bool {
			return v.removing || referenced[v] || v.busy > 0 || now.Sub(v.lastUsed) < handoutProtection
		}) {
			continue
		}
		for _, v := range views {
			v.removing = true
			out = append(out, victim{v, evictBudget})
		}
		e.removing = true
		out = append(out, victim{e, evictBudget})
		total -= e.meta.Bytes
	}
	if total > c.cfg.DiskBudget {
		c.log.Warn("the library cache exceeds its disk budget with libraries in use or prefetched", "bytes", total, "budget", c.cfg.DiskBudget)
	}
	return out
}

// pinned returns the image keys of the prefetch list, as last resolved.
func (c *Cache) pinned() map[string]bool {
	out := map[string]bool{}
	for _, image := range c.cfg.Prefetch {
		ref, err := libref.Parse(image)
		if err != nil {
			continue
		}
		digest := ref.Digest
		if digest == "" {
			rec, ok := c.refs.tag(tagKey(ref))
			if !ok {
				continue
			}
			digest = rec.Digest
		}
		if img, ok := c.refs.index(digest); ok {
			digest = img
		}
		out[strings.TrimPrefix(digest, "sha256:")] = true
	}
	return out
}

// entryForPathLocked maps a path handed out (or any path inside an entry) to its entry.
func (c *Cache) entryForPathLocked(p string) *entry {
	rel, err := filepath.Rel(c.dir, filepath.Clean(p))
	if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return nil
	}
	parts := strings.SplitN(rel, string(filepath.Separator), 3)
	if len(parts) < 2 {
		return nil
	}
	for _, k := range kinds {
		if parts[0] == k.dir() {
			return c.entries(k)[parts[1]]
		}
	}
	return nil
}
