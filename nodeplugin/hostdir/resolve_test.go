//go:build linux

package hostdir

import (
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// mustSet builds a set; entries that declare no tenancy get every namespace, which these
// path tests do not exercise.
func mustSet(t *testing.T, entries ...Entry) *Set {
	t.Helper()
	for i := range entries {
		if len(entries[i].Namespaces) == 0 {
			entries[i].Namespaces = []string{"*"}
		}
	}
	s, err := NewSet(entries)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func mustResolve(t *testing.T, entries ...Entry) *Sources {
	t.Helper()
	srcs, err := Resolve(mustSet(t, entries...))
	if err != nil {
		t.Fatal(err)
	}
	return srcs
}

func listenUnix(t *testing.T, path string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
}

// openKind opens the source and returns its type, closing the descriptor.
func openKind(s *Source) (fs.FileMode, error) {
	fd, kind, err := s.Open()
	if err == nil {
		unix.Close(fd)
	}
	return kind, err
}

func TestSourceOpen(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	listenUnix(t, sock)
	tests := []struct {
		name    string
		entry   Entry
		want    fs.FileMode
		wantErr error
	}{
		{name: "dir", entry: Entry{Name: "d", Path: dir}, want: fs.ModeDir},
		{name: "file", entry: Entry{Name: "f", Path: file}, want: 0},
		{name: "socket", entry: Entry{Name: "s", Path: sock}, want: fs.ModeSocket},
		{name: "missing", entry: Entry{Name: "m", Path: filepath.Join(dir, "missing")}, wantErr: ErrSourceMissing},
		{name: "created", entry: Entry{Name: "c", Path: filepath.Join(dir, "a", "b"), Create: true}, want: fs.ModeDir},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := openKind(mustResolve(t, tt.entry).Get(tt.entry.Name))
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("error = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Open() = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

// TestResolveFollowsTheAdministratorsLinksOnce: a link in the configured path (/var/run ->
// /run on most hosts) is resolved at start, and the entry then works through the real path.
func TestResolveFollowsTheAdministratorsLinksOnce(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "run", "agent")
	if err := os.MkdirAll(real, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(dir, "run"), filepath.Join(dir, "varrun")); err != nil {
		t.Fatal(err)
	}
	srcs := mustResolve(t, Entry{Name: "agent", Path: filepath.Join(dir, "varrun", "agent")})
	s := srcs.Get("agent")
	if s.Resolved != real {
		t.Fatalf("resolved to %s, want %s", s.Resolved, real)
	}
	if kind, err := openKind(s); err != nil || kind != fs.ModeDir {
		t.Fatalf("Open() = %v, %v", kind, err)
	}
}

// TestResolveRefusesEntriesInsideChangeableEntries: an entry inside a writable entry, or
// inside one created on demand, is refused at start with both names; inside a read-only one,
// or at the same path, it is fine.
func TestResolveRefusesEntriesInsideChangeableEntries(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "apm.socket")
	listenUnix(t, sock)
	if err := os.Symlink(dir, filepath.Join(t.TempDir(), "alias")); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		entries []Entry
		wantErr []string
	}{
		{
			name:    "socket inside a writable dir",
			entries: []Entry{{Name: "apm-socket-dir", Path: dir}, {Name: "apm-socket", Path: sock}},
			wantErr: []string{`hostdir "apm-socket"`, `hostdir "apm-socket-dir"`, "writable"},
		},
		{
			name:    "socket inside a read-only dir with create",
			entries: []Entry{{Name: "apm-socket-dir", Path: dir, ReadOnly: true, Create: true}, {Name: "apm-socket", Path: sock}},
			wantErr: []string{`hostdir "apm-socket"`, `hostdir "apm-socket-dir"`, "create"},
		},
		{
			name:    "dir inside a writable dir, not yet created",
			entries: []Entry{{Name: "outer", Path: dir}, {Name: "inner", Path: filepath.Join(dir, "later", "x"), Create: true}},
			wantErr: []string{`hostdir "inner"`, `hostdir "outer"`},
		},
		{
			name:    "socket inside a read-only dir",
			entries: []Entry{{Name: "apm-socket-dir", Path: dir, ReadOnly: true}, {Name: "apm-socket", Path: sock}},
		},
		{
			name:    "two entries on one path",
			entries: []Entry{{Name: "a", Path: dir}, {Name: "b", Path: dir, ReadOnly: true}},
		},
		{
			name:    "writable entry and an unrelated one with a common prefix",
			entries: []Entry{{Name: "a", Path: dir}, {Name: "b", Path: dir + "-other", Create: true}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Resolve(mustSet(t, tt.entries...))
			if len(tt.wantErr) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatal("nested entries accepted")
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

// TestSourceRefusesASwappedPath: a socket replaced by a link to a sensitive directory, by a
// directory or by a regular file, or a parent directory replaced by a link, is refused with
// ErrSourceChanged and no descriptor.
func TestSourceRefusesASwappedPath(t *testing.T) {
	sensitive := t.TempDir()
	tests := []struct {
		name string
		swap func(t *testing.T, dir, sock string)
	}{
		{"socket replaced by a link", func(t *testing.T, dir, sock string) {
			must(t, os.Remove(sock))
			must(t, os.Symlink(sensitive, sock))
		}},
		{"socket replaced by a directory", func(t *testing.T, dir, sock string) {
			must(t, os.Remove(sock))
			must(t, os.Mkdir(sock, 0o755))
		}},
		{"socket replaced by a file", func(t *testing.T, dir, sock string) {
			must(t, os.Remove(sock))
			must(t, os.WriteFile(sock, nil, 0o644))
		}},
		{"parent replaced by a link", func(t *testing.T, dir, sock string) {
			must(t, os.Rename(dir, dir+".old"))
			must(t, os.Symlink(sensitive, dir))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "datadog")
			must(t, os.Mkdir(dir, 0o755))
			sock := filepath.Join(dir, "apm.socket")
			listenUnix(t, sock)
			s := mustResolve(t, Entry{Name: "apm-socket", Path: sock}).Get("apm-socket")
			if kind, err := openKind(s); err != nil || kind != fs.ModeSocket {
				t.Fatalf("before the swap: %v, %v", kind, err)
			}
			tt.swap(t, dir, sock)
			fd, _, err := s.Open()
			if err == nil {
				unix.Close(fd)
				t.Fatal("a swapped host path was opened")
			}
			if !errors.Is(err, ErrSourceChanged) || !strings.Contains(err.Error(), "apm-socket") {
				t.Fatalf("error = %v, want ErrSourceChanged naming the entry", err)
			}
		})
	}
}

// TestSourceMissingAtStartKeepsItsFirstType: a socket the agent creates after the plugin
// started is served, and is then pinned to being a socket.
func TestSourceMissingAtStartKeepsItsFirstType(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "apm.socket")
	s := mustResolve(t, Entry{Name: "apm-socket", Path: sock}).Get("apm-socket")
	if _, err := openKind(s); !errors.Is(err, ErrSourceMissing) {
		t.Fatalf("missing socket: %v", err)
	}
	l, err := net.Listen("unix", sock)
	must(t, err)
	if kind, err := openKind(s); err != nil || kind != fs.ModeSocket {
		t.Fatalf("socket created later: %v, %v", kind, err)
	}
	l.Close()
	os.Remove(sock)
	must(t, os.Mkdir(sock, 0o755))
	if _, err := openKind(s); !errors.Is(err, ErrSourceChanged) {
		t.Fatalf("socket replaced by a directory after its first use: %v", err)
	}
}

// TestSourceCreateDoesNotFollowLinks: a create entry whose parent became a link is not
// created through it.
func TestSourceCreateDoesNotFollowLinks(t *testing.T) {
	dir := t.TempDir()
	elsewhere := t.TempDir()
	s := mustResolve(t, Entry{Name: "demo", Path: filepath.Join(dir, "a", "demo"), Create: true}).Get("demo")
	must(t, os.Symlink(elsewhere, filepath.Join(dir, "a")))
	if _, err := openKind(s); !errors.Is(err, ErrSourceChanged) {
		t.Fatalf("create through a link: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(elsewhere, "demo")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the directory was created through the link: %v", err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
