package driver

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/state"
)

// Reconcile is Start followed by waiting for its background check: the state dir in line with
// the mount table when it returns (tests, tools).
func (d *Driver) Reconcile(ctx context.Context) error {
	if err := d.Start(ctx); err != nil {
		return err
	}
	select {
	case <-d.Verified():
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Start brings the state dir in line with the mount table, once at startup, in two parts.
//
// Before the driver is marked ready, what serving needs: every record is read and validated,
// and indexed by its target as if its target were mounted; an overlay dir that no record
// references and no mounted overlay uses is removed. This costs no system call per record.
//
// Then, in the background (Verified is closed when it is done), each record's target is
// checked: a record whose target is still mounted is kept (nothing that is mounted is
// forgotten); one whose target is no longer mounted (node reboot, crash between record and
// mount, a mount removed by hand) is dropped, with its overlay dirs and its empty target,
// under the same per-volume and per-target locks as publish and unpublish, and only if it is
// still the record of that target.
//
// Serving before that check is safe because every path already treats a record as a claim,
// not a fact: publish checks the target's mount itself and drops a stale record of it;
// unpublish unmounts only what is mounted; the library collector keeps what a stale record
// references a little longer. Nothing is removed before it is confirmed unmounted, and a
// record stays durable before its mount exists.
func (d *Driver) Start(ctx context.Context) error {
	// The records without their attributes, which only diagnostics read (Records).
	records, keys, listErr := d.store.Index()
	if listErr != nil {
		// Unreadable records are left on disk for a person; everything else proceeds.
		d.log.Error("some state records cannot be read; they are left in place", "err", listErr)
	}
	// The overlay dirs records reference, by name in the overlays dir.
	referenced := make(map[string]bool, len(records))
	loaded := make([]*state.Record, 0, len(records))
	d.mu.Lock()
	if len(d.byTarget) == 0 {
		d.byTarget = make(map[string]*state.Record, len(records))
	}
	for i, rec := range records {
		// Records are read back from disk: untrusted input. One that is not what this
		// plugin writes is never acted on; its overlay dir, if it names one of ours, is kept
		// too.
		err := d.checkRecord(rec, keys[i])
		if rec.OverlayDir != "" {
			if err == nil {
				// Checked to be exactly <overlays>/<key>: its name, without allocating.
				referenced[rec.OverlayDir[len(d.overlaysDir)+1:]] = true
			} else if name, ok := d.overlayKey(rec.OverlayDir); ok {
				referenced[name] = true
			}
		}
		if err != nil {
			d.recordLog(rec).Error("state record is not one this plugin writes; left alone (was --kubelet-dir or --state-dir changed?)", "err", err)
			continue
		}
		d.byTarget[rec.TargetPath] = rec
		loaded = append(loaded, rec)
	}
	d.mu.Unlock()
	removed, err := d.removeOrphanOverlayDirs(referenced)
	if err != nil {
		return err
	}
	d.updatePublishedMetric()
	vctx, cancel := context.WithCancel(ctx)
	d.stopVerify = cancel
	d.ready.Store(true)
	d.log.Info("loaded state records; checking their targets against the mount table in the background", "records", len(loaded), "orphanOverlayDirsRemoved", removed)
	go func() {
		defer close(d.verified)
		defer cancel()
		d.verifyRecords(vctx, loaded)
	}()
	return nil
}

// Verified is closed once the background check that Start began is done (or stopped by its
// context or Close).
func (d *Driver) Verified() <-chan struct{} { return d.verified }

// updatePublishedMetric sets the published-volumes gauge from the index, counted in one pass.
func (d *Driver) updatePublishedMetric() {
	d.mu.Lock()
	defer d.mu.Unlock()
	var hostdir, library, preload int
	for _, r := range d.byTarget {
		switch r.Kind {
		case "hostdir":
			hostdir++
		case "library":
			library++
		case "preload":
			preload++
		}
	}
	d.metrics.published.WithLabelValues("hostdir").Set(float64(hostdir))
	d.metrics.published.WithLabelValues("library").Set(float64(library))
	d.metrics.published.WithLabelValues("preload").Set(float64(preload))
}

// verifyRecords keeps the records whose targets are mounted and drops the others (see Start).
func (d *Driver) verifyRecords(ctx context.Context, records []*state.Record) {
	// The pods dir is opened once: a target that the kernel reports as a mount root when
	// resolved from it is mounted (one statx per record on a node with thousands of
	// volumes); any other answer is confirmed with the full check, which never follows a
	// link, under the record's locks. A positive answer that came through a link would keep
	// the record, which the full check does too (a target it cannot reach is kept).
	pods, err := unix.Open(d.podsDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		pods = -1
	} else {
		defer unix.Close(pods)
	}
	// One record after the other: the check runs while the driver serves, and needs no more
	// than one CPU.
	var kept, dropped, gone int
	for i, rec := range records {
		if ctx.Err() != nil {
			d.log.Info("stopped checking state records against the mount table", "checked", i, "of", len(records))
			return
		}
		if d.surelyMounted(pods, rec) {
			kept++
			continue
		}
		switch d.verifyRecord(ctx, rec) {
		case recordKept:
			kept++
		case recordDropped:
			dropped++
		case recordChanged:
			gone++
		}
	}
	d.updatePublishedMetric()
	d.log.Info("reconciled state with the mount table", "kept", kept, "dropped", dropped, "changedMeanwhile", gone)
}

type verifyResult int

const (
	recordKept verifyResult = iota
	recordDropped
	recordChanged
)

// verifyRecord confirms, under the record's locks, whether the target of rec is mounted, and
// drops rec when it is not.
func (d *Driver) verifyRecord(ctx context.Context, rec *state.Record) verifyResult {
	unlock, err := d.locks.Lock(ctx, "volume/"+rec.VolumeID, "target/"+rec.TargetPath)
	if err != nil {
		return recordKept
	}
	defer unlock()
	if d.record(rec.TargetPath) != rec {
		// Unpublished or published afresh meanwhile: no longer this check's to judge.
		return recordChanged
	}
	mounted, err := d.isMounted(rec.TargetPath)
	if err != nil {
		// Unknown is treated as mounted: forgetting a live mount is worse than keeping a
		// record that a later unpublish removes.
		d.recordLog(rec).Error("cannot tell whether the target is mounted; keeping its record", "err", err)
		return recordKept
	}
	if mounted {
		return recordKept
	}
	if d.keepable(rec) {
		d.recordLog(rec).Info("keeping the writable layer of a volume that is no longer mounted, for kubelet to publish again; removed at unpublish or once its pod is gone")
		return recordKept
	}
	if err := d.release(rec); err != nil {
		d.recordLog(rec).Error("cannot drop the record of an unmounted target; keeping it", "err", err)
		return recordKept
	}
	d.recordLog(rec).Info("dropped the record of a volume that is no longer mounted")
	return recordDropped
}

// surelyMounted tells whether rec's target is surely a mount root (see
// mounter.SurelyMountRoot), checked from the pods dir. A record that is not of the target
// shape, or a pods dir that could not be opened (pods < 0), gives false.
func (d *Driver) surelyMounted(pods int, rec *state.Record) bool {
	if pods < 0 {
		return false
	}
	rel, ok := parseTarget(d.podsDir, rec.TargetPath)
	return ok && d.mounter.SurelyMountRoot(pods, rel+"/"+targetName)
}

// checkRecord validates a record read from the state dir: its target must be exactly of
// kubelet's CSI target shape under this plugin's pods dir, and its overlay dirs exactly
// <overlays>/<record key>/{upper,work}. key is the record's key as the store checked it when
// it read the record (state.Store.Index), or "" to compute it.
func (d *Driver) checkRecord(rec *state.Record, key string) error {
	if _, ok := parseTarget(d.podsDir, rec.TargetPath); !ok {
		return fmt.Errorf("target %q is not of the shape %s", rec.TargetPath, d.targetShape())
	}
	if rec.OverlayDir == "" && rec.UpperDir == "" && rec.WorkDir == "" {
		return nil
	}
	// Compared piece by piece, without allocating: start-up runs this for every record.
	dir, ok := strings.CutPrefix(rec.OverlayDir, d.overlaysDir)
	if ok = ok && len(dir) > 1 && dir[0] == '/'; ok && key != "" {
		ok = dir[1:] == key
	} else if ok {
		ok = rec.HasKey(dir[1:])
	}
	if upper, found := strings.CutPrefix(rec.UpperDir, rec.OverlayDir); !ok || !found || upper != "/upper" {
		ok = false
	}
	if work, found := strings.CutPrefix(rec.WorkDir, rec.OverlayDir); !ok || !found || work != "/work" {
		ok = false
	}
	if !ok {
		want := d.overlaysDir + "/" + rec.Key()
		return fmt.Errorf("overlay dir %q (upper %q, work %q) is not this record's %s", rec.OverlayDir, rec.UpperDir, rec.WorkDir, want)
	}
	return nil
}

// recordLog is the logger for messages about rec.
func (d *Driver) recordLog(rec *state.Record) *slog.Logger {
	return d.log.With("volumeID", rec.VolumeID, "targetPath", rec.TargetPath, "volumeType", rec.Type)
}

// removeOrphanOverlayDirs removes overlay dirs that no kept record references, unless a mounted
// overlay still uses one as its upper or work dir (its record was lost; removing the dir under
// a live mount would corrupt it).
//
// The mount table is read only when some dir is not referenced by a record: a node with
// thousands of volumes and nothing orphaned does not parse thousands of mount entries.
func (d *Driver) removeOrphanOverlayDirs(referenced map[string]bool) (int, error) {
	orphans, err := unreferencedEntries(d.overlaysDir, referenced)
	if err != nil {
		return 0, fmt.Errorf("reconcile: %w", err)
	}
	if len(orphans) == 0 {
		return 0, nil
	}
	table, err := d.mounter.MountTable()
	if err != nil {
		return 0, fmt.Errorf("reconcile: %w", err)
	}
	for _, e := range table {
		for _, key := range []string{"upperdir", "workdir"} {
			if v, ok := e.Option(key); ok {
				if name, ok := d.overlayKey(filepath.Dir(v)); ok {
					referenced[name] = true
				}
			}
		}
	}
	removed := 0
	var errs []error
	for _, name := range orphans {
		if referenced[name] {
			continue
		}
		if err := d.writable.Release(filepath.Join(d.overlaysDir, name)); err != nil {
			errs = append(errs, err)
			continue
		}
		removed++
	}
	return removed, errors.Join(errs...)
}

// unreferencedEntries returns the names in dir that referenced does not hold. The dir is read
// with getdents(2) into one buffer, and a name is made a string only when it is returned:
// start-up runs this over one entry per writable volume.
func unreferencedEntries(dir string, referenced map[string]bool) ([]string, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(fd)
	var out []string
	buf := make([]byte, 32<<10)
	for {
		n, err := unix.Getdents(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &os.PathError{Op: "getdents", Path: dir, Err: err}
		}
		if n <= 0 {
			return out, nil
		}
		// struct linux_dirent64: ino (8 bytes), off (8), reclen (2), type (1), name
		// (NUL-terminated).
		for b := buf[:n]; len(b) >= 19; {
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen < 19 || reclen > len(b) {
				return nil, &os.PathError{Op: "getdents", Path: dir, Err: errors.New("malformed directory entry")}
			}
			name := b[19:reclen]
			if i := bytes.IndexByte(name, 0); i >= 0 {
				name = name[:i]
			}
			b = b[reclen:]
			if string(name) == "." || string(name) == ".." || referenced[string(name)] {
				continue
			}
			out = append(out, string(name))
		}
	}
}

// Records returns a copy of the published targets' records, for diagnostics and tests. The
// records Start loaded are kept without their attributes (nothing else reads them); their
// copies get them from the state journal.
func (d *Driver) Records() []state.Record {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]state.Record, 0, len(d.byTarget))
	for _, r := range d.byTarget {
		c := *r
		if c.Attributes == nil {
			if disk, ok, err := d.store.Get(r.VolumeID, r.TargetPath); err == nil && ok && disk.Created.Equal(r.Created) {
				c.Attributes = disk.Attributes
			}
		}
		out = append(out, c)
	}
	return out
}
