//go:build linux

package mounter

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/mount-utils"
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
	// bind mounts of the same filesystem, which a device-number comparison would miss.
	detector mount.Interface
}

var _ Interface = (*Linux)(nil)

// New returns the real mounter.
func New() *Linux {
	return &Linux{mountInfo: "/proc/self/mountinfo", detector: mount.New("")}
}

// IsMountPoint implements Interface.
func (l *Linux) IsMountPoint(path string) (bool, error) {
	return l.detector.IsMountPoint(path)
}

// Bind implements Interface. The mount is made complete, with nosuid, nodev and (when readOnly)
// rdonly, before it is attached at target. That order matters: the node plugin mounts into
// kubelet's pods dir, a shared mount, and the host's copy of the mount, the one kubelet hands
// to the pod, is cloned at the moment of attaching. A remount afterwards (MS_REMOUNT|MS_BIND)
// changes only the plugin's own copy: per-mount flags do not propagate, so the pod would get
// a writable, suid-capable mount.
//
// The clone keeps the per-mount flags of the source's mount (noexec, ro, atime); Bind only
// adds restrictions, never lifts one.
func (l *Linux) Bind(source, target string, readOnly bool) error {
	if !l.LegacyBind {
		err := bindDetached(source, target, readOnly)
		if !errors.Is(err, errNoMountSetattr) {
			return err
		}
	}
	return bindStaged(source, target, readOnly)
}

// errNoMountSetattr marks a kernel without open_tree/move_mount (Linux 5.2) or mount_setattr
// (Linux 5.12).
var errNoMountSetattr = errors.New("kernel lacks mount_setattr")

// bindDetached clones the source's mount into a detached mount (open_tree), sets its flags
// (mount_setattr) and only then attaches it at target (move_mount). Not recursive: mounts
// below source are not carried over, as with a plain MS_BIND.
func bindDetached(source, target string, readOnly bool) error {
	fd, err := unix.OpenTree(unix.AT_FDCWD, source, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if errors.Is(err, unix.ENOSYS) {
		return errNoMountSetattr
	}
	if err != nil {
		return fmt.Errorf("bind mount %s on %s: clone the mount of %s: %w", source, target, source, err)
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
		return fmt.Errorf("bind mount %s on %s: set nosuid,nodev (read-only %t): %w", source, target, readOnly, err)
	}
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("bind mount %s on %s: attach: %w", source, target, err)
	}
	return nil
}

// bindStaged is Bind for kernels without mount_setattr, with mount(2) only. The source is
// bound at a staging point inside a private mount of its own, where nothing propagates;
// remounted there with the flags; then bound onto target: a bind mount is a clone of its
// source mount, flags included, and so are the copies propagation makes of it. The staging
// mounts are then detached and the staging dir removed. The staging dir is created in the
// temporary dir ($TMPDIR, else /tmp: in the node plugin's container, an emptyDir).
func bindStaged(source, target string, readOnly bool) (err error) {
	fi, err := os.Stat(source)
	if err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target, err)
	}
	dir, err := os.MkdirTemp("", "apm-csi-bind-")
	if err != nil {
		return fmt.Errorf("bind mount %s on %s: staging dir: %w", source, target, err)
	}
	attached := false
	defer func() {
		// Remove, not RemoveAll: should an unmount below have failed, the removal fails too
		// rather than deleting through the mount into the source.
		err = errors.Join(err, os.Remove(dir))
		if err != nil && attached {
			// An error means nothing is mounted at target, as for the other failures.
			if uerr := unix.Unmount(target, unix.UMOUNT_NOFOLLOW); uerr != nil {
				err = errors.Join(err, fmt.Errorf("undo bind mount of %s: %w", target, uerr))
			}
		}
	}()

	// A mount point of its own, private: the staging mount below is not copied anywhere, even
	// when the temporary dir is on a shared mount.
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: staging dir %s: %w", source, target, dir, err)
	}
	defer func() { err = errors.Join(err, detach(dir)) }()
	if err := unix.Mount("", dir, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: make staging dir %s private: %w", source, target, dir, err)
	}
	stage := filepath.Join(dir, "m")
	if fi.IsDir() {
		err = os.Mkdir(stage, 0o700)
	} else {
		err = os.WriteFile(stage, nil, 0o600)
	}
	if err != nil {
		return fmt.Errorf("bind mount %s on %s: staging point: %w", source, target, err)
	}
	defer func() { err = errors.Join(err, os.Remove(stage)) }()

	if err := unix.Mount(source, stage, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: staging bind mount at %s: %w", source, target, stage, err)
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
		return fmt.Errorf("bind mount %s on %s: statfs %s: %w", source, target, stage, err)
	}
	if st.Flags&unix.ST_NOEXEC != 0 {
		flags |= unix.MS_NOEXEC
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", stage, "", flags, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: remount with nosuid,nodev (read-only %t): %w", source, target, readOnly, err)
	}
	if err := unix.Mount(stage, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target, err)
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

// Overlay implements Interface. It uses the fsopen/fsconfig mount API, which takes each lower
// dir as its own "lowerdir+" parameter and so has no one-page limit on the option string, and
// falls back to mount(2) where the kernel lacks it.
func (l *Linux) Overlay(target string, o Overlay) error {
	if err := o.Validate(); err != nil {
		return err
	}
	if !l.LegacyOverlay {
		err := overlayFsconfig(target, o)
		if !errors.Is(err, errNoNewMountAPI) {
			return err
		}
	}
	return overlayLegacy(target, o)
}

// errNoNewMountAPI marks a kernel without fsopen or without fsconfig "lowerdir+".
var errNoNewMountAPI = errors.New("kernel lacks the overlayfs new mount API")

func overlayFsconfig(target string, o Overlay) error {
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
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
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

func overlayLegacy(target string, o Overlay) error {
	data := "lowerdir=" + strings.Join(o.Lower, ":")
	flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV)
	if o.ReadOnly() {
		flags |= unix.MS_RDONLY
	} else {
		data += ",upperdir=" + o.Upper + ",workdir=" + o.Work
	}
	data += ",index=off,metacopy=off"
	// mount(2) copies at most one page of options and silently truncates the rest, which
	// would drop lower dirs or the upper dir.
	if limit := os.Getpagesize() - 1; len(data) > limit {
		return fmt.Errorf("overlay options for %s are %d bytes, over the %d-byte limit of mount(2) on a kernel without fsconfig lowerdir+ (Linux 6.8); use fewer libraries per volume or a shorter --state-dir", target, len(data), limit)
	}
	if err := unix.Mount(overlaySource, target, "overlay", flags, data); err != nil {
		return fmt.Errorf("mount overlay on %s: %w", target, err)
	}
	return nil
}

// Unmount implements Interface. UMOUNT_NOFOLLOW: a target that became a symlink is not
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
	infos, err := mount.ParseMountInfo(l.mountInfo)
	if err != nil {
		return nil, fmt.Errorf("read mount table %s: %w", l.mountInfo, err)
	}
	out := make([]Entry, 0, len(infos))
	for _, mi := range infos {
		out = append(out, Entry{
			MountPoint:   unescape(mi.MountPoint),
			FsType:       mi.FsType,
			Source:       mi.Source,
			Root:         unescape(mi.Root),
			MountOptions: mi.MountOptions,
			SuperOptions: mi.SuperOptions,
		})
	}
	return out, nil
}
