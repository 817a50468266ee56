package driver

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// Attributes kubelet adds when the CSIDriver object has podInfoOnMount: true.
const (
	attrPodName      = "csi.storage.k8s.io/pod.name"
	attrPodNamespace = "csi.storage.k8s.io/pod.namespace"
	attrPodUID       = "csi.storage.k8s.io/pod.uid"
	attrEphemeral    = "csi.storage.k8s.io/ephemeral"
	attrTokens       = "csi.storage.k8s.io/serviceAccount.tokens" //nolint:gosec // G101: the name of the attribute kubelet passes tokens in, not a credential
)

// maxStackedMounts bounds how many mounts unpublish peels off one target. Only a buggy older
// publish could stack more than one; the bound keeps a pathological target from looping forever.
const maxStackedMounts = 1024

// NodeGetInfo implements csi.NodeServer.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.cfg.NodeID}, nil
}

// NodeGetCapabilities implements csi.NodeServer. Volumes are published directly: there is no
// device to stage, no capacity to report and nothing to expand.
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

// publishRequest is a validated NodePublishVolume request.
type publishRequest struct {
	volumeID string
	target   string
	spec     *volumeattrs.Spec
	attrs    map[string]string
	readOnly bool
	// podReadOnly is the CSI readonly flag: kubelet sets it when the pod's CSI volume source
	// has readOnly: true, and then mounts the volume read-only into every container.
	podReadOnly bool
	// call is the call's log record (callLog), for what only the handler learns.
	call *callLog
	// dir is the target's volume dir, opened from the pods dir without following links;
	// every step of the publish works relative to it.
	dir int
	// resume is the stale record whose kept writable layer this publish mounts again.
	resume *state.Record
}

// NodePublishVolume implements csi.NodeServer. It is idempotent: a repeated call for a target
// that already holds this volume returns OK without mounting again (kubelet repeats every
// publish after it restarts).
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (_ *csi.NodePublishVolumeResponse, err error) {
	start := time.Now()
	kind := kindUnknown
	defer func() { d.metrics.observe(opPublish, kind, start, err) }()

	r, err := d.validatePublish(req, callLogFrom(ctx))
	if err != nil {
		return nil, err
	}
	kind = string(r.spec.Kind)
	if !d.Ready() {
		return nil, status.Error(codes.Unavailable, "the node plugin is starting (reconciling its state with the mount table); kubelet will retry")
	}
	unlock, err := d.locks.Lock(ctx, "volume/"+r.volumeID, "target/"+r.target)
	if err != nil {
		return nil, status.FromContextError(err).Err()
	}
	defer unlock()

	r.dir, err = d.openTargetDir(r.target, true)
	if err != nil {
		return nil, targetDirError(r.target, err)
	}
	defer unix.Close(r.dir)

	done, err := d.checkExisting(r)
	if err != nil || done {
		return &csi.NodePublishVolumeResponse{}, err
	}

	switch r.spec.Kind {
	case volumeattrs.KindHostDir:
		err = d.publishHostDir(r)
	case volumeattrs.KindLibrary:
		err = d.publishLibrary(ctx, r)
	case volumeattrs.KindPreload:
		err = d.publishPreload(r)
	default:
		err = status.Errorf(codes.InvalidArgument, "volume kind %q is not served by this node plugin", r.spec.Kind)
	}
	if err != nil {
		return nil, err
	}
	r.call.add("readOnly", r.readOnly)
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *Driver) validatePublish(req *csi.NodePublishVolumeRequest, call *callLog) (*publishRequest, error) {
	if req.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is missing")
	}
	target, err := d.checkTarget(req.GetTargetPath())
	if err != nil {
		return nil, err
	}
	vc := req.GetVolumeCapability()
	if vc == nil {
		return nil, status.Error(codes.InvalidArgument, "volume_capability is missing")
	}
	if vc.GetBlock() != nil {
		return nil, status.Error(codes.InvalidArgument, "block volumes are not supported: apm-csi serves filesystem volumes only (volumeMode: Filesystem)")
	}
	if vc.GetMount() == nil {
		return nil, status.Error(codes.InvalidArgument, "volume_capability needs access_type mount")
	}
	attrs := req.GetVolumeContext()
	spec, err := volumeattrs.Parse(attrs)
	if err != nil {
		msg := err.Error()
		if ae := (*volumeattrs.Error)(nil); errors.As(err, &ae) && ae.Key == volumeattrs.KeyName {
			msg += "; " + d.describeEntries()
		}
		return nil, status.Error(codes.InvalidArgument, msg)
	}
	mode := vc.GetAccessMode().GetMode()
	readOnly := req.GetReadonly() || spec.ReadOnly ||
		mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY ||
		mode == csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY
	call.add("volumeType", spec.Type)
	call.addLibraries(spec)
	return &publishRequest{volumeID: req.GetVolumeId(), target: target, spec: spec, attrs: attrs, readOnly: readOnly, podReadOnly: req.GetReadonly(), call: call}, nil
}

// checkExisting handles a target that already has a record or a mount. done means the volume is
// already published there and nothing is left to do.
func (d *Driver) checkExisting(r *publishRequest) (done bool, err error) {
	mounted, err := d.isMountedAt(r.dir)
	if err != nil {
		return false, status.Errorf(codes.Internal, "checking whether %s is mounted: %v", r.target, err)
	}
	rec := d.record(r.target)
	switch {
	case rec == nil && mounted:
		return false, status.Errorf(codes.AlreadyExists, "target %s is already a mount point that this plugin has no record of; unmount it or let kubelet unpublish it first", r.target)
	case rec == nil:
		return false, nil
	case rec.VolumeID != r.volumeID && mounted:
		return false, status.Errorf(codes.AlreadyExists, "target %s already holds volume %q, not %q", r.target, rec.VolumeID, r.volumeID)
	case mounted && r.readOnly && !rec.ReadOnly:
		// The reverse (writable asked, read-only mounted) is how read-only hostdir entries
		// and preload files are always served, so only this direction is a conflict.
		return false, status.Errorf(codes.AlreadyExists, "volume %q is already published writable at %s; this request asks for a read-only mount", r.volumeID, r.target)
	case mounted:
		r.call.add("alreadyPublished", true)
		return true, nil
	}
	// A record without a mount: a publish that crashed half-way, a mount someone removed, or
	// a node reboot. A kept writable layer of this very volume is mounted again (keep.go);
	// otherwise free what the record held and publish afresh.
	if d.canResume(r, rec) {
		r.call.add("resumesKeptLayer", true)
		r.resume = rec
		return false, nil
	}
	r.call.add("droppedStaleRecordOf", rec.VolumeID)
	if err := d.release(rec); err != nil {
		// err names the target.
		return false, status.Errorf(codes.Internal, "cleaning up a stale publish: %v", err)
	}
	return false, nil
}

// newRecord starts the record of a publish made at now.
func (r *publishRequest) newRecord(now time.Time) *state.Record {
	return &state.Record{
		VolumeID:   r.volumeID,
		TargetPath: r.target,
		Kind:       string(r.spec.Kind),
		Type:       r.spec.Type,
		Attributes: redactAttributes(r.attrs),
		Pod:        state.Pod{Namespace: r.attrs[attrPodNamespace], Name: r.attrs[attrPodName], UID: r.attrs[attrPodUID]},
		Ephemeral:  r.attrs[attrEphemeral] == "true",
		ReadOnly:   r.readOnly,
		Created:    now.UTC(),
	}
}

// mountWithRecord is the common tail of every publish: write the record, create the target,
// mount, and on any failure undo all of it, so that nothing leaks when kubelet never calls
// again.
func (d *Driver) mountWithRecord(r *publishRequest, rec *state.Record, mount func() error) error {
	if err := d.putRecord(rec); err != nil {
		return status.Errorf(codes.Internal, "recording the publish of %s: %v", r.target, err)
	}
	err := prepareTarget(r.dir, rec.TargetPath, rec.TargetIsFile)
	if err == nil {
		err = mount()
	}
	if err == nil {
		return nil
	}
	if cleanupErr := d.release(rec); cleanupErr != nil {
		// What the failed publish allocated may be left behind: the call logs at error level.
		r.call.add("cleanupErr", cleanupErr.Error())
		r.call.atLeast(slog.LevelError)
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	// kubelet's event names the volume; the target says where on the node.
	return status.Errorf(codes.Internal, "mounting at %s: %v", r.target, err)
}

// redactAttributes drops kubelet's service account tokens and masks anything else that looks
// like a secret, for logs and state records.
func redactAttributes(attrs map[string]string) map[string]string {
	out := volumeattrs.Redact(attrs)
	delete(out, attrTokens)
	return out
}
