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
	err := c.store.collect(ctx, inUse, c.pull.pinned())
	if errors.Is(err, errInUseUnknown) {
		return err
	}
	if perr := c.pull.refs.prune(c.store.hasImage, max(c.cfg.TagTTL, 24*time.Hour), c.clock.Now()); perr != nil {
		c.log.Warn("cannot prune remembered tags", "err", perr)
	}
	return err
}

// errInUseUnknown marks a GC pass that removed nothing because it could not tell what is used.
var errInUseUnknown = errors.New("nothing removed")

// collect is one GC pass over the store: it marks what used names, picks the victims
// (unused past the grace period, then least recently used for the budget) and removes them.
// pinned are image keys kept whatever happens (the prefetch list). Ages are measured from
// when the pass got the lock and the set in use, not from when it was asked for.
func (s *store) collect(ctx context.Context, inUse func() (library.InUse, error), pinned map[string]bool) error {
	s.gcMu.Lock()
	defer s.gcMu.Unlock()
	used, err := inUse()
	if err != nil {
		return fmt.Errorf("library cache GC: listing the layers in use: %w (%w)", err, errInUseUnknown)
	}
	now := s.clock.Now()
	victims, persist := s.pickVictims(used, pinned, now)
	for _, e := range persist {
		s.persistUse(e)
	}
	return s.removeVictims(ctx, victims, now)
}

// pickVictims marks the victims as being removed (so nothing hands them out meanwhile), and
// returns them with the entries whose use must be written to disk.
func (s *store) pickVictims(used library.InUse, pinned map[string]bool, now time.Time) (victims []victim, persist []*entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	referenced := s.referencedLocked(used)
	victims, persist, inUseImages := s.unusedPastGraceLocked(referenced, pinned, now)
	if s.cfg.DiskBudget > 0 {
		victims = append(victims, s.budgetVictimsLocked(now, referenced, pinned)...)
	}
	s.metrics.librariesInUse.Set(float64(inUseImages))
	return victims, persist
}

// referencedLocked maps every path of used to its entry; a view in use keeps its image (the
// view's files are the image's inodes).
func (s *store) referencedLocked(used library.InUse) map[*entry]bool {
	referenced := map[*entry]bool{}
	for p := range used {
		e := s.entryForPathLocked(p)
		if e == nil {
			continue
		}
		referenced[e] = true
		if e.kind == kindView {
			if img := s.images[e.meta.ImageKey]; img != nil {
				referenced[img] = true
			}
		}
	}
	return referenced
}

// unusedPastGraceLocked touches the referenced entries and marks the unreferenced ones unused
// for the grace period. Views come before images: an image stays while a view of it stays.
func (s *store) unusedPastGraceLocked(referenced map[*entry]bool, pinned map[string]bool, now time.Time) (victims []victim, persist []*entry, inUseImages int) {
	liveViews := map[string]bool{}
	for _, k := range []kind{kindView, kindGenerated, kindImage} {
		for _, e := range s.entries(k) {
			switch {
			case e.removing:
			case referenced[e]:
				if s.touchLocked(e, now) {
					persist = append(persist, e)
				}
				if k == kindImage {
					inUseImages++
				}
			case e.busy > 0, k == kindImage && (pinned[e.key] || liveViews[e.key]):
			case now.Sub(e.lastUsed) >= s.cfg.GCGracePeriod:
				e.removing = true
				victims = append(victims, victim{e, evictUnused})
			}
			if k == kindView && !e.removing {
				liveViews[e.meta.ImageKey] = true
			}
		}
	}
	return victims, persist, inUseImages
}

// removeVictims removes the victims one by one; when ctx ends, the rest are kept.
func (s *store) removeVictims(ctx context.Context, victims []victim, now time.Time) error {
	var errs []error
	for i, v := range victims {
		if err := ctx.Err(); err != nil {
			s.mu.Lock()
			for _, rest := range victims[i:] {
				rest.e.removing = false
			}
			s.mu.Unlock()
			errs = append(errs, err)
			break
		}
		if err := s.removeVictim(v, now); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeVictim removes one entry from the disk, then from the index.
func (s *store) removeVictim(v victim, now time.Time) error {
	err := s.removeTree(v.e.rel())
	s.mu.Lock()
	if err != nil {
		v.e.removing = false
	} else {
		delete(s.entries(v.e.kind), v.e.key)
	}
	s.updateGaugesLocked()
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("removing %s: %w", filepath.Join(s.dir, v.e.rel()), err)
	}
	s.metrics.evictions.WithLabelValues(v.reason).Inc()
	s.log.Info("removed an unused cache entry", "entry", v.e.rel(), "image", v.e.meta.Image, "digest", v.e.meta.Digest,
		"bytes", v.e.meta.Bytes, "reason", v.reason, "unusedForSeconds", now.Sub(v.e.lastUsed).Seconds())
	return nil
}

// budgetVictimsLocked picks least recently used unreferenced images (with their views, which
// share their inodes) until the cache fits the disk budget.
func (s *store) budgetVictimsLocked(now time.Time, referenced map[*entry]bool, pinned map[string]bool) []victim {
	total := s.cacheBytesLocked()
	if total <= s.cfg.DiskBudget {
		return nil
	}
	viewsOf := map[string][]*entry{}
	for _, v := range s.views {
		viewsOf[v.meta.ImageKey] = append(viewsOf[v.meta.ImageKey], v)
	}
	keep := func(e *entry) bool {
		return e.removing || referenced[e] || e.busy > 0 || now.Sub(e.lastUsed) < handoutProtection
	}
	var out []victim
	for _, e := range s.leastRecentlyUsedLocked(func(e *entry) bool { return keep(e) || pinned[e.key] }) {
		if total <= s.cfg.DiskBudget {
			break
		}
		views := viewsOf[e.key]
		if slices.ContainsFunc(views, keep) {
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
	if total > s.cfg.DiskBudget {
		s.log.Warn("the library cache exceeds its disk budget with libraries in use or prefetched", "bytes", total, "budget", s.cfg.DiskBudget)
	}
	return out
}

// leastRecentlyUsedLocked lists the images keep does not keep, least recently used first.
func (s *store) leastRecentlyUsedLocked(keep func(*entry) bool) []*entry {
	var candidates []*entry
	for _, e := range s.images {
		if !keep(e) {
			candidates = append(candidates, e)
		}
	}
	slices.SortFunc(candidates, func(a, b *entry) int { return a.lastUsed.Compare(b.lastUsed) })
	return candidates
}

// pinned returns the image keys of the prefetch list, as last resolved.
func (p *puller) pinned() map[string]bool {
	out := map[string]bool{}
	for _, image := range p.cfg.Prefetch {
		ref, err := libref.Parse(image)
		if err != nil {
			continue
		}
		digest := ref.Digest
		if digest == "" {
			rec, ok := p.refs.tag(tagKey(ref))
			if !ok {
				continue
			}
			digest = rec.Digest
		}
		if img, ok := p.refs.index(digest); ok {
			digest = img
		}
		out[strings.TrimPrefix(digest, "sha256:")] = true
	}
	return out
}

// entryForPathLocked maps a path handed out (or any path inside an entry) to its entry.
func (s *store) entryForPathLocked(p string) *entry {
	rel, err := filepath.Rel(s.dir, filepath.Clean(p))
	if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return nil
	}
	parts := strings.SplitN(rel, string(filepath.Separator), 3)
	if len(parts) < 2 {
		return nil
	}
	for _, k := range kinds {
		if parts[0] == k.dir() {
			return s.entries(k)[parts[1]]
		}
	}
	return nil
}
