package mounter

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/apm-csi/apm-csi/test/testenv"
	"golang.org/x/sys/unix"
)

// TestLowerDirsOfARealOverlay mounts an overlay whose lower dirs hold a ':', a ',', a space and
// a backslash, with a data-only layer, and reads them back from the kernel's mount table.
func TestLowerDirsOfARealOverlay(t *testing.T) {
	testenv.RequireRoot(t)
	base := t.TempDir()
	dirs := map[string]string{}
	for _, n := range []string{"a:x", "d,e", "h i", `f\g`, "data", "mnt"} {
		dirs[n] = filepath.Join(base, n)
		if err := os.Mkdir(dirs[n], 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// mount(2)'s form: a backslash escapes ':', ',' and itself; "::" starts the data-only layers.
	esc := func(p string) string {
		out := ""
		for _, r := range p {
			if r == ':' || r == ',' || r == '\\' {
				out += `\`
			}
			out += string(r)
		}
		return out
	}
	data := "lowerdir=" + esc(dirs["a:x"]) + ":" + esc(dirs["d,e"]) + ":" + esc(dirs["h i"]) + ":" + esc(dirs[`f\g`]) + "::" + esc(dirs["data"])
	if err := unix.Mount("overlay", dirs["mnt"], "overlay", unix.MS_RDONLY, data); err != nil {
		t.Fatalf("mounting an overlay with a data-only layer (Linux 6.7+): %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dirs["mnt"], unix.MNT_DETACH) })
	table, err := New().MountTable()
	if err != nil {
		t.Fatal(err)
	}
	var found *Entry
	for i := range table {
		if table[i].MountPoint == dirs["mnt"] {
			found = &table[i]
		}
	}
	if found == nil {
		t.Fatalf("no mount at %s", dirs["mnt"])
	}
	want := []string{dirs["a:x"], dirs["d,e"], dirs["h i"], dirs[`f\g`], dirs["data"]}
	if got := found.LowerDirs(); !reflect.DeepEqual(got, want) {
		t.Fatalf("LowerDirs() = %q, want %q (options %q)", got, want, found.SuperOptions)
	}
}

// TestMounterRunsUmountOnlyWhenTheFallbackNeedsIt: making the mounter and using it as
// start-up does (OwnMount, IsMountPointAt on a current kernel) runs no program; mount-utils'
// mount point check, which runs umount(8) once when it is made, is made when first needed.
// umount is a script in PATH that records each run.
func TestMounterRunsUmountOnlyWhenTheFallbackNeedsIt(t *testing.T) {
	testenv.RequireRoot(t)
	bin := t.TempDir()
	ran := filepath.Join(bin, "ran")
	script := "#!/bin/sh\necho run >> " + ran + "\necho \"umount: $1: not mounted.\" >&2\nexit 32\n"
	if err := os.WriteFile(filepath.Join(bin, "umount"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin)
	runs := func() int {
		data, err := os.ReadFile(ran)
		if os.IsNotExist(err) {
			return 0
		}
		if err != nil {
			t.Fatal(err)
		}
		return len(data) / len("run\n")
	}

	m := New()
	dir := filepath.Join(t.TempDir(), "own")
	release, err := OwnMount(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = release() })
	parent, err := unix.Open(filepath.Dir(dir), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(parent)
	if mounted, err := m.IsMountPointAt(parent, filepath.Base(dir)); err != nil || !mounted {
		t.Fatalf("IsMountPointAt(own mount) = %v, %v; want true", mounted, err)
	}
	if n := runs(); n != 0 {
		t.Fatalf("umount ran %d times while making the mounter and checking a mount with statx; want 0", n)
	}

	// The path-based check needs mount-utils' detector: made once, on this first use.
	for range 2 {
		if mounted, err := m.IsMountPoint(dir); err != nil || !mounted {
			t.Fatalf("IsMountPoint(own mount) = %v, %v; want true", mounted, err)
		}
	}
	if n := runs(); n != 1 {
		t.Fatalf("umount ran %d times after two path-based checks; want 1 (the detector, made once)", n)
	}
}

// TestEmptyMountIsAnEmptyReadOnlyMountOfItsOwn: EmptyMount gives the dir a mount of its own
// that is empty and refuses writes; made again while it is there, it stacks nothing (and that
// release does nothing); its release unmounts it, and the dir's own content, hidden
// meanwhile, is there again.
func TestEmptyMountIsAnEmptyReadOnlyMountOfItsOwn(t *testing.T) {
	testenv.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "empty")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "hidden"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	m := New()
	release, err := m.EmptyMount(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	if mounted, err := m.IsMountPoint(dir); err != nil || !mounted {
		t.Fatalf("IsMountPoint after EmptyMount = %v, %v", mounted, err)
	}
	if entries, err := os.ReadDir(dir); err != nil || len(entries) != 0 {
		t.Fatalf("the empty mount holds %v (%v)", entries, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "planted"), nil, 0o600); !errors.Is(err, unix.EROFS) {
		t.Fatalf("writing into the empty mount: %v, want EROFS", err)
	}
	again, err := m.EmptyMount(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := again(); err != nil {
		t.Fatal(err)
	}
	if mounted, _ := m.IsMountPoint(dir); !mounted {
		t.Fatal("releasing the second EmptyMount removed the first one's mount")
	}
	if err := release(); err != nil {
		t.Fatal(err)
	}
	if mounted, _ := m.IsMountPoint(dir); mounted {
		t.Fatal("still a mount point after release")
	}
	if _, err := os.Stat(filepath.Join(dir, "hidden")); err != nil {
		t.Fatalf("the dir's own content after release: %v", err)
	}
}
