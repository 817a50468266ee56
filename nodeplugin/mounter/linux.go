//go:build linux

package mounter

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
	"k8s.io/mount-utils"

	"github.com/apm-csi/apm-csi/nodeplugin/fdpath"
)

// overlaySource is the "device" name overlay mounts get, so that they are recognisable in the
// mount table of the host.
const overlaySource = "apm-csi"

// Linux performs mounts with system calls, so it works in a static binary in an image that has
// no mount(8) or umount(8).
type Linux struct {
	// LegacyOverlay forces overlay mounts through mount(2) with an option string (limited to one
	// page) instead of the fsopen/fsconfig API. Set by tests; also the automatic fallback on
	// kernels that predate fsconfig's "lowerdir+" (Linux 6.8).
	LegacyOverlay bool
	// LegacyBind forces bind mounts through mount(2) and a private staging mount instead of
	// open_tree/mount_setattr/move_mount. Set by tests; also the automatic fallback on kernels
	// without mount_setattr (before Linux 5.12).
	LegacyBind bool
	// mountInfo is the mount table to read; /proc/self/mountinfo.
	mountInfo string
	// detector answers IsMountPoint. mount-utils' implementation uses openat2/statx to detect
	// bind mounts of the same filesystem, which a device-number comparison would miss. It is
	// made on first use: making it runs umount(8) once (to learn how it reports a dir that is
	// not mounted), which start-up does not need on a kernel that IsMountPointAt answers with
	// statx alone (Linux 5.8).
	detector func() mount.Interface
}

var _ Interface = (*Linux)(nil)

// New returns the real mounter.
func New() *Linux {
	return &Linux{mountInfo: "/proc/self/mountinfo", detector: sync.OnceValue(func() mount.Interface { return mount.New("") })}
}

// IsMountPoint reports whether path is a mount point (symlinks followed), including a bind
// mount of a directory of the same filesystem.
func (l *Linux) IsMountPoint(path string) (bool, error) {
	return l.detector().IsMountPoint(path)
}

// Bind bind-mounts source onto target, both given by path (symlinks followed): BindFrom for
// paths the caller has not verified. The mount is made complete, with nosuid, nodev and (when readOnly)
// rdonly, before it is attached at target. That order matters: the node plugin mounts into
// kubelet's pods dir, a shared mount, and the host's copy of the mount, the one kubelet hands
// to the pod, is cloned at the moment of attaching. A remount afterwards (MS_REMOUNT|MS_BIND)
// changes only the plugin's own copy: per-mount flags do not propagate, so the pod would get
// a writable, suid-capable mount.
//
// The clone keeps the per-mount flags of the source's mount (noexec, ro, atime); Bind only
// adds restrictions, never lifts one.
func (l *Linux) Bind(source, target string, readOnly bool) error {
	src, err := unix.Open(source, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target, &os.PathError{Op: "open", Path: source, Err: err})
	}
	defer unix.Close(src)
	tgt, err := unix.Open(target, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target, &os.PathError{Op: "open", Path: target, Err: err})
	}
	defer unix.Close(tgt)
	return l.bindFD(src, tgt, target, readOnly)
}

// BindFrom implements Interface: Bind from the descriptor source onto name in the directory
// dirfd, which is opened without following links. The mount is attached to the descriptors
// themselves, so neither side can be swapped for a link between the check and the mount.
func (l *Linux) BindFrom(source, dirfd int, name string, readOnly bool) error {
	tgt, err := fdpath.Open(dirfd, name, unix.O_PATH)
	if err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", fdpath.Path(source), atPath(dirfd, name), err)
	}
	defer unix.Close(tgt)
	return l.bindFD(source, tgt, atPath(dirfd, name), readOnly)
}

// bindFD binds the open source onto the open target. undo is a path that reaches the target
// without following a link in its last component, to detach the mount should the legacy path
// fail after attaching it.
func (l *Linux) bindFD(source, target int, undo string, readOnly bool) error {
	if !l.LegacyBind {
		err := bindDetached(source, target, readOnly)
		if !errors.Is(err, errNoMountSetattr) {
			return err
		}
	}
	return bindStaged(source, target, undo, readOnly)
}

// procFD is the magic link that reaches exactly what fd refers to, for mount(2), which takes
// paths only (the legacy paths).
func procFD(fd int) string { return fmt.Sprintf("/proc/self/fd/%d", fd) }

// atPath is a path to name in the directory dirfd: the magic link of the directory, which
// reaches exactly that directory whatever happened to the path it was opened by, then a plain
// name looked up in it.
func atPath(dirfd int, name string) string { return procFD(dirfd) + "/" + name }

// errNoMountSetattr marks a kernel without open_tree/move_mount (Linux 5.2) or mount_setattr
// (Linux 5.12).
var errNoMountSetattr = errors.New("kernel lacks mount_setattr")

// bindDetached clones the source's mount into a detached mount (open_tree), sets its flags
// (mount_setattr) and only then attaches it onto the target's descriptor (move_mount). Not
// recursive: mounts below source are not carried over, as with a plain MS_BIND.
func bindDetached(source, target int, readOnly bool) error {
	fd, err := unix.OpenTree(source, "", unix.AT_EMPTY_PATH|unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if errors.Is(err, unix.ENOSYS) {
		return errNoMountSetattr
	}
	if err != nil {
		return fmt.Errorf("bind mount %s on %s: clone the mount of the source: %w", fdpath.Path(source), fdpath.Path(target), err)
	}
	// Closing the descriptor of a mount that was never attached discards it.
	defer unix.Close(fd)
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
	if readOnly {
		attr.Attr_set |= unix.MOUNT_ATTR_RDONLY
	}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		if errors.Is(err, unix.ENOSYS) {
			return errNoMountSetattr
		}
		return fmt.Errorf("bind mount %s on %s: set nosuid,nodev (read-only %t): %w", fdpath.Path(source), fdpath.Path(target), readOnly, err)
	}
	if err := unix.MoveMount(fd, "", target, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("bind mount %s on %s: attach: %w", fdpath.Path(source), fdpath.Path(target), err)
	}
	return nil
}

// bindStaged is Bind for kernels without mount_setattr, with mount(2) only, which takes paths:
// source and target are reached through their descriptors' magic links. The source is
// bound at a staging point inside a private mount of its own, where nothing propagates;
// remounted there with the flags; then bound onto target: a bind mount is a clone of its
// source mount, flags included, and so are the copies propagation makes of it. The staging
// mounts are then detached and the staging dir removed. The staging dir is created in the
// temporary dir ($TMPDIR, else /tmp: in the node plugin's container, an emptyDir).
func bindStaged(sourceFD, targetFD int, undo string, readOnly bool) (err error) {
	source, target := procFD(sourceFD), procFD(targetFD)
	name := func() string { return fdpath.Path(sourceFD) + " on " + fdpath.Path(targetFD) }
	var fst unix.Stat_t
	if err := unix.Fstat(sourceFD, &fst); err != nil {
		return fmt.Errorf("bind mount %s: %w", name(), err)
	}
	dir, err := os.MkdirTemp("", "apm-csi-bind-")
	if err != nil {
		return fmt.Errorf("bind mount %s: staging dir: %w", name(), err)
	}
	attached := false
	defer func() {
		// Remove, not RemoveAll: should an unmount below have failed, the removal fails too
		// rather than deleting through the mount into the source.
		err = errors.Join(err, os.Remove(dir))
		if err != nil && attached {
			// An error means nothing is mounted at target, as for the other failures.
			if uerr := unix.Unmount(undo, unix.UMOUNT_NOFOLLOW); uerr != nil {
				err = errors.Join(err, fmt.Errorf("undo bind mount of %s: %w", undo, uerr))
			}
		}
	}()

	// A mount point of its own, private: the staging mount below is not copied anywhere, even
	// when the temporary dir is on a shared mount.
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s: staging dir %s: %w", name(), dir, err)
	}
	defer func() { err = errors.Join(err, detach(dir)) }()
	if err := unix.Mount("", dir, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("bind mount %s: make staging dir %s private: %w", name(), dir, err)
	}
	stage := filepath.Join(dir, "m")
	if fst.Mode&unix.S_IFMT == unix.S_IFDIR {
		err = os.Mkdir(stage, 0o700)
	} else {
		err = os.WriteFile(stage, nil, 0o600)
	}
	if err != nil {
		return fmt.Errorf("bind mount %s: staging point: %w", name(), err)
	}
	defer func() { err = errors.Join(err, os.Remove(stage)) }()

	if err := unix.Mount(source, stage, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s: staging bind mount at %s: %w", name(), stage, err)
	}
	defer func() { err = errors.Join(err, detach(stage)) }()
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	// The remount sets these flags exactly: keep those of the source's mount, as the clone
	// of bindDetached does (and the kernel refuses to clear a flag locked on the source).
	var st unix.Statfs_t
	if err := unix.Statfs(stage, &st); err != nil {
		return fmt.Errorf("bind mount %s: statfs %s: %w", name(), stage, err)
	}
	if st.Flags&unix.ST_NOEXEC != 0 {
		flags |= unix.MS_NOEXEC
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", stage, "", flags, ""); err != nil {
		return fmt.Errorf("bind mount %s: remount with nosuid,nodev (read-only %t): %w", name(), readOnly, err)
	}
	if err := unix.Mount(stage, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s: %w", name(), err)
	}
	attached = true
	return nil
}

// detach lazily unmounts the staging mount at path.
func detach(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil {
		return fmt.Errorf("detach staging mount %s: %w", path, err)
	}
	return nil
}

// Overlay mounts an overlayfs on target, given by path. It uses the fsopen/fsconfig mount API, which takes each lower
// dir as its own "lowerdir+" parameter and so has no one-page limit on the option string, and
// falls back to mount(2) where the kernel lacks it.
func (l *Linux) Overlay(target string, o Overlay) error {
	if err := o.Validate(); err != nil {
		return err
	}
	tgt, err := unix.Open(target, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("mount overlay on %s: %w", target, &os.PathError{Op: "open", Path: target, Err: err})
	}
	defer unix.Close(tgt)
	return l.overlayFD(tgt, target, o)
}

// OverlayAt implements Interface: Overlay onto name in the directory dirfd, opened without
// following links; the new mount is attached to that descriptor.
func (l *Linux) OverlayAt(dirfd int, name string, o Overlay) error {
	if err := o.Validate(); err != nil {
		return err
	}
	tgt, err := fdpath.Open(dirfd, name, unix.O_PATH)
	if err != nil {
		return fmt.Errorf("mount overlay on %s: %w", atPath(dirfd, name), err)
	}
	defer unix.Close(tgt)
	return l.overlayFD(tgt, fdpath.Path(tgt), o)
}

func (l *Linux) overlayFD(tgt int, target string, o Overlay) error {
	if !l.LegacyOverlay {
		err := overlayFsconfig(tgt, target, o)
		if !errors.Is(err, errNoNewMountAPI) {
			return err
		}
	}
	return overlayLegacy(tgt, target, o)
}

// errNoNewMountAPI marks a kernel without fsopen or without fsconfig "lowerdir+".
var errNoNewMountAPI = errors.New("kernel lacks the overlayfs new mount API")

func overlayFsconfig(tgt int, target string, o Overlay) error {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if errors.Is(err, unix.ENOSYS) {
		return errNoNewMountAPI
	}
	if err != nil {
		return fmt.Errorf("fsopen overlay: %w", err)
	}
	defer unix.Close(fsfd)

	set := func(key, value string) error {
		if err := unix.FsconfigSetString(fsfd, key, value); err != nil {
			return fmt.Errorf("overlay option %s=%s: %w%s", key, value, err, fsLog(fsfd))
		}
		return nil
	}
	if err := set("source", overlaySource); err != nil {
		return err
	}
	for i, dir := range o.Lower {
		if err := unix.FsconfigSetString(fsfd, "lowerdir+", dir); err != nil {
			if i == 0 && errors.Is(err, unix.EINVAL) {
				// Kernels before 6.8 do not know "lowerdir+".
				return errNoNewMountAPI
			}
			return fmt.Errorf("overlay lower dir %s: %w%s", dir, err, fsLog(fsfd))
		}
	}
	attrs := unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV
	if o.ReadOnly() {
		attrs |= unix.MOUNT_ATTR_RDONLY
	} else {
		if err := set("upperdir", o.Upper); err != nil {
			return err
		}
		if err := set("workdir", o.Work); err != nil {
			return err
		}
		if o.Volatile {
			if err := unix.FsconfigSetFlag(fsfd, "volatile"); err != nil {
				return fmt.Errorf("overlay option volatile: %w%s", err, fsLog(fsfd))
			}
		}
	}
	// Explicit, so that the behaviour does not depend on the kernel's build-time defaults.
	if err := set("index", "off"); err != nil {
		return err
	}
	if err := set("metacopy", "off"); err != nil {
		return err
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		msg := fsLog(fsfd)
		if errors.Is(err, unix.EINVAL) && msg == "" {
			// Before Linux 6.5 overlayfs parses fsconfig parameters as one legacy option
			// string and rejects "lowerdir+" only here, silently; overlayfs that understands
			// the new API always explains an EINVAL in the context's log.
			return errNoNewMountAPI
		}
		return fmt.Errorf("create overlay for %s: %w%s", target, err, msg)
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, attrs)
	if err != nil {
		return fmt.Errorf("fsmount overlay for %s: %w%s", target, err, fsLog(fsfd))
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", tgt, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("attach overlay at %s: %w", target, err)
	}
	return nil
}

// fsLog reads the messages the kernel left on a filesystem context, which say precisely what
// it refused (e.g. "overlayfs: failed to resolve '/x': -2").
func fsLog(fsfd int) string {
	var msgs []string
	buf := make([]byte, 1024)
	for range 8 {
		n, err := unix.Read(fsfd, buf)
		if err != nil || n <= 0 {
			break
		}
		msgs = append(msgs, strings.TrimSpace(string(buf[:n])))
	}
	if len(msgs) == 0 {
		return ""
	}
	return " (kernel: " + strings.Join(msgs, "; ") + ")"
}

func overlayLegacy(tgt int, target string, o Overlay) error {
	data := "lowerdir=" + strings.Join(o.Lower, ":")
	flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV)
	if o.ReadOnly() {
		flags |= unix.MS_RDONLY
	} else {
		data += ",upperdir=" + o.Upper + ",workdir=" + o.Work
		if o.Volatile {
			data += ",volatile"
		}
	}
	data += ",index=off,metacopy=off"
	// mount(2) copies at most one page of options and silently truncates the rest, which
	// would drop lower dirs or the upper dir.
	if limit := os.Getpagesize() - 1; len(data) > limit {
		return fmt.Errorf("overlay options for %s are %d bytes, over the %d-byte limit of mount(2) on a kernel without fsconfig lowerdir+ (Linux 6.8); use fewer libraries per volume or a shorter --state-dir", target, len(data), limit)
	}
	err := unix.Mount(overlaySource, procFD(tgt), "overlay", flags, data)
	if errors.Is(err, unix.EINVAL) && o.Volatile {
		// Before Linux 5.10 overlayfs does not know "volatile": it syncs, as it always did.
		err = unix.Mount(overlaySource, procFD(tgt), "overlay", flags, strings.Replace(data, ",volatile", "", 1))
	}
	if err != nil {
		return fmt.Errorf("mount overlay on %s: %w", target, err)
	}
	return nil
}

// Unmount removes the top mount at target, given by path. UMOUNT_NOFOLLOW: a target that became a symlink is not
// followed to somewhere else.
func (l *Linux) Unmount(target string) error {
	err := unix.Unmount(target, unix.UMOUNT_NOFOLLOW)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("unmount %s: %w", target, ErrNotMounted)
	default:
		return fmt.Errorf("unmount %s: %w", target, err)
	}
}

// MountTable implements Interface.
func (l *Linux) MountTable() ([]Entry, error) {
	return ReadMountTable(l.mountInfo)
}

// ReadMountTable parses a mount table in the format of /proc/<pid>/mountinfo: the one parser
// of mount tables in the node plugin and its tests.
func ReadMountTable(mountInfo string) ([]Entry, error) {
	infos, err := mount.ParseMountInfo(mountInfo)
	if err != nil {
		return nil, fmt.Errorf("read mount table %s: %w", mountInfo, err)
	}
	out := make([]Entry, 0, len(infos))
	for _, mi := range infos {
		out = append(out, Entry{
			MountPoint:   unescapeOctal(mi.MountPoint),
			FsType:       mi.FsType,
			Source:       mi.Source,
			Root:         unescapeOctal(mi.Root),
			Major:        mi.Major,
			Minor:        mi.Minor,
			MountOptions: mi.MountOptions,
			SuperOptions: mi.SuperOptions,
		})
	}
	return out, nil
}

// IsMountPointAt implements Interface. statx(2) on name in dirfd, without following a link:
// STATX_ATTR_MOUNT_ROOT (Linux 5.8) says whether it is the root of a mount, which a bind mount
// of a directory of the same filesystem is; on older kernels the mount ids of name and its
// directory are compared.
func (l *Linux) IsMountPointAt(dirfd int, name string) (bool, error) {
	var st unix.Statx_t
	if err := unix.Statx(dirfd, name, unix.AT_SYMLINK_NOFOLLOW|unix.AT_NO_AUTOMOUNT, unix.STATX_TYPE|unix.STATX_MNT_ID, &st); err != nil {
		return false, fmt.Errorf("statx %s: %w", atPath(dirfd, name), err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		// A link is never a mount point here: it is not followed.
		return false, nil
	}
	if st.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 {
		return st.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0, nil
	}
	var parent unix.Statx_t
	if err := unix.Statx(dirfd, "", unix.AT_EMPTY_PATH, unix.STATX_MNT_ID, &parent); err != nil {
		return false, fmt.Errorf("statx %s: %w", fdpath.Path(dirfd), err)
	}
	if st.Mask&unix.STATX_MNT_ID != 0 && parent.Mask&unix.STATX_MNT_ID != 0 {
		return st.Mnt_id != parent.Mnt_id, nil
	}
	// Before Linux 5.8: a different device is surely a mount point; a bind mount of the same
	// filesystem is told apart through the mount table.
	if st.Dev_major != parent.Dev_major || st.Dev_minor != parent.Dev_minor {
		return true, nil
	}
	return l.detector().IsMountPoint(fdpath.Path(dirfd) + "/" + name)
}

// SurelyMountRoot implements Interface: one statx(2), trusted only where the kernel reports
// STATX_ATTR_MOUNT_ROOT (Linux 5.8).
func (l *Linux) SurelyMountRoot(dirfd int, rel string) bool {
	var st unix.Statx_t
	if err := unix.Statx(dirfd, rel, unix.AT_SYMLINK_NOFOLLOW|unix.AT_NO_AUTOMOUNT, unix.STATX_TYPE, &st); err != nil {
		return false
	}
	return st.Mode&unix.S_IFMT != unix.S_IFLNK &&
		st.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 && st.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0
}

// UnmountAt implements Interface. The unmount goes through the magic link of dirfd, which
// reaches exactly the directory that was verified, whatever became of the path it was opened
// by, and then the plain name, with UMOUNT_NOFOLLOW: a name that became a link is not
// followed. The name is checked to be a mount point first, so that a name that is not one
// returns ErrNotMounted rather than reaching a mount of the directory itself.
func (l *Linux) UnmountAt(dirfd int, name string) error {
	if err := fdpath.CheckRelative(name); err != nil || strings.Contains(name, "/") {
		return fmt.Errorf("unmount %q: not a plain name", name)
	}
	mounted, err := l.IsMountPointAt(dirfd, name)
	if err != nil {
		return fmt.Errorf("unmount: %w", err)
	}
	if !mounted {
		return fmt.Errorf("unmount %s: %w", fdpath.Path(dirfd)+"/"+name, ErrNotMounted)
	}
	err = unix.Unmount(atPath(dirfd, name), unix.UMOUNT_NOFOLLOW)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("unmount %s: %w", fdpath.Path(dirfd)+"/"+name, ErrNotMounted)
	default:
		return fmt.Errorf("unmount %s: %w", fdpath.Path(dirfd)+"/"+name, err)
	}
}

// Features names the mount system calls in use on this kernel, for the startup log.
func (l *Linux) Features() string {
	var parts []string
	// A call on an invalid descriptor answers EBADF where the call exists, ENOSYS where not.
	if _, err := unix.OpenTree(-1, "", 0); errors.Is(err, unix.ENOSYS) || l.LegacyBind {
		parts = append(parts, "bind: mount(2) through a private staging mount (no open_tree/move_mount, Linux 5.2)")
	} else if err := unix.MountSetattr(-1, "", 0, &unix.MountAttr{}); errors.Is(err, unix.ENOSYS) {
		parts = append(parts, "bind: mount(2) through a private staging mount (no mount_setattr, Linux 5.12)")
	} else {
		parts = append(parts, "bind: open_tree+mount_setattr+move_mount onto descriptors")
	}
	if _, err := unix.Fsopen("", 0); errors.Is(err, unix.ENOSYS) || l.LegacyOverlay {
		parts = append(parts, "overlay: mount(2) onto the target's descriptor")
	} else {
		parts = append(parts, "overlay: fsopen+fsmount, moved onto the target's descriptor")
	}
	return strings.Join(parts, "; ")
}

// OwnMount makes dir (created if missing) the root of a mount of its own, with no mount below
// it, by bind-mounting it onto itself (not recursively) unless it is a mount point already,
// and returns a function that undoes what it did.
//
// The library store needs this. For every lower dir of an overlay, the kernel clones a private
// copy of the mount that holds the dir (clone_private_mount), and that walks every mount
// attached below that mount, checking whether it lies under the dir. A store on the node's
// root filesystem, or in the state dir next to the writable layers' tmpfs mounts, shares its
// mount with every pod's target and writable layer, so each overlay costs time in proportion
// to the volumes already published. A mount of its own has nothing below it.
//
// It is idempotent: a dir that is a mount point already (this function's mount left by an
// earlier process that did not stop cleanly, or a filesystem the administrator mounted there)
// is used as it is, and release then does nothing, so mounts never stack. release unmounts
// the bind mount it made (lazily if something still holds it open); overlays made meanwhile
// keep their own private copies of it and are unaffected.
func OwnMount(dir string) (release func() error, err error) {
	return ownMount(dir, "own mount", func(clean string) error {
		if err := unix.Mount(clean, clean, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mounting %s onto itself: %w", dir, err)
		}
		return nil
	})
}

// EmptyMount implements Interface: it makes dir (created if missing) the root of an empty, read-only mount of its own,
// a tmpfs, unless it is a mount point already (as OwnMount), and returns a function that
// undoes what it did. It is for a dir that must stay empty: what the dir holds itself is
// hidden while the tmpfs is mounted.
//
// Unlike the bind mount OwnMount makes, mounting a new filesystem does not walk the mounts
// attached below the mount that holds dir (a non-recursive bind mount checks each of them for
// a locked mount below the source), so it takes the same time however many volumes the node
// has published.
func (l *Linux) EmptyMount(dir string) (release func() error, err error) {
	return ownMount(dir, "empty mount", func(clean string) error {
		flags := uintptr(unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
		if err := unix.Mount(overlaySource, clean, "tmpfs", flags, "mode=0555,size=4k,nr_inodes=16"); err != nil {
			return fmt.Errorf("mounting an empty tmpfs on %s: %w", dir, err)
		}
		return nil
	})
}

// ownMount is OwnMount and EmptyMount: mount makes the mount on the clean path of dir.
func ownMount(dir, what string, mount func(clean string) error) (release func() error, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("%s for %s: %w", what, dir, err)
	}
	clean := filepath.Clean(dir)
	parent, err := unix.Open(filepath.Dir(clean), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%s for %s: %w", what, dir, err)
	}
	defer unix.Close(parent)
	mounted, err := New().IsMountPointAt(parent, filepath.Base(clean))
	if err != nil {
		return nil, fmt.Errorf("%s for %s: %w", what, dir, err)
	}
	if mounted {
		return func() error { return nil }, nil
	}
	if err := mount(clean); err != nil {
		return nil, err
	}
	return func() error {
		err := unix.Unmount(clean, unix.UMOUNT_NOFOLLOW)
		if errors.Is(err, unix.EBUSY) {
			err = unix.Unmount(clean, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
		}
		if err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmounting the %s of %s: %w", what, dir, err)
		}
		return nil
	}, nil
}
