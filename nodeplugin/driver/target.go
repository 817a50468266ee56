package driver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/fdpath"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
)

// Every target kubelet passes, for inline volumes and PersistentVolumes alike, is
// <kubelet-dir>/pods/<pod-uid>/volumes/kubernetes.io~csi/<volume>/mount: kubelet's CSI volume
// plugin puts a pod's volume in the pod's volume dir for the plugin "kubernetes.io/csi"
// (escaped "kubernetes.io~csi"), named after the volume (the pod's volume name, or the PV
// name), and publishes at "mount" inside it.
const (
	targetVolumes   = "volumes"
	targetPluginDir = "kubernetes.io~csi"
	targetName      = "mount"
)

// targetShape describes the accepted target paths, for error messages.
func (d *Driver) targetShape() string {
	return d.podsDir + "/<pod-uid>/volumes/" + targetPluginDir + "/<volume>/" + targetName
}

// parseTarget checks that p is exactly <podsDir>/<uid>/volumes/kubernetes.io~csi/<name>/mount,
// clean, with plain names for uid and name, and returns the path of its parent relative to
// podsDir.
func parseTarget(podsDir, p string) (parentRel string, ok bool) {
	rest, found := strings.CutPrefix(p, podsDir+"/")
	if !found || strings.ContainsRune(p, 0) || filepath.Clean(p) != p {
		return "", false
	}
	// <uid>/volumes/kubernetes.io~csi/<volume>/mount, without allocating: start-up runs
	// this for every record.
	uid, after, _ := strings.Cut(rest, "/")
	volumes, after, _ := strings.Cut(after, "/")
	plugin, after, _ := strings.Cut(after, "/")
	volume, name, _ := strings.Cut(after, "/")
	if volumes != targetVolumes || plugin != targetPluginDir || name != targetName {
		return "", false
	}
	for _, n := range []string{uid, volume} {
		if n == "" || n == "." || n == ".." {
			return "", false
		}
	}
	return rest[:len(rest)-len(name)-1], true
}

// checkTarget refuses a target path that is not exactly kubelet's CSI target shape: publish and
// unpublish create, mount and remove there and nowhere else.
func (d *Driver) checkTarget(p string) (string, error) {
	if p == "" {
		return "", status.Error(codes.InvalidArgument, "target_path is missing")
	}
	if _, ok := parseTarget(d.podsDir, p); !ok {
		return "", status.Errorf(codes.InvalidArgument, "target_path %q is not a kubelet CSI volume target: want %s (is --kubelet-dir right?)", p, d.targetShape())
	}
	return p, nil
}

// errTargetLink is wrapped when a component of a target path below the pods dir is a symbolic
// link or not a directory: the path leads somewhere other than the pod's volume dir.
var errTargetLink = errors.New("a component of the target path is a symbolic link or not a directory")

// openTargetDir opens the directory holding target (the pod's volume dir) from the pods dir
// without following links, and returns an O_PATH descriptor of it. With create, missing
// directories are made with mkdirat relative to their verified parent, as kubelet would have
// made them. Errors wrap fs.ErrNotExist (missing, without create) or errTargetLink.
func (d *Driver) openTargetDir(target string, create bool) (int, error) {
	rel, ok := parseTarget(d.podsDir, target)
	if !ok {
		return -1, fmt.Errorf("target %s: not of the shape %s", target, d.targetShape())
	}
	// The pods dir is the administrator's (--kubelet-dir): opened by its path.
	pods, err := unix.Open(d.podsDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) && create {
		if err := mkdirAllPods(d.podsDir); err != nil {
			return -1, err
		}
		pods, err = unix.Open(d.podsDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return -1, fmt.Errorf("open kubelet pods dir %s: %w", d.podsDir, err)
	}
	defer unix.Close(pods)
	var fd int
	if create {
		fd, err = fdpath.MkdirAll(pods, rel, 0o750)
	} else {
		fd, err = fdpath.Open(pods, rel, unix.O_PATH|unix.O_DIRECTORY)
	}
	switch {
	case err == nil:
		return fd, nil
	case errors.Is(err, fdpath.ErrLink), errors.Is(err, unix.ENOTDIR):
		return -1, fmt.Errorf("target %s: %w", target, errTargetLink)
	default:
		return -1, fmt.Errorf("target %s: %w", target, err)
	}
}

// targetDirError maps an openTargetDir error of a publish to its gRPC status.
func targetDirError(target string, err error) error {
	if errors.Is(err, errTargetLink) {
		return status.Errorf(codes.FailedPrecondition, "target_path %s leads through a symbolic link or a non-directory below the kubelet pods dir; the node plugin mounts only into a pod's own volume dir and never follows links there", target)
	}
	// err names the target (or the pods dir) already.
	return status.Errorf(codes.Internal, "opening the volume dir: %v", err)
}

// isMountedAt is IsMountPointAt with a missing target meaning "not mounted".
func (d *Driver) isMountedAt(dirfd int) (bool, error) {
	mounted, err := d.mounter.IsMountPointAt(dirfd, targetName)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return mounted, err
}

// isMounted reports whether target is mounted, resolving it from the pods dir without
// following links. A missing target or volume dir is not mounted; one that leads through a
// link is an error.
func (d *Driver) isMounted(target string) (bool, error) {
	dir, err := d.openTargetDir(target, false)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer unix.Close(dir)
	return d.isMountedAt(dir)
}

// unmountAll peels every mount off the target in dirfd. A target that is a symbolic link is
// never a mount point here, so the loop ends at once.
func (d *Driver) unmountAll(dirfd int, target string) error {
	for range maxStackedMounts {
		mounted, err := d.isMountedAt(dirfd)
		if err != nil {
			return fmt.Errorf("checking whether %s is mounted: %w", target, err)
		}
		if !mounted {
			return nil
		}
		if err := d.mounter.UnmountAt(dirfd, targetName); err != nil && !errors.Is(err, mounter.ErrNotMounted) {
			return fmt.Errorf("unmounting %s: %w", target, err)
		}
	}
	return fmt.Errorf("%s still has mounts after %d unmounts", target, maxStackedMounts)
}

// prepareTarget creates the target in dirfd as a directory or an empty file, with mkdirat and
// openat(O_CREAT|O_EXCL|O_NOFOLLOW) relative to the verified volume dir. An existing target of
// the right kind is reused; an empty one of the wrong kind (a link included: the link itself,
// never what it points to) is replaced.
func prepareTarget(dirfd int, target string, isFile bool) error {
	var st unix.Stat_t
	err := unix.Fstatat(dirfd, targetName, &st, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case errors.Is(err, unix.ENOENT):
	case err != nil:
		return fmt.Errorf("stat %s: %w", target, err)
	case isFile && st.Mode&unix.S_IFMT == unix.S_IFREG, !isFile && st.Mode&unix.S_IFMT == unix.S_IFDIR:
		return nil
	default:
		flags := 0
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			flags = unix.AT_REMOVEDIR
		}
		if err := unix.Unlinkat(dirfd, targetName, flags); errors.Is(err, unix.ENOTEMPTY) || errors.Is(err, unix.EEXIST) {
			return status.Errorf(codes.FailedPrecondition, "target %s exists as a %s and is not empty; the volume needs a %s there", target, kindName(st.Mode), kindName(wantMode(isFile)))
		} else if err != nil {
			return status.Errorf(codes.FailedPrecondition, "target %s exists as a %s and cannot be removed; the volume needs a %s there: %v", target, kindName(st.Mode), kindName(wantMode(isFile)), err)
		}
	}
	if !isFile {
		if err := unix.Mkdirat(dirfd, targetName, 0o750); err != nil {
			return fmt.Errorf("create %s: %w", target, err)
		}
		return nil
	}
	fd, err := unix.Openat(dirfd, targetName, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return fmt.Errorf("create %s: %w", target, err)
	}
	return unix.Close(fd)
}

func wantMode(isFile bool) uint32 {
	if isFile {
		return unix.S_IFREG
	}
	return unix.S_IFDIR
}

func kindName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFREG:
		return "file"
	case unix.S_IFLNK:
		return "symlink"
	default:
		return "special file"
	}
}

// removeTarget removes a target in dirfd that is no longer mounted: an empty directory, or an
// empty file (what publish created), with unlinkat relative to the verified volume dir.
// Anything else is left in place and reported: it holds data that did not come from this
// plugin. A symbolic link is left alone: the plugin never made one.
func (d *Driver) removeTarget(dirfd int, target string) error {
	var st unix.Stat_t
	err := unix.Fstatat(dirfd, targetName, &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat %s: %w", target, err)
	}
	flags := 0
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFLNK:
		d.log.Warn("the target is a symbolic link, which this plugin never creates; left in place", "targetPath", target)
		return nil
	case unix.S_IFREG:
		if st.Size != 0 {
			return fmt.Errorf("target %s is a non-empty file after unmount; left in place", target)
		}
	case unix.S_IFDIR:
		flags = unix.AT_REMOVEDIR
		// Held open while it is removed, and closed in the background: the block of the
		// directory is freed at that close, not in this call (lateclose.go).
		if held, err := unix.Openat(dirfd, targetName, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err == nil {
			defer d.lateClose.close(held)
		}
	}
	err = unix.Unlinkat(dirfd, targetName, flags)
	switch {
	case errors.Is(err, unix.ENOTEMPTY), errors.Is(err, unix.EEXIST):
		return fmt.Errorf("target %s is a non-empty directory after unmount; left in place", target)
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("target %s is still a mount point; left in place", target)
	case errors.Is(err, unix.ENOENT):
		return nil
	case err != nil:
		return fmt.Errorf("remove %s: %w", target, err)
	}
	return nil
}

// mkdirAllPods creates a missing kubelet pods dir (the administrator's path).
func mkdirAllPods(dir string) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("create kubelet pods dir: %w", err)
	}
	return nil
}
