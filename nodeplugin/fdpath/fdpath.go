//go:build linux

// Package fdpath opens paths below a directory the node plugin trusts (kubelet's pods dir, the
// host root for an allowlisted entry resolved at start) without ever following a symbolic link
// and without leaving that directory, and hands out descriptors: the node plugin mounts onto,
// mounts from, creates and removes through those descriptors, so nothing can be swapped
// between a check and its use.
//
// It uses openat2(2) with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS (Linux
// 5.6). On older kernels it walks the path one component at a time with openat(2) and
// O_NOFOLLOW, refusing every symbolic link on the way: the same guarantee, with more calls.
package fdpath

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// ErrLink is wrapped by Open when a component of the path is a symbolic link (or the path
// would leave the directory it is resolved in).
var ErrLink = errors.New("a path component is a symbolic link")

// noOpenat2 is set once openat2 answered ENOSYS.
var noOpenat2 atomic.Bool

const resolveFlags = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// Mode names how paths are resolved on this kernel, for the startup log.
func Mode() string {
	fd, err := unix.Openat2(unix.AT_FDCWD, "/", &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC})
	if err == nil {
		unix.Close(fd)
		return "openat2 (RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS)"
	}
	return "openat per component with O_NOFOLLOW (the kernel lacks openat2, Linux 5.6)"
}

// CheckRelative refuses what is not a relative path of plain names: empty, absolute, with an
// empty, "." or ".." component, or with a NUL.
func CheckRelative(rel string) error {
	if rel == "" || strings.HasPrefix(rel, "/") || strings.ContainsRune(rel, 0) {
		return fmt.Errorf("path %q is not a relative path of plain names", rel)
	}
	for c := range strings.SplitSeq(rel, "/") {
		if c == "" || c == "." || c == ".." {
			return fmt.Errorf("path %q is not a relative path of plain names", rel)
		}
	}
	return nil
}

// Open opens rel below the directory dirfd without following any symbolic link, the last
// component included, and returns the new descriptor (close-on-exec). flags are open(2) flags,
// typically O_PATH or O_PATH|O_DIRECTORY. A symbolic link gives an error wrapping ErrLink; a
// missing component one wrapping unix.ENOENT (and so fs.ErrNotExist).
func Open(dirfd int, rel string, flags int) (int, error) {
	if err := CheckRelative(rel); err != nil {
		return -1, err
	}
	flags |= unix.O_CLOEXEC
	flags &^= unix.O_NOFOLLOW // with O_PATH it would open a trailing symlink itself
	if !noOpenat2.Load() {
		for range 16 {
			fd, err := unix.Openat2(dirfd, rel, &unix.OpenHow{Flags: uint64(flags), Resolve: resolveFlags})
			switch {
			case err == nil:
				return fd, nil
			case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR):
				// A rename elsewhere on the system raced the lookup; try again.
				continue
			case errors.Is(err, unix.ENOSYS):
				noOpenat2.Store(true)
			case errors.Is(err, unix.ELOOP), errors.Is(err, unix.EXDEV):
				return -1, fmt.Errorf("open %s: %w", rel, ErrLink)
			default:
				return -1, fmt.Errorf("open %s: %w", rel, err)
			}
			break
		}
		if !noOpenat2.Load() {
			return -1, fmt.Errorf("open %s: %w", rel, unix.EAGAIN)
		}
	}
	return walk(dirfd, rel, flags)
}

// walk is Open for kernels without openat2.
func walk(dirfd int, rel string, flags int) (int, error) {
	parts := strings.Split(rel, "/")
	cur := dirfd
	closeCur := func() {
		if cur != dirfd {
			unix.Close(cur)
		}
	}
	for i, name := range parts {
		f := unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC
		if i == len(parts)-1 {
			f = flags | unix.O_NOFOLLOW
		}
		fd, err := unix.Openat(cur, name, f, 0)
		if errors.Is(err, unix.ELOOP) {
			// O_NOFOLLOW without O_PATH refuses a symlink with ELOOP.
			closeCur()
			return -1, fmt.Errorf("open %s: %w", rel, ErrLink)
		}
		if err != nil {
			closeCur()
			return -1, fmt.Errorf("open %s: %w", rel, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			closeCur()
			return -1, fmt.Errorf("open %s: %w", rel, err)
		}
		closeCur()
		cur = fd
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			unix.Close(fd)
			return -1, fmt.Errorf("open %s: %w", rel, ErrLink)
		}
	}
	return cur, nil
}

// MkdirAll opens the directory rel below dirfd as Open does, creating each missing component
// with mkdirat(2) relative to its verified parent, and returns an O_PATH descriptor of it.
func MkdirAll(dirfd int, rel string, mode uint32) (int, error) {
	fd, err := Open(dirfd, rel, unix.O_PATH|unix.O_DIRECTORY)
	if !errors.Is(err, unix.ENOENT) {
		return fd, err
	}
	cur := dirfd
	for name := range strings.SplitSeq(rel, "/") {
		next, err := Open(cur, name, unix.O_PATH|unix.O_DIRECTORY)
		if errors.Is(err, unix.ENOENT) {
			if err := unix.Mkdirat(cur, name, mode); err != nil && !errors.Is(err, unix.EEXIST) {
				if cur != dirfd {
					unix.Close(cur)
				}
				return -1, fmt.Errorf("create %s in %s: %w", name, rel, err)
			}
			next, err = Open(cur, name, unix.O_PATH|unix.O_DIRECTORY)
		}
		if cur != dirfd {
			unix.Close(cur)
		}
		if err != nil {
			return -1, err
		}
		cur = next
	}
	return cur, nil
}

// Path returns the path the kernel reports for fd, for messages and tests.
func Path(fd int) string {
	buf := make([]byte, 4096)
	n, err := unix.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd), buf)
	if err != nil {
		return fmt.Sprintf("fd %d", fd)
	}
	return string(buf[:n])
}
