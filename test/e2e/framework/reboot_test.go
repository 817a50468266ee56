package framework

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/test/testenv"
)

// unmountBelow drops stacked and nested mounts, deepest first, and leaves the kept mount
// points mounted, as SimulateReboot needs for the kubelet dir and the hostPath root.
func TestUnmountBelowDropsNestedAndStackedMountsAndKeepsTheKeptOnes(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	keep := filepath.Join(dir, "kept")
	nested := filepath.Join(dir, "a")
	for _, d := range []string{keep, nested} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mount := func(at string) {
		t.Helper()
		if err := unix.Mount("reboot-test", at, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatalf("mount tmpfs at %s: %v", at, err)
		}
		t.Cleanup(func() { _ = unix.Unmount(at, unix.MNT_DETACH) })
	}
	mount(keep)
	mount(nested)
	mount(nested) // stacked on the first
	inner := filepath.Join(nested, "b")
	if err := os.Mkdir(inner, 0o755); err != nil {
		t.Fatal(err)
	}
	mount(inner)

	n, err := unmountBelow(dir, []string{keep})
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Errorf("unmounted %d mounts, want 3 (two stacked and one nested)", n)
	}
	all, err := Mounts()
	if err != nil {
		t.Fatal(err)
	}
	if got := len(MountsAt(all, keep)); got != 1 {
		t.Errorf("%d mounts at the kept %s, want 1", got, keep)
	}
	left, err := mountPointsBelow(dir, []string{keep})
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Errorf("mounts left below %s: %v", dir, left)
	}
}
