// Package mounter is the narrow set of mount operations the node plugin performs, behind an
// interface so that the driver's logic is unit-tested with Fake and the real system calls are
// tested once, as root, under test/.
package mounter

import (
	"errors"
	"fmt"
	"path"
	"strings"
)

// Interface is every mount operation the driver needs. Targets are named by an open directory
// (a descriptor the driver obtained without following links) and a plain name in it; sources
// by descriptor. No method follows a symbolic link in the name.
type Interface interface {
	// IsMountPointAt reports whether name in the directory dirfd is the root of a mount,
	// including a bind mount of a directory of the same filesystem. A symbolic link is not
	// followed and is not a mount point. It returns an error wrapping fs.ErrNotExist when
	// name is missing.
	IsMountPointAt(dirfd int, name string) (bool, error)
	// SurelyMountRoot reports true when rel, a relative path below the directory dirfd
	// resolved as the kernel resolves any path (links in its directories are followed), is
	// certainly the root of a mount; false means "not known", never "not mounted". One
	// system call, for checking thousands of targets at start-up: a false must be confirmed
	// with IsMountPointAt on a descriptor obtained without following links.
	SurelyMountRoot(dirfd int, rel string) bool
	// BindFrom bind-mounts what the descriptor source refers to (a directory or a file) onto
	// name in dirfd, which must exist and be of the same kind. The mount is nosuid,nodev,
	// and really read-only when readOnly is set, before it is attached.
	BindFrom(source, dirfd int, name string, readOnly bool) error
	// OverlayAt mounts an overlayfs on name in dirfd.
	OverlayAt(dirfd int, name string, o Overlay) error
	// UnmountAt removes the top mount at name in dirfd. It returns an error wrapping
	// ErrNotMounted when name is not a mount point (a symbolic link included).
	UnmountAt(dirfd int, name string) error
	// MountTable lists the mounts of the plugin's mount namespace.
	MountTable() ([]Entry, error)
	// EmptyMount makes dir the root of an empty, read-only mount of its own, with nothing
	// mounted below it, and returns what undoes that.
	EmptyMount(dir string) (release func() error, err error)
}

// ErrNotMounted is wrapped by Unmount when there is nothing mounted at the target.
var ErrNotMounted = errors.New("not mounted")

// Overlay describes one overlayfs mount.
type Overlay struct {
	// Lower dirs, top first. At least one; at least two when there is no upper dir.
	Lower []string
	// Upper and Work are both set (a writable overlay) or both empty (a read-only one).
	Upper string
	Work  string
	// Volatile (a writable overlay only) skips every sync of the upper dir's filesystem,
	// the one at unmount included: that sync writes back the whole filesystem, so an
	// unpublish would otherwise wait for whatever else is writing to it. After a crash the
	// upper dir is in an unknown state and overlayfs refuses to mount it again; it must be
	// discarded. Only for an upper dir that is removed when the volume goes (Linux 5.10).
	Volatile bool
}

// Validate checks what the kernel would refuse with a less helpful error, and the characters
// that would change the meaning of an option string.
func (o Overlay) Validate() error {
	if len(o.Lower) == 0 {
		return errors.New("overlay needs at least one lower dir")
	}
	if (o.Upper == "") != (o.Work == "") {
		return errors.New("overlay needs both an upper and a work dir, or neither")
	}
	if o.Volatile && o.Upper == "" {
		return errors.New("only a writable overlay can be volatile")
	}
	if o.Upper == "" && len(o.Lower) < 2 {
		return errors.New("a read-only overlay needs at least two lower dirs; bind-mount a single one read-only instead")
	}
	for _, p := range append(append([]string{}, o.Lower...), o.Upper, o.Work) {
		if strings.ContainsAny(p, ",:\\\x00\n") {
			return fmt.Errorf("overlay path %q contains a character reserved by overlayfs options", p)
		}
	}
	return nil
}

// ReadOnly reports whether the overlay has no upper dir.
func (o Overlay) ReadOnly() bool { return o.Upper == "" }

// Entry is one line of the mount table (/proc/self/mountinfo).
type Entry struct {
	MountPoint string
	FsType     string
	Source     string
	// Root is the directory of the source filesystem that is mounted (not "/" for bind mounts).
	Root string
	// Major and Minor are the device numbers of the mounted filesystem: mounts with the same
	// numbers show the same filesystem.
	Major, Minor int
	// MountOptions are the per-mount options (ro, nosuid, ...).
	MountOptions []string
	// SuperOptions are the filesystem's own options (lowerdir=..., upperdir=...), as the
	// kernel wrote them (octal escapes included).
	SuperOptions []string
}

// Option returns the value of key in the superblock options, e.g. Option("upperdir").
func (e Entry) Option(key string) (string, bool) {
	for _, o := range e.SuperOptions {
		if v, ok := strings.CutPrefix(o, key+"="); ok {
			return unescapeOption(v), true
		}
	}
	return "", false
}

// LowerDirs returns the lower dirs of an overlay mount, top first, whether it was mounted with
// the legacy "lowerdir=a:b" form or the "lowerdir+=a,lowerdir+=b" form of the new mount API.
// Data-only lower dirs ("datadir+", or those after "::" in the legacy form) are included:
// they are referenced too.
//
// The kernel writes each option value as it was given, with a comma, space, tab, newline or
// backslash escaped in octal (\054, \040, \011, \012, \134). A legacy "lowerdir=" value is
// itself a list: ':' separates dirs, "::" separates the data-only ones (the empty element
// between is not a dir), and a backslash escapes the next character (a ':' inside a path is
// given as "\:", which mountinfo shows as "\134:").
func (e Entry) LowerDirs() []string {
	if e.FsType != "overlay" {
		return nil
	}
	var dirs []string
	for _, o := range e.SuperOptions {
		switch {
		case strings.HasPrefix(o, "lowerdir="):
			dirs = append(dirs, splitLowerdir(unescapeOctal(strings.TrimPrefix(o, "lowerdir=")))...)
		case strings.HasPrefix(o, "lowerdir+="):
			dirs = append(dirs, unescapeOctal(strings.TrimPrefix(o, "lowerdir+=")))
		case strings.HasPrefix(o, "datadir+="):
			dirs = append(dirs, unescapeOctal(strings.TrimPrefix(o, "datadir+=")))
		}
	}
	return dirs
}

// HasMountOption reports whether a per-mount option such as "ro" is set.
func (e Entry) HasMountOption(opt string) bool {
	for _, o := range e.MountOptions {
		if o == opt {
			return true
		}
	}
	return false
}

// ReferencedPaths lists the paths the mount table keeps in use: the lower dirs (data-only
// ones included) of every overlay, and the source of every bind mount. A bind mount's Root
// is a path inside its filesystem, not one the plugin sees, so its source is listed as seen
// through each mount of the same filesystem whose root contains it. A directory removed
// under one of these mounts would break the pod using it.
func ReferencedPaths(table []Entry) []string {
	type fsDir struct {
		major, minor int
		root         string
	}
	// Where each directory of each filesystem is mounted.
	mountedAt := map[fsDir][]string{}
	for _, e := range table {
		k := fsDir{e.Major, e.Minor, e.Root}
		mountedAt[k] = append(mountedAt[k], e.MountPoint)
	}
	var out []string
	for _, e := range table {
		if e.FsType == "overlay" {
			out = append(out, e.LowerDirs()...)
			continue
		}
		if e.Root == "/" || !path.IsAbs(e.Root) {
			continue
		}
		for dir := e.Root; ; dir = path.Dir(dir) {
			rel := strings.TrimPrefix(strings.TrimPrefix(e.Root, dir), "/")
			for _, mp := range mountedAt[fsDir{e.Major, e.Minor, dir}] {
				out = append(out, path.Join(mp, rel))
			}
			if dir == "/" {
				break
			}
		}
	}
	return out
}

// splitLowerdir splits a legacy "lowerdir=" list (octal escapes already decoded).
func splitLowerdir(s string) []string {
	var out []string
	var cur strings.Builder
	flush := func() {
		if cur.Len() > 0 {
			out = append(out, cur.String())
		}
		cur.Reset()
	}
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\' && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
		case s[i] == ':':
			flush()
		default:
			cur.WriteByte(s[i])
		}
	}
	flush()
	return out
}

func isOctal(b byte) bool { return b >= '0' && b <= '7' }

// unescapeOctal decodes the \ooo escapes the kernel writes in mountinfo fields.
func unescapeOctal(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unescapeOption decodes an option value: octal escapes, then a backslash escaping the next
// character (how overlayfs takes a path given with a ':' or ',' in it).
func unescapeOption(s string) string {
	s = unescapeOctal(s)
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
