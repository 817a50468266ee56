package driver

import (
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// OverlaysDir is the directory under the state dir that holds every writable library volume's
// upper and work dirs, one dir per published target.
func OverlaysDir(stateDir string) string { return state.OverlaysDir(stateDir) }

// writableLimit returns the size of a library volume's writable layer: its writableLimit
// attribute, within the node's maximum, or the node's default. It is checked for read-only
// volumes too, so that a request is accepted or refused the same way whatever its mode.
func (d *Driver) writableLimit(r *publishRequest) (int64, error) {
	asked := r.spec.WritableLimit
	if asked == 0 {
		return d.cfg.DefaultWritableLimit, nil
	}
	if maxLimit := d.cfg.MaxWritableLimit; asked > maxLimit {
		return 0, status.Errorf(codes.InvalidArgument,
			"volume attribute %q asks for a writable layer of %s (%d bytes), above this node's maximum of %s (%d bytes); ask for at most that, or have the node administrator raise the node plugin flag --max-writable-layer",
			volumeattrs.KeyWritableLimit, writablelayer.FormatBytes(asked), asked, writablelayer.FormatBytes(maxLimit), maxLimit)
	}
	return asked, nil
}
