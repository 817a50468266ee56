package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// errNoLibraryStore is what library and preload volumes get on a node plugin started without
// its library cache.
var errNoLibraryStore = status.Error(codes.FailedPrecondition, "library cache not configured: this node plugin serves hostdir volumes only, so library and preload volumes cannot be published on this node")

// publishHostDir bind-mounts an allowlisted host directory or file.
func (d *Driver) publishHostDir(r *publishRequest) error {
	name, via := r.spec.HostDir, ""
	if name == "" {
		// A Datadog socket type: the administrator maps it to an entry. Every message below
		// names the entry: via says only where the mapping is set.
		name = d.cfg.DatadogSockets[r.spec.Type]
		via = fmt.Sprintf("volume type %s (mapped to its hostdir entry by --datadog-socket-entry): ", r.spec.Type)
	}
	entry, err := d.cfg.HostDirs.Lookup(name)
	if err != nil {
		return status.Error(codes.InvalidArgument, via+err.Error())
	}
	if err := d.authorizeHostDir(r, entry, via); err != nil {
		return err
	}
	if entry.ReadOnly && r.attrs[volumeattrs.KeyReadOnly] == "false" {
		return status.Errorf(codes.InvalidArgument, "%shostdir entry %q is read-only on this node and the volume asks for readOnly: \"false\"; drop that attribute or use a writable entry (%s)", via, name, d.describeWritableEntries())
	}
	readOnly := r.readOnly || entry.ReadOnly
	if readOnly {
		what := fmt.Sprintf("%sthe volume asks for hostdir entry %q read-only", via, name)
		if entry.ReadOnly {
			what = fmt.Sprintf("%shostdir entry %q is read-only on this node", via, name)
		}
		if err := requirePodReadOnly(r, what); err != nil {
			return err
		}
	}

	src := d.sources.Get(name)
	if src == nil {
		return status.Errorf(codes.Internal, "%shostdir %q was not resolved at start", via, name)
	}
	fd, mode, err := src.Open()
	switch {
	case errors.Is(err, hostdir.ErrSourceMissing), errors.Is(err, hostdir.ErrSourceChanged), errors.Is(err, hostdir.ErrSourceKind):
		return status.Errorf(codes.FailedPrecondition, "%s%v", via, err)
	case err != nil:
		return status.Errorf(codes.Internal, "%s%v", via, err)
	}
	defer unix.Close(fd)
	rec := r.newRecord(d.cfg.Now())
	rec.HostDir = name
	rec.Source = src.Resolved
	rec.TargetIsFile = !mode.IsDir()
	rec.ReadOnly = readOnly
	return d.mountWithRecord(r, rec, func() error {
		return d.mounter.BindFrom(fd, r.dir, targetName, readOnly)
	})
}

// requirePodReadOnly refuses a volume that would be served as a read-only bind mount of host
// or shared data unless the pod's CSI volume source says readOnly: true. A bind mount is only
// read-only through its per-mount flag: a container runtime that bind-mounts the target into a
// container whose volumeMount is not readOnly (runc 1.2 and newer) remounts that new bind
// read-write, and the container could then write into the host directory or the library store
// other pods load from. With readOnly: true kubelet mounts the volume read-only into every
// container. The code is FailedPrecondition, the CSI code for a capability the volume does not
// support: the volume cannot be offered writable. why says why the volume is read-only; the
// message does not name the volume, which kubelet's event about the failed mount does.
func requirePodReadOnly(r *publishRequest, why string) error {
	if r.podReadOnly {
		return nil
	}
	return status.Errorf(codes.FailedPrecondition, "%s, and container runtimes re-enable writes on a read-only bind mount unless the pod's CSI volume is readOnly; set readOnly: true under the pod's csi: volume source (volumes[].csi.readOnly; for a persistent volume, readOnly: true on the pod's persistentVolumeClaim volume), then recreate the pod", why)
}

// bindPath bind-mounts a path of the library store (a layer dir, a generated file) onto the
// target. The store is the plugin's own; the last component is still not followed if it is a
// link.
func (d *Driver) bindPath(r *publishRequest, source string, readOnly bool) error {
	fd, err := unix.Open(source, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", source, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", source, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		return fmt.Errorf("library store path %s is a symbolic link; refusing to mount it", source)
	}
	return d.mounter.BindFrom(fd, r.dir, targetName, readOnly)
}

// describeEntries lists the declared entries with their modes, for error messages.
func (d *Driver) describeEntries() string {
	names := d.cfg.HostDirs.Names()
	if len(names) == 0 {
		return "no hostdir entries are declared on this node"
	}
	var parts []string
	for _, n := range names {
		e, _ := d.cfg.HostDirs.Lookup(n)
		mode := "writable"
		if e.ReadOnly {
			mode = "read-only"
		}
		parts = append(parts, n+" ("+mode+")")
	}
	return "declared entries: " + strings.Join(parts, ", ")
}

// describeWritableEntries lists the declared writable entries, for the message of a volume that
// asks a read-only entry for writes.
func (d *Driver) describeWritableEntries() string {
	var names []string
	for _, n := range d.cfg.HostDirs.Names() {
		if e, _ := d.cfg.HostDirs.Lookup(n); !e.ReadOnly {
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return "no writable hostdir entries are declared on this node"
	}
	return "writable entries: " + strings.Join(names, ", ")
}

// publishLibrary composes the volume's layers into one mount: a writable overlay with a private
// upper dir by default, or a read-only overlay without one. A read-only overlay's superblock is
// read-only, so no remount of a bind of it makes it writable. A single layer gets the plugin's
// empty dir as a second lower dir (overlayfs needs two lower dirs when it has no upper dir)
// rather than a bind mount of the shared layer, which a container runtime could remount
// read-write.
func (d *Driver) publishLibrary(ctx context.Context, r *publishRequest) error {
	if d.cfg.Libraries == nil {
		return errNoLibraryStore
	}
	limit, err := d.writableLimit(r)
	if err != nil {
		return err
	}

	layers, err := d.resolveLayers(ctx, r.spec, r.attrs[attrPodNamespace])
	if err != nil {
		return err
	}
	release := d.holdLayers(layers)
	defer release()

	rec := r.newRecord(d.cfg.Now())
	rec.Layers = layers
	var lower []string
	for _, l := range layers {
		lower = append(lower, l.Dir)
	}
	if r.readOnly {
		if len(lower) == 1 {
			lower = append(lower, d.emptyDir)
		}
		return d.mountWithRecord(r, rec, func() error {
			return d.mounter.OverlayAt(r.dir, targetName, mounter.Overlay{Lower: lower})
		})
	}
	rec.OverlayDir = filepath.Join(d.overlaysDir, rec.Key())
	rec.UpperDir, rec.WorkDir = writablelayer.Paths(rec.OverlayDir)
	rec.WritableLimit, rec.WritableLayer = limit, string(d.writable.Mechanism())
	resume := r.resume != nil && r.resume.OverlayDir == rec.OverlayDir
	return d.mountWithRecord(r, rec, func() error {
		if resume {
			// The kept upper dir, with a fresh work dir and the limit set again. A record
			// whose layer was never made (a crash between record and mount) gets a new one.
			err := d.writable.Resume(rec.OverlayDir, limit)
			if errors.Is(err, fs.ErrNotExist) {
				resume = false
			} else if err != nil {
				return fmt.Errorf("resuming the kept writable layer: %w", err)
			}
		}
		if !resume {
			if err := d.writable.Prepare(rec.OverlayDir, limit); err != nil {
				// A world-writable upper dir (the volume's root, like an emptyDir) and a
				// work dir, together bounded by the limit.
				return fmt.Errorf("preparing the writable layer: %w", err)
			}
		}
		return d.writable.Mount(func() error {
			return d.mounter.OverlayAt(r.dir, targetName, mounter.Overlay{Lower: lower, Upper: rec.UpperDir, Work: rec.WorkDir, Volatile: d.volatileUpper()})
		})
	})
}

// resolveLayers asks the library store for every layer, top first, within the publish budget.
// The libraries of a volume are resolved and downloaded concurrently (the store bounds
// downloads node-wide with its download slots); the first final error (not found, not
// allowed, rejected, ...) cancels the others and is what the publish returns. A retryable
// error (Unavailable) is returned only when no library failed for good.
func (d *Driver) resolveLayers(ctx context.Context, spec *volumeattrs.Spec, namespace string) ([]state.Layer, error) {
	var layers []state.Layer
	if spec.Preload != "" {
		dir, err := d.cfg.Libraries.GeneratedFiles(map[string]string{volumeattrs.PreloadFile: spec.Preload + "\n"})
		if err != nil {
			return nil, status.Errorf(codes.Internal, "generating the ld.so.preload file: %v", err)
		}
		layers = append(layers, state.Layer{Dir: dir})
	}
	budget, cancel := context.WithTimeout(ctx, d.cfg.PublishDownloadBudget)
	defer cancel()
	libs := make([]state.Layer, len(spec.Libraries))
	retryable := make([]error, len(spec.Libraries))
	g, gctx := errgroup.WithContext(budget)
	for i, lib := range spec.Libraries {
		g.Go(func() error {
			l, err := d.cfg.Libraries.LayerFor(gctx, namespace, lib)
			if err != nil {
				if gctx.Err() != nil && budget.Err() == nil {
					// Cancelled because another library failed for good.
					return nil
				}
				serr := d.libraryError(ctx, lib.Image, err)
				if !finalLibraryError(serr) {
					retryable[i] = serr
					return nil
				}
				return serr
			}
			if !filepath.IsAbs(l.Dir) {
				return status.Errorf(codes.Internal, "library cache returned a relative layer dir %q for %s", l.Dir, lib.Image)
			}
			libs[i] = state.Layer(l)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	for _, err := range retryable {
		if err != nil {
			return nil, err
		}
	}
	return append(layers, libs...), nil
}

// finalLibraryError reports whether a mapped library error would fail the publish again on a
// retry: everything but Unavailable (still downloading, registry down, slots busy, budget
// spent) and the caller's own cancellation.
func finalLibraryError(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.Canceled, codes.DeadlineExceeded:
		return false
	}
	return true
}

// libraryError maps a library store error to the gRPC code kubelet acts on. Unavailable is
// non-final: kubelet retries the publish, by which time a background download may be done.
// The message says each fact once: this frame names the image and, for the codes kubelet
// retries, says so; the store's error (never a registry's words) says what failed and what
// to fix, without naming the image again or promising a retry.
func (d *Driver) libraryError(ctx context.Context, image string, err error) error {
	const retries = "; kubelet retries the mount"
	switch {
	case errors.Is(err, library.ErrDownloadInProgress):
		return status.Errorf(codes.Unavailable, "library image %s is still downloading on this node: %v"+retries, image, err)
	case errors.Is(err, library.ErrRegistryUnavailable):
		return status.Errorf(codes.Unavailable, "library image %s cannot be pulled now: %v"+retries, image, err)
	case errors.Is(err, library.ErrDownloadSlotsBusy):
		return status.Errorf(codes.Unavailable, "library image %s waits for a download slot on this node: %v"+retries, image, err)
	case errors.Is(err, library.ErrCacheFull):
		return status.Errorf(codes.ResourceExhausted, "library image %s cannot be stored on this node: %v"+retries, image, err)
	case errors.Is(err, library.ErrImageNotFound):
		return status.Errorf(codes.NotFound, "library image %s does not exist in its registry: %v", image, err)
	case errors.Is(err, library.ErrImageRejected):
		return status.Errorf(codes.FailedPrecondition, "library image %s cannot be served: %v", image, err)
	case errors.Is(err, library.ErrImageNotAllowed):
		return status.Errorf(codes.PermissionDenied, "library image %s is not served by this node: %v", image, err)
	case ctx.Err() != nil:
		return status.FromContextError(ctx.Err()).Err()
	case errors.Is(err, context.DeadlineExceeded):
		return status.Errorf(codes.Unavailable, "library image %s was not ready within the publish budget of %s"+retries, image, d.cfg.PublishDownloadBudget)
	}
	return status.Errorf(codes.Internal, "library image %s: %v", image, err)
}

// publishPreload bind-mounts the generated ld.so.preload file read-only onto a file target (the
// pod mounts the volume at /etc/ld.so.preload, as with Datadog's DatadogInjectorPreload). A
// single file cannot be an overlay, and the file lies in the library store other pods share,
// so the pod's CSI volume must be readOnly.
func (d *Driver) publishPreload(r *publishRequest) error {
	if d.cfg.Libraries == nil {
		return errNoLibraryStore
	}
	if err := requirePodReadOnly(r, "the preload file (type "+r.spec.Type+") is always read-only"); err != nil {
		return err
	}
	dir, err := d.cfg.Libraries.GeneratedFiles(map[string]string{volumeattrs.PreloadFile: r.spec.Preload + "\n"})
	if err != nil {
		return status.Errorf(codes.Internal, "generating the ld.so.preload file: %v", err)
	}
	layers := []state.Layer{{Dir: dir}}
	release := d.holdLayers(layers)
	defer release()

	rec := r.newRecord(d.cfg.Now())
	rec.Layers = layers
	rec.Source = filepath.Join(dir, volumeattrs.PreloadFile)
	rec.TargetIsFile = true
	rec.ReadOnly = true
	return d.mountWithRecord(r, rec, func() error {
		return d.bindPath(r, rec.Source, true)
	})
}

// volatileUpper reports whether writable overlays skip syncing their upper dir's filesystem.
// A project-quota upper dir lies on the state dir's filesystem, and unmounting a non-volatile
// overlay writes that whole filesystem back, so every unpublish would wait for whatever else
// writes to the disk. The upper dir is removed at unpublish, and a record whose target is not
// mounted after a crash or reboot has its dir removed by the reconcile, so what volatile
// gives up (an upper dir that is consistent after a crash) is never used. A tmpfs upper dir
// has nothing to write back: volatile would change nothing there.
//
// With KeepWritableLayers an upper dir is mounted again after a reboot, so it must be
// consistent: not volatile, and every unpublish pays the sync (docs/node-plugin.md).
func (d *Driver) volatileUpper() bool {
	return d.writable.Mechanism() == writablelayer.ProjectQuota && !d.cfg.KeepWritableLayers
}
