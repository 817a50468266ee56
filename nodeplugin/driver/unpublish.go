package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/state"
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
	if _, ok := parseTarget(d.podsDir, target); !ok {
		d.log.Warn("unpublish of a path that is not a kubelet CSI volume target; nothing done", "volume", req.GetVolumeId(), "target", target, "want", d.targetShape())
		return &csi.NodeUnpublishVolumeResponse{}, nil
	}
	unlock, err := d.locks.lock(ctx, "volume/"+req.GetVolumeId(), "target/"+target)
	if err != nil {
		return nil, status.FromContextError(err).Err()
	}
	defer unlock()

	log := d.log.With("volume", req.GetVolumeId(), "target", target)
	rec := d.record(target)
	if rec != nil {
		kind = rec.Kind
		log = log.With("type", rec.Type)
		if rec.Pod.Name != "" {
			log = log.With("pod", rec.Pod.Namespace+"/"+rec.Pod.Name)
		}
		if rec.VolumeID != req.GetVolumeId() {
			// The target holds another volume: unmounting it would break that one.
			log.Warn("unpublish of a volume that is not the one published at this target; nothing done", "publishedVolume", rec.VolumeID)
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
		log.Warn("the target leads through a symbolic link or a non-directory below the kubelet pods dir; nothing done", "error", err)
		return &csi.NodeUnpublishVolumeResponse{}, nil
	}
	if err != nil {
		log.Warn("unpublish failed", "error", err)
		return nil, status.Errorf(codes.Internal, "unpublishing %s: %v", target, err)
	}
	log.Info("unpublished")
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// release undoes a publish: unmounts the target if it is still mounted, removes the target, the
// overlay dirs and the record. Each step tolerates having been done already. The target is
// reached from the pods dir without following links; one that now leads through a link is
// left alone, with its record (errTargetLink).
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
		return err
	}
	return d.deleteRecord(rec)
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
