//go:build linux

package fdpath

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// both runs f with openat2 and with the per-component walk of older kernels.
func both(t *testing.T, f func(t *testing.T)) {
	t.Run("openat2", f)
	t.Run("walk", func(t *testing.T) {
		noOpenat2.Store(true)
		defer noOpenat2.Store(false)
		f(t)
	})
}

func openDir(t *testing.T, p string) int {
	t.Helper()
	fd, err := unix.Open(p, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func TestOpenNeverFollowsLinks(t *testing.T) {
	both(t, func(t *testing.T) {
		root := t.TempDir()
		outside := t.TempDir()
		must(t, os.MkdirAll(filepath.Join(root, "a", "b"), 0o755))
		must(t, os.WriteFile(filepath.Join(root, "a", "b", "f"), nil, 0o644))
		must(t, os.Symlink(outside, filepath.Join(root, "a", "link")))
		must(t, os.Symlink(filepath.Join(root, "a", "b", "f"), filepath.Join(root, "a", "flink")))
		dir := openDir(t, root)

		fd, err := Open(dir, "a/b/f", unix.O_PATH)
		if err != nil {
			t.Fatal(err)
		}
		if got := Path(fd); got != filepath.Join(root, "a", "b", "f") {
			t.Fatalf("opened %s", got)
		}
		unix.Close(fd)

		for _, rel := range []string{"a/link", "a/link/x", "a/flink"} {
			if fd, err := Open(dir, rel, unix.O_PATH); !errors.Is(err, ErrLink) {
				if err == nil {
					unix.Close(fd)
				}
				t.Errorf("Open(%s) = %v, want ErrLink", rel, err)
			}
		}
		if _, err := Open(dir, "a/missing", unix.O_PATH); !errors.Is(err, unix.ENOENT) || !errors.Is(err, os.ErrNotExist) {
			t.Errorf("missing: %v", err)
		}
		for _, rel := range []string{"", "/etc", "a/../a/b", "./a", "a//b", "a/b/"} {
			if _, err := Open(dir, rel, unix.O_PATH); err == nil {
				t.Errorf("Open(%q) accepted", rel)
			}
		}
	})
}

func TestMkdirAllCreatesBelowVerifiedParents(t *testing.T) {
	both(t, func(t *testing.T) {
		root := t.TempDir()
		outside := t.TempDir()
		dir := openDir(t, root)
		fd, err := MkdirAll(dir, "x/y/z", 0o750)
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(fd)
		if fi, err := os.Stat(filepath.Join(root, "x", "y", "z")); err != nil || !fi.IsDir() {
			t.Fatalf("not created: %v", err)
		}
		must(t, os.Symlink(outside, filepath.Join(root, "l")))
		if _, err := MkdirAll(dir, "l/y", 0o750); !errors.Is(err, ErrLink) {
			t.Fatalf("MkdirAll through a link: %v", err)
		}
		if entries, _ := os.ReadDir(outside); len(entries) != 0 {
			t.Fatalf("created through the link: %v", entries)
		}
	})
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
