package nodeplugintest

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
)

// The mount table is the machine's: other tests may mount elsewhere at the same time, so
// these helpers only look at the part below a directory the test owns.

func mountTable(t testing.TB) []mounter.Entry {
	t.Helper()
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Fatal(err)
	}
	return table
}

// MountsUnder returns the mount table lines (minus the mount ids, which change) that mention
// root: mounts on it and overlays whose layers live in it. Two calls compare equal when the
// same mounts, with the same options, are there.
func MountsUnder(t testing.TB, root string) []string {
	t.Helper()
	var out []string
	for _, e := range mountTable(t) {
		line := fmt.Sprintf("%s %s %s %s %s %s", e.MountPoint, e.FsType, e.Source, e.Root, strings.Join(e.MountOptions, ","), strings.Join(e.SuperOptions, ","))
		if strings.Contains(line, root+"/") {
			out = append(out, line)
		}
	}
	return out
}

// CountMounts returns how many mounts are stacked on path.
func CountMounts(t testing.TB, path string) int {
	t.Helper()
	n := 0
	for _, e := range mountTable(t) {
		if e.MountPoint == path {
			n++
		}
	}
	return n
}

// EntryAt returns the mount table entry mounted at path (the top one if several are
// stacked), failing the test if there is none.
func EntryAt(t testing.TB, path string) mounter.Entry {
	t.Helper()
	table := mountTable(t)
	for i := len(table) - 1; i >= 0; i-- {
		if table[i].MountPoint == path {
			return table[i]
		}
	}
	t.Fatalf("nothing mounted at %s", path)
	return mounter.Entry{}
}

// UnmountUnder fails the test for every mount left under root and detaches it, deepest first,
// so that the temporary directory is removed without reaching through a mount into a source
// directory or a library's lower dir. Meant for cleanup: it never stops the test.
func UnmountUnder(t testing.TB, root string) {
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Error(err)
		return
	}
	for i := len(table) - 1; i >= 0; i-- {
		if mp := table[i].MountPoint; strings.HasPrefix(mp, root+"/") {
			t.Errorf("mount left behind at %s", mp)
			// EINVAL: no longer a mount point, gone with a mount detached before it.
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				t.Errorf("unmount %s: %v", mp, err)
			}
		}
	}
}
