package driver

import (
	"github.com/apm-csi/apm-csi/nodeplugin/state"
)

// The record index: the records on disk (state.Store), mirrored in memory by target path under
// d.mu, and the layers of publishes in flight. It is what the library cache's collector must
// keep (LibrariesInUse) and what the published-volumes gauge counts.

// record returns the record of target, if any.
func (d *Driver) record(target string) *state.Record {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.byTarget[target]
}

// putRecord writes rec to disk, then to the index.
func (d *Driver) putRecord(rec *state.Record) error {
	if err := d.store.Put(rec); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.byTarget[rec.TargetPath] = rec
	d.metrics.published.WithLabelValues(rec.Kind).Set(float64(d.countKind(rec.Kind)))
	return nil
}

// deleteRecord removes rec from disk, then from the index.
func (d *Driver) deleteRecord(rec *state.Record) error {
	if err := d.store.Delete(rec.Key()); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if cur := d.byTarget[rec.TargetPath]; cur != nil && cur.VolumeID == rec.VolumeID {
		delete(d.byTarget, rec.TargetPath)
	}
	d.metrics.published.WithLabelValues(rec.Kind).Set(float64(d.countKind(rec.Kind)))
	return nil
}

// countKind must be called with d.mu held.
func (d *Driver) countKind(kind string) int {
	n := 0
	for _, r := range d.byTarget {
		if r.Kind == kind {
			n++
		}
	}
	return n
}

// holdLayers marks layers as about to be mounted until the returned release is called.
func (d *Driver) holdLayers(layers []state.Layer) (release func()) {
	keys := layerKeys(layers)
	d.mu.Lock()
	for _, k := range keys {
		d.inFlight[k]++
	}
	d.mu.Unlock()
	return func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, k := range keys {
			if d.inFlight[k]--; d.inFlight[k] <= 0 {
				delete(d.inFlight, k)
			}
		}
	}
}

func layerKeys(layers []state.Layer) []string {
	var keys []string
	for _, l := range layers {
		keys = append(keys, l.Dir)
		if l.Digest != "" {
			keys = append(keys, l.Digest)
		}
	}
	return keys
}
