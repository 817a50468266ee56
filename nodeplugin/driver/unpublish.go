package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// NodeUnpublishVolume implements csi.NodeServer: unmount, remove the target, free the overlay
// dirs and the record. A target that was never published, or is already gone, is OK. So is a
// target that is not this plugin's to touch: not of kubelet's CSI target shape, or leading
// through a symbolic link below the pods dir; it is left exactly as it is (and logged), so
// that kubelet does not retry forever.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (_ *csi.NodeUnpublishVolumeResponse, err error) {
	start := time.Now()
	kind := kindUnknown
	defer func() { d.metrics.observe(opUnpublish, kind, start, err) }()

	if req.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is missing")
	}
	target := req.GetTargetPath()
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "target_path is missing")
	}
	call := callLogFrom(ctx)
	if _, ok := parseTarget(d.podsDir, target); !ok {
		call.add("nothingDone", "not a kubelet CSI volume target", "want", d.targetShape())
		call.atLeast(slog.LevelWarn)
		return &csi.NodeUnpublishVolumeResponse{}, nil
	}
	unlock, err := d.locks.Lock(ctx, "volume/"+req.GetVolumeId(), "target/"+target)
	if err != nil {
		return nil, status.FromContextError(err).Err()
	}
	defer unlock()

	rec := d.record(target)
	if rec != nil {
		kind = rec.Kind
		call.add("volumeType", rec.Type)
		call.add(podLogAttrs(rec.Pod.Namespace, rec.Pod.Name, rec.Pod.UID)...)
		if spec, err := volumeattrs.Parse(rec.Attributes); err == nil {
			call.addLibraries(spec)
		}
		if rec.VolumeID != req.GetVolumeId() {
			// The target holds another volume: unmounting it would break that one.
			call.add("nothingDone", "another volume is published at this target", "publishedVolumeID", rec.VolumeID)
			call.atLeast(slog.LevelWarn)
			return &csi.NodeUnpublishVolumeResponse{}, nil
		}
		err = d.release(rec)
	} else {
		// No record (never published, already unpublished, or state lost): the target is still
		// kubelet's to clean, so unmount whatever is there and remove it.
		var dir int
		dir, err = d.openTargetDir(target, false)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			err = nil
		case err != nil:
		default:
			err = d.unmountAll(dir, target)
			if err == nil {
				err = d.removeTarget(dir, target)
			}
			unix.Close(dir)
		}
	}
	if errors.Is(err, errTargetLink) {
		call.add("nothingDone", "the target leads through a symbolic link or a non-directory below the kubelet pods dir")
		call.atLeast(slog.LevelWarn)
		return &csi.NodeUnpublishVolumeResponse{}, nil
	}
	if err != nil {
		// Every error of the release names the target.
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// release undoes a publish: unmounts the target if it is still mounted, removes the target, the
// overlay dirs and the record. Each step tolerates having been done already. The target is
// reached from the pods dir without following links; one that now leads through a link is
// left alone, with its record (errTargetLink). Every error names the target once.
func (d *Driver) release(rec *state.Record) error {
	dir, err := d.openTargetDir(rec.TargetPath, false)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// Neither the volume dir nor the target exists: nothing is mounted there.
	case err != nil:
		return err
	default:
		defer unix.Close(dir)
		if err := d.unmountAll(dir, rec.TargetPath); err != nil {
			return err
		}
		if err := d.removeTarget(dir, rec.TargetPath); err != nil {
			return err
		}
	}
	if err := d.removeOverlayDir(rec.OverlayDir); err != nil {
		return fmt.Errorf("releasing the writable layer of %s: %w", rec.TargetPath, err)
	}
	if err := d.deleteRecord(rec); err != nil {
		return fmt.Errorf("dropping the record of %s: %w", rec.TargetPath, err)
	}
	return nil
}

// overlayKey returns the name of dir in the overlays dir, if dir is exactly
// <overlays>/<name> with a plain name.
func (d *Driver) overlayKey(dir string) (string, bool) {
	name, ok := strings.CutPrefix(dir, d.overlaysDir+"/")
	if !ok || name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return "", false
	}
	return name, true
}

// removeOverlayDir removes a record's private upper/work dirs and frees their size limit. Only
// a direct child of the plugin's overlays dir is ever removed, through a handle on the overlays
// dir (writablelayer.Release uses os.Root: the removal cannot leave it, and follows no link).
func (d *Driver) removeOverlayDir(dir string) error {
	if dir == "" {
		return nil
	}
	name, ok := d.overlayKey(dir)
	if !ok {
		return fmt.Errorf("refusing to remove %s: not an overlay dir of this plugin", dir)
	}
	return d.writable.Release(filepath.Join(d.overlaysDir, name))
}
