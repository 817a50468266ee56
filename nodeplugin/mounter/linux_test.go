package mounter

import (
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
