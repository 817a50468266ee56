package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// DefaultKeptLayerGrace is how long a kept writable layer stays once its pod's dir is gone
// from kubelet's pods dir.
const DefaultKeptLayerGrace = 10 * time.Minute

// Kept writable layers (Config.KeepWritableLayers).
//
// After a node reboot kubelet starts the same pods again (same UIDs, same volume ids, so the
// same target paths) and publishes their volumes again. A writable library volume's record
// names its overlay dir, <state-dir>/overlays/<key>, where key hashes the volume id and the
// target: the same volume of the same pod finds the same dir. With KeepWritableLayers, a
// record whose target is not mounted keeps its overlay dir (the start-up check and a publish
// that finds it do not release it), and a publish of the same volume id at the same target
// mounts the kept upper dir again with a fresh work dir (writablelayer.Resume), so the pod
// sees what it wrote. Only that volume at that target gets it: another pod has another
// target, another volume another key.
//
// A kept layer goes when kubelet unpublishes the volume (as any), or when the pod is gone: a
// pod deleted while the node was down gets no unpublish. The plugin has no API rights to ask
// whether a pod exists; kubelet removes a pod's dir (<kubelet-dir>/pods/<uid>) once the pod
// is deleted and its volumes are cleaned up, so a kept layer whose pod dir has been gone for
// KeptLayerGrace is removed (CollectKeptLayers, run periodically). Each kept layer stays
// within its volume's project quota, as while it was mounted, so the disk kept is bounded by
// the limits of volumes whose pods still exist on the node; MaxKeptWritableBytes bounds all
// kept layers together, the oldest going first.

// keepable reports whether rec's writable layer is kept while its target is not mounted.
func (d *Driver) keepable(rec *state.Record) bool {
	return d.cfg.KeepWritableLayers && rec.Kind == string(volumeattrs.KindLibrary) && !rec.ReadOnly && rec.OverlayDir != ""
}

// canResume reports whether the publish r may mount the kept layer of the stale record rec.
func (d *Driver) canResume(r *publishRequest, rec *state.Record) bool {
	return d.keepable(rec) && rec.VolumeID == r.volumeID && rec.TargetPath == r.target &&
		r.spec.Kind == volumeattrs.KindLibrary && !r.readOnly
}

// podDirExists reports whether the pod dir of rec's target is in kubelet's pods dir.
func (d *Driver) podDirExists(rec *state.Record) (bool, error) {
	rel, ok := parseTarget(d.podsDir, rec.TargetPath)
	if !ok {
		return false, fmt.Errorf("target %s: not of the shape %s", rec.TargetPath, d.targetShape())
	}
	uid, _, _ := strings.Cut(rel, "/")
	pods, err := unix.Open(d.podsDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("open kubelet pods dir %s: %w", d.podsDir, err)
	}
	defer unix.Close(pods)
	var st unix.Stat_t
	err = unix.Fstatat(pods, uid, &st, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENOENT):
		return false, nil
	}
	return false, fmt.Errorf("stat pod dir %s/%s: %w", d.podsDir, uid, err)
}

// CollectKeptLayers removes the kept writable layers whose pod dir has been gone for the
// grace period, then, while the kept layers take more than MaxKeptWritableBytes together, the
// oldest ones (by publish time), and returns how many it removed. A layer whose target is
// mounted again, or whose pod dir is back, is not kept any more or not yet due. Each removal
// takes the same locks as publish and unpublish and checks the record again under them.
func (d *Driver) CollectKeptLayers(ctx context.Context) (int, error) {
	if !d.cfg.KeepWritableLayers || !d.Ready() {
		return 0, nil
	}
	d.mu.Lock()
	var candidates []*state.Record
	for _, rec := range d.byTarget {
		if d.keepable(rec) {
			candidates = append(candidates, rec)
		}
	}
	d.mu.Unlock()
	removed := 0
	var kept []*state.Record
	var errs []error
	for _, rec := range candidates {
		if err := ctx.Err(); err != nil {
			return removed, err
		}
		stillKept, gone, err := d.collectKept(ctx, rec)
		if err != nil {
			errs = append(errs, err)
		}
		if gone {
			removed++
		}
		if stillKept {
			kept = append(kept, rec)
		}
	}
	if d.cfg.MaxKeptWritableBytes > 0 {
		n, err := d.enforceKeptBudget(ctx, kept)
		removed += n
		if err != nil {
			errs = append(errs, err)
		}
	}
	return removed, errors.Join(errs...)
}

// collectKept looks at one kept layer: stillKept when its target is not mounted and it stays,
// gone when it was removed because its pod dir was gone for the grace period.
func (d *Driver) collectKept(ctx context.Context, rec *state.Record) (stillKept, gone bool, _ error) {
	unlock, err := d.locks.Lock(ctx, "volume/"+rec.VolumeID, "target/"+rec.TargetPath)
	if err != nil {
		return false, false, err
	}
	defer unlock()
	key := rec.Key()
	forget := func() {
		d.mu.Lock()
		delete(d.podGone, key)
		d.mu.Unlock()
	}
	if d.record(rec.TargetPath) != rec {
		forget()
		return false, false, nil
	}
	mounted, err := d.isMounted(rec.TargetPath)
	if err != nil || mounted {
		forget()
		return false, false, err
	}
	exists, err := d.podDirExists(rec)
	if err != nil || exists {
		forget()
		return err == nil, false, err
	}
	now := d.cfg.Now()
	d.mu.Lock()
	since, seen := d.podGone[key]
	if !seen {
		d.podGone[key] = now
		since = now
	}
	d.mu.Unlock()
	if now.Sub(since) < d.cfg.KeptLayerGrace {
		return true, false, nil
	}
	if err := d.release(rec); err != nil {
		return true, false, fmt.Errorf("removing the kept writable layer of volume %s: %w", rec.VolumeID, err)
	}
	forget()
	d.metrics.keptRemoved.WithLabelValues("pod-gone").Inc()
	d.recordLog(rec).Info("removed a kept writable layer: its pod's dir has been gone from the kubelet pods dir for the grace period",
		"pod", rec.Pod.Name, "namespace", rec.Pod.Namespace, "podUID", rec.Pod.UID, "goneSince", since, "grace", d.cfg.KeptLayerGrace)
	return false, true, nil
}

// enforceKeptBudget removes the oldest kept layers (by publish time) while all of them take
// more than MaxKeptWritableBytes.
func (d *Driver) enforceKeptBudget(ctx context.Context, kept []*state.Record) (int, error) {
	used := make(map[*state.Record]int64, len(kept))
	var total int64
	var errs []error
	for _, rec := range kept {
		n, err := d.writable.Used(rec.OverlayDir)
		if err != nil {
			errs = append(errs, fmt.Errorf("measuring the kept writable layer of volume %s: %w", rec.VolumeID, err))
			continue
		}
		used[rec] = n
		total += n
	}
	budget := d.cfg.MaxKeptWritableBytes
	if total <= budget {
		return 0, errors.Join(errs...)
	}
	slices.SortFunc(kept, func(a, b *state.Record) int { return a.Created.Compare(b.Created) })
	removed := 0
	for _, rec := range kept {
		if total <= budget || ctx.Err() != nil {
			break
		}
		n, ok := used[rec]
		if !ok {
			continue
		}
		if err := d.removeKeptForBudget(ctx, rec, total, budget); err != nil {
			errs = append(errs, err)
			continue
		}
		total -= n
		removed++
	}
	if total > budget {
		errs = append(errs, fmt.Errorf("the kept writable layers still take %s, above --max-kept-writable-bytes=%s", writablelayer.FormatBytes(total), writablelayer.FormatBytes(budget)))
	}
	return removed, errors.Join(errs...)
}

func (d *Driver) removeKeptForBudget(ctx context.Context, rec *state.Record, total, budget int64) error {
	unlock, err := d.locks.Lock(ctx, "volume/"+rec.VolumeID, "target/"+rec.TargetPath)
	if err != nil {
		return err
	}
	defer unlock()
	if d.record(rec.TargetPath) != rec {
		return nil // published again or unpublished meanwhile: not kept any more
	}
	if mounted, err := d.isMounted(rec.TargetPath); err != nil || mounted {
		return err
	}
	if err := d.release(rec); err != nil {
		return fmt.Errorf("removing the kept writable layer of volume %s: %w", rec.VolumeID, err)
	}
	d.mu.Lock()
	delete(d.podGone, rec.Key())
	d.mu.Unlock()
	d.metrics.keptRemoved.WithLabelValues("budget").Inc()
	d.recordLog(rec).Warn("removed a kept writable layer, oldest first: the kept layers took more than --max-kept-writable-bytes; the pod finds an empty volume at its next publish",
		"pod", rec.Pod.Name, "namespace", rec.Pod.Namespace, "podUID", rec.Pod.UID, "published", rec.Created,
		"keptBytes", total, "budget", budget)
	return nil
}
