// Package extract writes a tar stream (a flattened image, as go-containerregistry's
// mutate.Extract produces it) into a directory, treating every byte of the stream as hostile.
//
// All writes go through an os.Root, so no entry can reach outside the directory whatever the
// stream holds. On top of that the extractor keeps the resulting tree safe to hand to
// overlayfs as a lower dir and to walk on the host:
//   - names that are absolute or climb out with ".." are refused;
//   - device nodes, FIFOs and unknown entry types are refused (a 0/0 character device in a
//     lower dir would act as an overlayfs whiteout);
//   - hardlinks must name a regular file extracted earlier inside the tree;
//   - relative symlinks that climb out of the tree are refused, absolute ones are rewritten
//     into the relative link the image itself would resolve them to, so no link in the tree
//     points at a host path;
//   - an entry below a path that is not a real directory (a symlink or a file from an upper
//     layer) is shadowed and skipped, never written through the link;
//   - setuid and setgid bits are stripped, extended attributes (file capabilities, overlayfs
//     xattrs) are never applied;
//   - every entry is charged against a byte cap before anything is written: a regular file
//     its size rounded up to whole blocks (at least one), every other inode (directory,
//     symlink, hardlink, implied parent directory) one block (BlockSize), so a layer of empty
//     directories costs what it takes on disk; the number of entries is capped too, so
//     decompression bombs stop early.
//
// The stream is read once, in order, through a fixed buffer: memory does not grow with the
// size of the files.
package extract

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrRejected is wrapped by every error caused by the content of the stream (as opposed to
// reading it or writing the disk).
var ErrRejected = errors.New("archive rejected")

// RejectedError says which entry made the archive unacceptable and why.
type RejectedError struct {
	// Entry is the entry name as it appears in the archive; empty for archive-wide limits.
	Entry  string
	Reason string
}

func (e *RejectedError) Error() string {
	if e.Entry == "" {
		return "archive rejected: " + e.Reason
	}
	return fmt.Sprintf("archive rejected: entry %q %s", truncate(e.Entry), e.Reason)
}

// Is makes errors.Is(err, ErrRejected) true.
func (e *RejectedError) Is(target error) bool { return target == ErrRejected }

// ReadError wraps a failure to read the stream itself: a network error below it, a corrupt
// compressed layer, a malformed tar header. The caller decides whether to retry.
type ReadError struct{ Err error }

func (e *ReadError) Error() string { return "reading archive: " + e.Err.Error() }
func (e *ReadError) Unwrap() error { return e.Err }

// BlockSize is what one inode is charged at least: the block size of common filesystems
// (ext4, xfs). A directory, symlink or empty file takes an inode and usually a block.
const BlockSize = 4096

// Charge is what a regular file of size bytes is charged: its size rounded up to whole
// blocks, at least one block.
func Charge(size int64) int64 {
	return max(BlockSize, (size+BlockSize-1)/BlockSize*BlockSize)
}

// Options bound one extraction.
type Options struct {
	// MaxBytes caps what the entries are charged (see BlockSize). Zero means no cap.
	MaxBytes int64
	// MaxEntries caps the number of entries, skipped ones included. Zero means no cap.
	MaxEntries int
	// PreserveOwnership applies the uid/gid of each entry (needs CAP_CHOWN). Without it every
	// file belongs to the extracting user.
	PreserveOwnership bool
}

// Stats describes what an extraction wrote and what it neutralised.
type Stats struct {
	Entries   int
	Files     int
	Dirs      int
	Symlinks  int
	Hardlinks int
	// Bytes is the sum of the regular files' sizes.
	Bytes int64
	// DiskBytes is what the whole tree was charged: regular files rounded up to blocks,
	// every other inode a block (see BlockSize).
	DiskBytes int64
	// RewrittenSymlinks counts absolute symlinks turned into relative ones.
	RewrittenSymlinks int
	// SetIDStripped counts entries whose setuid/setgid bits were removed.
	SetIDStripped int
	// Skipped counts entries not written: shadowed by a non-directory, duplicates, whiteout
	// markers, global headers. SkippedSample names the first few.
	Skipped       int
	SkippedSample []string
}

const (
	maxNameLength      = 4096
	maxComponentLength = 255
	skippedSampleSize  = 8
	copyBufferSize     = 256 << 10
	whiteoutPrefix     = ".wh."
	// maxTrailingBytes is what may follow the end-of-archive marker (tar tools pad to a
	// record size, 10 KiB by default).
	maxTrailingBytes = 1 << 20
)

// Extract reads the tar stream r into the existing directory dir. On error, dir holds a
// partial tree that the caller must remove; nothing outside dir is ever touched.
func Extract(ctx context.Context, r io.Reader, dir string, opts Options) (Stats, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return Stats{}, err
	}
	defer root.Close()
	x := &extractor{
		ctx:          ctx,
		root:         root,
		opts:         opts,
		knownDirs:    map[string]bool{".": true},
		explicitDirs: map[string]bool{},
		buf:          make([]byte, copyBufferSize),
	}
	defer x.closeParent()
	if err := x.run(r); err != nil {
		return x.stats, err
	}
	x.closeParent()
	return x.stats, x.finishDirs()
}

type dirMeta struct {
	name     string
	mode     fs.FileMode
	uid, gid int
	mtime    time.Time
}

type extractor struct {
	ctx   context.Context
	root  *os.Root
	opts  Options
	stats Stats
	// knownDirs are the paths verified (or created) as real directories. Only directories are
	// remembered, so memory grows with the number of directories, not files.
	knownDirs map[string]bool
	// explicitDirs are the directories that had their own entry; dirs holds their mode and
	// times, applied at the end when nothing more is written into them.
	explicitDirs map[string]bool
	dirs         []dirMeta
	// charged sums what every entry is charged (regular files by declared size), skipped
	// ones included.
	charged int64
	buf     []byte
	// parent is the directory of the last regular file written, opened beneath root:
	// archives list a directory's files together, so each file is created by name in its
	// parent rather than by resolving its whole path from root (one lookup per component).
	parent    *os.Root
	parentDir string
}

// parentOf returns the directory to create name's base name in: root itself, or name's
// parent directory (verified a real directory by parentIsDir) opened beneath root.
func (x *extractor) parentOf(name string) (*os.Root, error) {
	dir := path.Dir(name)
	if dir == "." {
		return x.root, nil
	}
	if x.parent != nil && x.parentDir == dir {
		return x.parent, nil
	}
	x.closeParent()
	r, err := x.root.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	x.parent, x.parentDir = r, dir
	return r, nil
}

func (x *extractor) closeParent() {
	if x.parent != nil {
		x.parent.Close()
		x.parent, x.parentDir = nil, ""
	}
}

func (x *extractor) run(r io.Reader) error {
	tr := tar.NewReader(r)
	for {
		if err := x.ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return drain(r)
		}
		if err != nil {
			return &ReadError{Err: err}
		}
		x.stats.Entries++
		if x.opts.MaxEntries > 0 && x.stats.Entries > x.opts.MaxEntries {
			return &RejectedError{Reason: fmt.Sprintf("has more than %d entries (the entry limit)", x.opts.MaxEntries)}
		}
		// Only regular files carry data (the tar reader reads none for directories, links and
		// devices), but every entry takes an inode. The charge is checked before a byte is
		// written, so a bomb stops at its header.
		cost := int64(BlockSize)
		if hdr.Typeflag == tar.TypeReg {
			if x.opts.MaxBytes > 0 && hdr.Size > x.opts.MaxBytes-x.charged {
				return &RejectedError{Entry: hdr.Name, Reason: fmt.Sprintf("(%d bytes) brings the library over the %d byte limit", hdr.Size, x.opts.MaxBytes)}
			}
			cost = Charge(hdr.Size)
		}
		if err := x.charge(hdr.Name, cost); err != nil {
			return err
		}
		if err := x.entry(tr, hdr); err != nil {
			return err
		}
	}
}

// charge counts cost against the byte cap; what is not written is charged too, so the cap
// is checked before the work.
func (x *extractor) charge(name string, cost int64) error {
	if x.opts.MaxBytes > 0 && cost > x.opts.MaxBytes-x.charged {
		return &RejectedError{Entry: name, Reason: fmt.Sprintf("brings the library over the %d byte limit (every file is charged its size rounded up to %d byte blocks, every directory, link and empty file one block)", x.opts.MaxBytes, BlockSize)}
	}
	x.charged += cost
	x.stats.DiskBytes = x.charged
	return nil
}

// drain reads what follows the end-of-archive marker. A producer that fails after writing
// the marker (mutate.Extract closes its tar writer before reporting an error through the
// pipe) reports the failure only there, and a valid archive has little or nothing after it.
func drain(r io.Reader) error {
	n, err := io.Copy(io.Discard, io.LimitReader(r, maxTrailingBytes+1))
	if err != nil {
		return &ReadError{Err: err}
	}
	if n > maxTrailingBytes {
		return &RejectedError{Reason: fmt.Sprintf("has more than %d bytes after the end of the archive", maxTrailingBytes)}
	}
	return nil
}

func (x *extractor) entry(tr *tar.Reader, hdr *tar.Header) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		x.skip(hdr.Name)
		return nil
	}
	name, err := cleanName(hdr.Name)
	if err != nil {
		return err
	}
	if name == "." {
		// The root of the archive: the caller owns the mode of the directory it gave us.
		x.skip(hdr.Name)
		return nil
	}
	if strings.HasPrefix(path.Base(name), whiteoutPrefix) {
		// Whiteout markers belong to layer flattening, never to content.
		x.skip(name)
		return nil
	}
	switch hdr.Typeflag {
	case tar.TypeReg:
	case tar.TypeDir, tar.TypeSymlink, tar.TypeLink:
	case tar.TypeChar, tar.TypeBlock:
		return &RejectedError{Entry: name, Reason: "is a device node; library images may hold only files, directories and links"}
	case tar.TypeFifo:
		return &RejectedError{Entry: name, Reason: "is a FIFO; library images may hold only files, directories and links"}
	default:
		return &RejectedError{Entry: name, Reason: fmt.Sprintf("has the unsupported tar type %q", hdr.Typeflag)}
	}
	ok, err := x.parentIsDir(name)
	if err != nil {
		return err
	}
	if !ok {
		// A symlink or a file sits where a parent directory should be: this entry is
		// shadowed (as overlayfs would hide it), and writing it would follow the link.
		x.skip(name)
		return nil
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		return x.dir(name, hdr)
	case tar.TypeSymlink:
		return x.symlink(name, hdr)
	case tar.TypeLink:
		return x.hardlink(name, hdr)
	default:
		return x.file(tr, name, hdr)
	}
}

// cleanName returns the clean relative path of an entry, "." for the archive root.
func cleanName(raw string) (string, error) {
	if raw == "" {
		return "", &RejectedError{Entry: raw, Reason: "has an empty name"}
	}
	if len(raw) > maxNameLength {
		return "", &RejectedError{Entry: raw, Reason: fmt.Sprintf("has a name longer than %d bytes", maxNameLength)}
	}
	if strings.IndexByte(raw, 0) >= 0 {
		return "", &RejectedError{Entry: raw, Reason: "has a NUL byte in its name"}
	}
	name := path.Clean(raw)
	if path.IsAbs(name) {
		if name == "/" {
			return ".", nil
		}
		return "", &RejectedError{Entry: raw, Reason: "has an absolute path; entries must be relative to the image root"}
	}
	if name == "." {
		return name, nil
	}
	if !filepath.IsLocal(name) {
		return "", &RejectedError{Entry: raw, Reason: "climbs out of the image root with \"..\""}
	}
	for _, c := range strings.Split(name, "/") {
		if len(c) > maxComponentLength {
			return "", &RejectedError{Entry: raw, Reason: fmt.Sprintf("has a path component longer than %d bytes", maxComponentLength)}
		}
	}
	return name, nil
}

// parentIsDir makes sure every parent of name is a real directory, creating missing ones.
// It returns false when a parent is a symlink or a file.
func (x *extractor) parentIsDir(name string) (bool, error) {
	parent := path.Dir(name)
	if x.knownDirs[parent] {
		return true, nil
	}
	var prefix string
	for _, c := range strings.Split(parent, "/") {
		if prefix == "" {
			prefix = c
		} else {
			prefix += "/" + c
		}
		if x.knownDirs[prefix] {
			continue
		}
		fi, err := x.root.Lstat(prefix)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			// Layers need not list every parent (and mutate.Extract emits upper layers
			// first), so missing parents are created with a conventional mode.
			if err := x.charge(prefix, BlockSize); err != nil {
				return false, err
			}
			if err := x.root.Mkdir(prefix, 0o755); err != nil {
				return false, fmt.Errorf("extracting %q: %w", name, err)
			}
			// Explicitly, whatever the umask: a pod's user must be able to traverse it.
			if err := x.root.Chmod(prefix, 0o755); err != nil {
				return false, fmt.Errorf("extracting %q: %w", name, err)
			}
		case err != nil:
			return false, fmt.Errorf("extracting %q: %w", name, err)
		case !fi.IsDir():
			return false, nil
		}
		x.knownDirs[prefix] = true
	}
	return true, nil
}

func (x *extractor) skip(name string) {
	x.stats.Skipped++
	if len(x.stats.SkippedSample) < skippedSampleSize {
		x.stats.SkippedSample = append(x.stats.SkippedSample, truncate(name))
	}
}

// mode returns the permission bits to apply: setuid and setgid are dropped, sticky is kept.
func (x *extractor) mode(hdr *tar.Header) fs.FileMode {
	m := hdr.FileInfo().Mode()
	if m&(fs.ModeSetuid|fs.ModeSetgid) != 0 {
		x.stats.SetIDStripped++
	}
	return m.Perm() | m&fs.ModeSticky
}

func (x *extractor) file(tr *tar.Reader, name string, hdr *tar.Header) error {
	dir, err := x.parentOf(name)
	if err != nil {
		return fmt.Errorf("extracting %q: %w", name, err)
	}
	f, err := dir.OpenFile(path.Base(name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		// First entry wins: mutate.Extract emits upper layers first.
		x.skip(name)
		return nil
	}
	if err != nil {
		return fmt.Errorf("extracting %q: %w", name, err)
	}
	err = x.copy(f, tr, hdr.Size)
	if err == nil && x.opts.PreserveOwnership {
		err = f.Chown(hdr.Uid, hdr.Gid)
	}
	if err == nil {
		// After chown, which may clear mode bits.
		err = f.Chmod(x.mode(hdr))
	}
	if err == nil {
		// Last: nothing writes the file after this.
		err = setTimes(f, hdr)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		var re *ReadError
		if errors.As(err, &re) || x.ctx.Err() != nil {
			return err
		}
		return fmt.Errorf("extracting %q: %w", name, err)
	}
	x.stats.Files++
	x.stats.Bytes += hdr.Size
	return nil
}

// copy streams exactly n bytes through a fixed buffer, checking for cancellation between
// chunks so that closing the cache stops a large file promptly.
func (x *extractor) copy(w io.Writer, r io.Reader, n int64) error {
	for n > 0 {
		if err := x.ctx.Err(); err != nil {
			return err
		}
		chunk := x.buf[:min(int64(len(x.buf)), n)]
		read, err := io.ReadFull(r, chunk)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return &ReadError{Err: err}
		}
		if _, err := w.Write(chunk[:read]); err != nil {
			return err
		}
		n -= int64(read)
	}
	return nil
}

// setTimes gives the open file f the entry's times. Tracers compare timestamps (Python
// checks .pyc files against their sources), so the image's modification times are kept.
func setTimes(f *os.File, hdr *tar.Header) error {
	if hdr.ModTime.IsZero() {
		return nil
	}
	atime := hdr.AccessTime
	if atime.IsZero() {
		atime = hdr.ModTime
	}
	var ts [2]unix.Timespec
	var err error
	if ts[0], err = unix.TimeToTimespec(atime); err != nil {
		return err
	}
	if ts[1], err = unix.TimeToTimespec(hdr.ModTime); err != nil {
		return err
	}
	// utimensat(fd, NULL, times, 0) is futimens(3): it sets the times of fd itself.
	if _, _, errno := unix.Syscall6(unix.SYS_UTIMENSAT, f.Fd(), 0, uintptr(unsafe.Pointer(&ts)), 0, 0, 0); errno != 0 {
		return &os.PathError{Op: "futimens", Path: f.Name(), Err: errno}
	}
	return nil
}

func (x *extractor) dir(name string, hdr *tar.Header) error {
	err := x.root.Mkdir(name, 0o700)
	if errors.Is(err, fs.ErrExist) {
		fi, lerr := x.root.Lstat(name)
		if lerr != nil {
			return fmt.Errorf("extracting %q: %w", name, lerr)
		}
		if !fi.IsDir() || x.explicitDirs[name] {
			x.skip(name)
			return nil
		}
		// Created implicitly as the parent of an earlier entry: this entry gives its mode.
	} else if err != nil {
		return fmt.Errorf("extracting %q: %w", name, err)
	}
	x.knownDirs[name] = true
	x.explicitDirs[name] = true
	x.dirs = append(x.dirs, dirMeta{name: name, mode: x.mode(hdr), uid: hdr.Uid, gid: hdr.Gid, mtime: hdr.ModTime})
	x.stats.Dirs++
	return nil
}

func (x *extractor) symlink(name string, hdr *tar.Header) error {
	target := hdr.Linkname
	if target == "" || len(target) > maxNameLength || strings.IndexByte(target, 0) >= 0 {
		return &RejectedError{Entry: name, Reason: "is a symlink with an empty, over-long or NUL-containing target"}
	}
	if path.IsAbs(target) {
		// An absolute link means "from the image root": keep that meaning without naming a
		// host path.
		abs := strings.TrimPrefix(path.Clean(target), "/")
		if abs == "" {
			abs = "."
		}
		rel, err := filepath.Rel(path.Dir(name), abs)
		if err != nil {
			return &RejectedError{Entry: name, Reason: fmt.Sprintf("is a symlink to %q that cannot be made relative: %v", truncate(target), err)}
		}
		target = rel
		x.stats.RewrittenSymlinks++
	} else if resolved := path.Join(path.Dir(name), target); !filepath.IsLocal(resolved) { //nolint:gosec // G305: this is the traversal check; a relative target must stay below the image root
		return &RejectedError{Entry: name, Reason: fmt.Sprintf("is a symlink to %q, which points outside the image root", truncate(hdr.Linkname))}
	}
	err := x.root.Symlink(target, name)
	if errors.Is(err, fs.ErrExist) {
		x.skip(name)
		return nil
	}
	if err != nil {
		return fmt.Errorf("extracting %q: %w", name, err)
	}
	if x.opts.PreserveOwnership {
		if err := x.root.Lchown(name, hdr.Uid, hdr.Gid); err != nil {
			return fmt.Errorf("extracting %q: %w", name, err)
		}
	}
	x.stats.Symlinks++
	return nil
}

func (x *extractor) hardlink(name string, hdr *tar.Header) error {
	raw := hdr.Linkname
	if raw == "" || len(raw) > maxNameLength || strings.IndexByte(raw, 0) >= 0 {
		return &RejectedError{Entry: name, Reason: "is a hardlink with an empty, over-long or NUL-containing target"}
	}
	target := path.Clean(raw)
	if path.IsAbs(target) || !filepath.IsLocal(target) {
		return &RejectedError{Entry: name, Reason: fmt.Sprintf("is a hardlink to %q, outside the image root", truncate(raw))}
	}
	// The target must sit under directories this extraction verified, so the link never
	// resolves through a symlink, and must be a regular file written earlier.
	if !x.knownDirs[path.Dir(target)] {
		return &RejectedError{Entry: name, Reason: fmt.Sprintf("is a hardlink to %q, which is not a regular file earlier in the image", truncate(raw))}
	}
	fi, err := x.root.Lstat(target)
	if err != nil || !fi.Mode().IsRegular() {
		return &RejectedError{Entry: name, Reason: fmt.Sprintf("is a hardlink to %q, which is not a regular file earlier in the image", truncate(raw))}
	}
	err = x.root.Link(target, name)
	if errors.Is(err, fs.ErrExist) {
		x.skip(name)
		return nil
	}
	if err != nil {
		return fmt.Errorf("extracting %q: %w", name, err)
	}
	x.stats.Hardlinks++
	return nil
}

// finishDirs applies directory modes, owners and times once nothing more is written: deepest
// first, so a read-only parent never blocks work on its children.
func (x *extractor) finishDirs() error {
	slices.SortFunc(x.dirs, func(a, b dirMeta) int {
		return strings.Count(b.name, "/") - strings.Count(a.name, "/")
	})
	for _, d := range x.dirs {
		if x.opts.PreserveOwnership {
			if err := x.root.Lchown(d.name, d.uid, d.gid); err != nil {
				return fmt.Errorf("extracting %q: %w", d.name, err)
			}
		}
		if err := x.root.Chmod(d.name, d.mode); err != nil {
			return fmt.Errorf("extracting %q: %w", d.name, err)
		}
		if !d.mtime.IsZero() {
			if err := x.root.Chtimes(d.name, d.mtime, d.mtime); err != nil {
				return fmt.Errorf("extracting %q: %w", d.name, err)
			}
		}
	}
	return nil
}

func truncate(s string) string {
	if len(s) > 120 {
		return s[:120] + "..."
	}
	return s
}
