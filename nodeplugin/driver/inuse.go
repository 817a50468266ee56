package driver

import (
	"errors"
	"fmt"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
)

// LibrariesInUse returns everything the library cache's garbage collector must keep, in one
// set: every layer dir (absolute path) and image digest ("sha256:...") referenced by a state
// record or by a publish in progress, and every path the mount table keeps in use (the lower
// dirs of every overlay, the source of every bind mount: mounter.ReferencedPaths). Records
// say what should be mounted and add what the table cannot show (a digest, a publish whose
// mount does not exist yet); the table says what is, whatever the records lost. It fails
// until the startup reconcile has run, and when the mount table cannot be read, so that a
// collector never acts on a partial view.
func (d *Driver) LibrariesInUse() (library.InUse, error) {
	if !d.Ready() {
		return nil, errors.New("the node plugin has not reconciled its state yet")
	}
	inUse := library.InUse{}
	d.mu.Lock()
	for _, rec := range d.byTarget {
		for _, k := range layerKeys(rec.Layers) {
			inUse.Add(k)
		}
	}
	for k := range d.inFlight {
		inUse.Add(k)
	}
	d.mu.Unlock()
	table, err := d.mounter.MountTable()
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	for _, p := range mounter.ReferencedPaths(table) {
		inUse.Add(p)
	}
	return inUse, nil
}
