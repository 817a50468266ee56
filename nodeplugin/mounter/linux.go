//go:build linux

package mounter

import (
	"errors"
	"fmt"
	"os"
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

// Bind implements Interface: a bind mount, then a remount that applies nosuid, nodev and, for
// a read-only mount, rdonly. MS_BIND alone ignores those flags; only the remount makes the
// mount itself read-only rather than merely asking for it.
func (l *Linux) Bind(source, target string, readOnly bool) error {
	if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target, err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	// Keep noexec when the source mount has it: the kernel refuses to clear a flag that is
	// locked on the source, and the administrator's choice should carry over anyway.
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err == nil && st.Flags&unix.ST_NOEXEC != 0 {
		flags |= unix.MS_NOEXEC
	}
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		remountErr := fmt.Errorf("remount %s with nosuid,nodev (read-only %t): %w", target, readOnly, err)
		if uerr := unix.Unmount(target, unix.UMOUNT_NOFOLLOW); uerr != nil {
			return errors.Join(remountErr, fmt.Errorf("undo bind mount of %s: %w", target, uerr))
		}
		return remountErr
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
