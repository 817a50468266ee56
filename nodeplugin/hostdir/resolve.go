//go:build linux

package hostdir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/fdpath"
)

// ErrSourceMissing is returned by Source.Open when the entry's path does not exist and the
// entry does not ask for it to be created.
var ErrSourceMissing = errors.New("host path does not exist")

// ErrSourceChanged is returned by Source.Open when the entry's path now leads through a
// symbolic link, or is not the kind of file it was when the node plugin started.
var ErrSourceChanged = errors.New("host path changed since the node plugin started")

// ErrSourceKind is returned by Source.Open when a path that was missing at start turned out to
// be neither a directory, a regular file nor a unix socket.
var ErrSourceKind = errors.New("host path is not a directory, regular file or unix socket")

// Source is an entry whose path was resolved once, at start: the administrator's own symbolic
// links are followed then, and never again. At publish time the path is opened from the host
// root without following any link, and must still be the kind of file it was.
type Source struct {
	Entry Entry
	// Resolved is the entry's path with every symbolic link resolved, at start. A path that
	// did not exist yet is resolved up to its nearest existing ancestor.
	Resolved string

	mu sync.Mutex
	// kind is the file type (fs.ModeDir, fs.ModeSocket, or 0 for a regular file), known
	// when the path existed at start or was first opened.
	kind  fs.FileMode
	known bool
}

// Kind names the file type the entry is pinned to, for logs.
func (s *Source) Kind() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.known {
		return "missing (its type is fixed when it is first mounted)"
	}
	return kindName(s.kind)
}

// Sources are the resolved entries of a Set, by name.
type Sources struct {
	byName map[string]*Source
	names  []string
}

// Resolve resolves every entry of set and checks that no entry lies inside another entry whose
// content pods can change: a writable entry, or one created on demand. Inside such an entry a
// pod could replace the other entry's file with a link or another file, and have the next pod
// that mounts the other entry get something else. The error names both entries.
func Resolve(set *Set) (*Sources, error) {
	out := &Sources{byName: map[string]*Source{}}
	if set == nil {
		return out, nil
	}
	for _, name := range set.Names() {
		e, err := set.Lookup(name)
		if err != nil {
			return nil, err
		}
		src, err := resolveEntry(e)
		if err != nil {
			return nil, err
		}
		out.byName[name] = src
		out.names = append(out.names, name)
	}
	for _, outer := range out.names {
		a := out.byName[outer]
		if a.Entry.ReadOnly && !a.Entry.Create {
			continue
		}
		for _, inner := range out.names {
			b := out.byName[inner]
			if inner == outer || !strings.HasPrefix(b.Resolved, a.Resolved+"/") {
				continue
			}
			var why []string
			if !a.Entry.ReadOnly {
				why = append(why, "writable")
			}
			if a.Entry.Create {
				why = append(why, "created on demand (create)")
			}
			return nil, fmt.Errorf("hostdir %q (%s) lies inside hostdir %q (%s), which is %s: a pod that mounts %q could replace %s with a link or another file, and pods mounting %q would get that instead. Declare %q read-only and without create, or drop one of the two entries",
				inner, b.Resolved, outer, a.Resolved, strings.Join(why, " and "), outer, b.Resolved, inner, outer)
		}
	}
	return out, nil
}

// Names returns the resolved entries' names, sorted.
func (s *Sources) Names() []string { return s.names }

// Get returns the resolved entry called name, or nil.
func (s *Sources) Get(name string) *Source { return s.byName[name] }

// resolveEntry resolves e's path, following the administrator's links once.
func resolveEntry(e Entry) (*Source, error) {
	resolved, exists, err := resolvePath(e.Path)
	if err != nil {
		return nil, fmt.Errorf("hostdir %q: resolving %s: %w", e.Name, e.Path, err)
	}
	if resolved == "/" {
		return nil, fmt.Errorf("hostdir %q: %s resolves to the host root, which cannot be shared", e.Name, e.Path)
	}
	s := &Source{Entry: e, Resolved: resolved}
	switch {
	case exists:
		fi, err := os.Lstat(resolved)
		if err != nil {
			return nil, fmt.Errorf("hostdir %q: %w", e.Name, err)
		}
		s.kind, s.known = fi.Mode().Type(), true
		if !shareable(s.kind) {
			return nil, fmt.Errorf("hostdir %q: %s (resolved from %s) is a %s; only directories, regular files and unix sockets can be shared", e.Name, resolved, e.Path, kindName(s.kind))
		}
		if e.Create && s.kind != fs.ModeDir {
			return nil, fmt.Errorf("hostdir %q: %s is a %s, but create is for directories", e.Name, resolved, kindName(s.kind))
		}
	case e.Create:
		s.kind, s.known = fs.ModeDir, true
	}
	return s, nil
}

// resolvePath returns p with every symbolic link resolved; for a path that does not exist,
// its nearest existing ancestor resolved and the missing names appended.
func resolvePath(p string) (resolved string, exists bool, err error) {
	r, err := filepath.EvalSymlinks(p)
	if err == nil {
		return r, true, nil
	}
	if !errors.Is(err, fs.ErrNotExist) || p == "/" {
		return "", false, err
	}
	if _, lerr := os.Lstat(p); lerr == nil {
		return "", false, fmt.Errorf("%s is a symbolic link to a missing path; point the entry at the real path", p)
	}
	parent, _, err := resolvePath(filepath.Dir(p))
	if err != nil {
		return "", false, err
	}
	return filepath.Join(parent, filepath.Base(p)), false, nil
}

func shareable(kind fs.FileMode) bool {
	return kind == fs.ModeDir || kind == fs.ModeSocket || kind == 0
}

func kindName(kind fs.FileMode) string {
	switch kind {
	case fs.ModeDir:
		return "directory"
	case fs.ModeSocket:
		return "unix socket"
	case 0:
		return "regular file"
	case fs.ModeSymlink:
		return "symbolic link"
	case fs.ModeNamedPipe:
		return "named pipe"
	case fs.ModeDevice, fs.ModeDevice | fs.ModeCharDevice:
		return "device"
	}
	return "special file"
}

func modeOf(st *unix.Stat_t) fs.FileMode {
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return fs.ModeDir
	case unix.S_IFSOCK:
		return fs.ModeSocket
	case unix.S_IFREG:
		return 0
	case unix.S_IFLNK:
		return fs.ModeSymlink
	case unix.S_IFIFO:
		return fs.ModeNamedPipe
	case unix.S_IFCHR:
		return fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		return fs.ModeDevice
	}
	return fs.ModeIrregular
}

// Open opens the entry's host path for a bind mount and returns an O_PATH descriptor (the
// caller closes it) and its file type. The path is opened from the host root along its
// resolved path without following any link (openat2 RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS);
// a create entry's missing directories are made with mkdirat relative to their verified
// parent. A path that now leads through a link, or that is not the kind of file it was at
// start (a socket replaced by a directory, say), is refused with ErrSourceChanged.
func (s *Source) Open() (int, fs.FileMode, error) {
	root, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, 0, fmt.Errorf("hostdir %q: open the root: %w", s.Entry.Name, err)
	}
	defer unix.Close(root)
	rel := strings.TrimPrefix(s.Resolved, "/")
	fd, err := fdpath.Open(root, rel, unix.O_PATH)
	if errors.Is(err, unix.ENOENT) && s.Entry.Create {
		fd, err = fdpath.MkdirAll(root, rel, 0o755)
	}
	switch {
	case errors.Is(err, unix.ENOENT):
		return -1, 0, fmt.Errorf("hostdir %q: %s: %w (declare it with ,create to have it created)", s.Entry.Name, s.Resolved, ErrSourceMissing)
	case errors.Is(err, fdpath.ErrLink), errors.Is(err, unix.ENOTDIR):
		return -1, 0, fmt.Errorf("hostdir %q: %s: %w: the path now leads through a symbolic link or a non-directory (it resolved without one when the node plugin started); links are not followed after start. Restore the host path, or restart the node plugin if the administrator changed it", s.Entry.Name, s.Resolved, ErrSourceChanged)
	case err != nil:
		return -1, 0, fmt.Errorf("hostdir %q: %w", s.Entry.Name, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("hostdir %q: %w", s.Entry.Name, err)
	}
	kind := modeOf(&st)
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case !s.known && shareable(kind):
		// Missing at start (a socket the agent had not created yet): its type is fixed now.
		s.kind, s.known = kind, true
	case !s.known:
		unix.Close(fd)
		return -1, 0, fmt.Errorf("hostdir %q: %s is a %s: %w", s.Entry.Name, s.Resolved, kindName(kind), ErrSourceKind)
	case kind != s.kind:
		unix.Close(fd)
		return -1, 0, fmt.Errorf("hostdir %q: %s: %w: it was a %s and is now a %s; refused. Restore it, or restart the node plugin if the administrator changed it", s.Entry.Name, s.Resolved, ErrSourceChanged, kindName(s.kind), kindName(kind))
	}
	return fd, kind, nil
}
