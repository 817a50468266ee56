package localcluster

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/test/testenv"
)

// TestClusterRefusesToStartOnADiskAtTheEvictionThreshold: a cluster whose disk is already
// below kubelet's imagefs eviction threshold would leave its pods Pending on DiskPressure;
// Up says so before starting anything, with the figures, and starts on a disk with room.
func TestClusterRefusesToStartOnADiskAtTheEvictionThreshold(t *testing.T) {
	testenv.RequireRoot(t) // to mount a tmpfs
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Error(err)
		}
	})
	root := filepath.Join(dir, "cluster", "root") // not there yet, as before a first Up
	if err := checkDiskHeadroom(root, headroomPercent); err != nil {
		t.Fatalf("an empty disk: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "fill"), make([]byte, 58<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	err := checkDiskHeadroom(root, headroomPercent)
	if err == nil {
		t.Fatal("a disk with 6 MiB of 64 MiB available was accepted; kubelet evicts below 15%, and 2% more is kept as headroom")
	}
	for _, want := range []string{dir, "available of", "below 15% available", "free at least"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}
