package driver

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// heldDeleted lists the descriptors of this process that hold a removed path below dir.
func heldDeleted(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		link, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err == nil && strings.HasPrefix(link, dir) && strings.HasSuffix(link, " (deleted)") {
			out = append(out, link)
		}
	}
	return out
}

// TestRemovedTargetIsClosedAfterTheCall: unpublish removes the target directory while it holds
// it open, so that the directory's storage is freed at the close, which happens after the
// call; the name is gone when the call returns.
func TestRemovedTargetIsClosedAfterTheCall(t *testing.T) {
	volDir := t.TempDir()
	if err := os.Mkdir(filepath.Join(volDir, targetName), 0o750); err != nil {
		t.Fatal(err)
	}
	dirfd, err := unix.Open(volDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dirfd)

	release := make(chan struct{})
	closed := make(chan int, 1)
	d := &Driver{log: slog.New(slog.DiscardHandler)}
	d.lateClose.closeFD = func(fd int) error {
		<-release
		closed <- fd
		return unix.Close(fd)
	}
	if err := d.removeTarget(dirfd, filepath.Join(volDir, targetName)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(volDir, targetName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("target still there after removeTarget: %v", err)
	}
	if held := heldDeleted(t, volDir); len(held) != 1 {
		t.Fatalf("descriptors holding the removed target: %v, want one until the late close", held)
	}
	close(release)
	fd := <-closed
	d.lateClose.stop()
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
		t.Errorf("descriptor %d still open after the late close: %v", fd, err)
	}
	if held := heldDeleted(t, volDir); len(held) != 0 {
		t.Errorf("removed target still held after the late close: %v", held)
	}
}

func TestLateCloserClosesInTheCallWhenFullOrStopped(t *testing.T) {
	open := func() int {
		fd, err := unix.Open(t.TempDir(), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		return fd
	}
	isOpen := func(fd int) bool {
		_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		return err == nil
	}
	taken := make(chan struct{}, 1)
	release := make(chan struct{})
	var c lateCloser
	c.closeFD = func(fd int) error {
		select {
		case taken <- struct{}{}:
		default:
		}
		<-release
		return unix.Close(fd)
	}

	// The goroutine takes the first descriptor and waits; lateCloseBacklog more fill the
	// backlog; the next one is closed in the call.
	waiting := []int{open()}
	c.close(waiting[0])
	<-taken
	for range lateCloseBacklog {
		fd := open()
		c.close(fd)
		waiting = append(waiting, fd)
	}
	for _, fd := range waiting {
		if !isOpen(fd) {
			t.Fatalf("descriptor %d closed before the goroutine got to it", fd)
		}
	}
	extra := open()
	c.close(extra)
	if isOpen(extra) {
		t.Errorf("with the backlog full, close left descriptor %d open", extra)
	}
	close(release)
	c.stop()
	for _, fd := range waiting {
		if isOpen(fd) {
			t.Fatalf("descriptor %d still open after stop", fd)
		}
	}
	after := open()
	c.close(after)
	if isOpen(after) {
		t.Errorf("close after stop left descriptor %d open", after)
	}
}
