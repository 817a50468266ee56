package mounter

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

// Fake is an in-memory mount table for unit tests of the driver's logic. Targets are real
// directories and descriptors (tests use t.TempDir), so existence and link checks behave as
// they do for real; only the mounts themselves are simulated, keyed by the path the kernel
// reports for the target's directory descriptor.
type Fake struct {
	mu      sync.Mutex
	entries []Entry
	// Errors makes an operation fail: keys "bind", "overlay", "unmount", "ismountpoint".
	Errors map[string]error
	// Calls records each operation as "op target".
	Calls []string
}

var _ Interface = (*Fake)(nil)

// NewFake returns an empty fake mount table.
func NewFake() *Fake { return &Fake{Errors: map[string]error{}} }

func (f *Fake) fail(op, target string) error {
	f.Calls = append(f.Calls, op+" "+target)
	if err := f.Errors[op]; err != nil {
		return fmt.Errorf("%s %s: %w", op, target, err)
	}
	return nil
}

// fdPath is the path of an open descriptor, as the kernel reports it.
func fdPath(fd int) (string, error) {
	p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return "", fmt.Errorf("descriptor %d: %w", fd, err)
	}
	return p, nil
}

// at is the path of name in the directory dirfd.
func at(dirfd int, name string) (string, error) {
	dir, err := fdPath(dirfd)
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, name), nil
}

// IsMountPointAt implements Interface.
func (f *Fake) IsMountPointAt(dirfd int, name string) (bool, error) {
	path, err := at(dirfd, name)
	if err != nil {
		return false, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("ismountpoint", path); err != nil {
		return false, err
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return false, err
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		return false, nil
	}
	return slices.ContainsFunc(f.entries, func(e Entry) bool { return e.MountPoint == path }), nil
}

// SurelyMountRoot implements Interface.
// It answers from the fake's table without recording a call or failing on purpose.
func (f *Fake) SurelyMountRoot(dirfd int, rel string) bool {
	path, err := at(dirfd, rel)
	if err != nil {
		return false
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&fs.ModeSymlink != 0 {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.ContainsFunc(f.entries, func(e Entry) bool { return e.MountPoint == path })
}

// BindFrom implements Interface.
func (f *Fake) BindFrom(source, dirfd int, name string, readOnly bool) error {
	src, err := fdPath(source)
	if err != nil {
		return err
	}
	target, err := at(dirfd, name)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("bind", target); err != nil {
		return err
	}
	if err := notLink(target); err != nil {
		return err
	}
	opts := []string{"rw", "nosuid", "nodev"}
	if readOnly {
		opts[0] = "ro"
	}
	f.entries = append(f.entries, Entry{MountPoint: target, FsType: "bind", Source: src, Root: src, MountOptions: opts})
	return nil
}

// notLink fails for a missing target or a symbolic link, as the real mounter does.
func notLink(target string) error {
	fi, err := os.Lstat(target)
	if err != nil {
		return err
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("%s is a symbolic link", target)
	}
	return nil
}

// OverlayAt implements Interface.
func (f *Fake) OverlayAt(dirfd int, name string, o Overlay) error {
	target, err := at(dirfd, name)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := o.Validate(); err != nil {
		return err
	}
	if err := f.fail("overlay", target); err != nil {
		return err
	}
	if err := notLink(target); err != nil {
		return err
	}
	super := []string{"lowerdir=" + strings.Join(o.Lower, ":")}
	opts := []string{"ro", "nosuid", "nodev"}
	if !o.ReadOnly() {
		super = append(super, "upperdir="+o.Upper, "workdir="+o.Work)
		if o.Volatile {
			super = append(super, "volatile")
		}
		opts[0] = "rw"
	}
	f.entries = append(f.entries, Entry{MountPoint: target, FsType: "overlay", Source: overlaySource, Root: "/", MountOptions: opts, SuperOptions: super})
	return nil
}

// UnmountAt implements Interface: it removes the most recent mount at name.
func (f *Fake) UnmountAt(dirfd int, name string) error {
	target, err := at(dirfd, name)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("unmount", target); err != nil {
		return err
	}
	fi, err := os.Lstat(target)
	if err != nil {
		return fmt.Errorf("unmount %s: %w", target, fs.ErrNotExist)
	}
	if fi.Mode()&fs.ModeSymlink == 0 {
		for i := len(f.entries) - 1; i >= 0; i-- {
			if f.entries[i].MountPoint == target {
				f.entries = slices.Delete(f.entries, i, i+1)
				return nil
			}
		}
	}
	return fmt.Errorf("unmount %s: %w", target, ErrNotMounted)
}

// MountTable implements Interface.
func (f *Fake) MountTable() ([]Entry, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("mounttable", ""); err != nil {
		return nil, err
	}
	return slices.Clone(f.entries), nil
}

// Mounts returns how many mounts are stacked at target.
func (f *Fake) Mounts(target string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, e := range f.entries {
		if e.MountPoint == target {
			n++
		}
	}
	return n
}

// Len returns the number of mounts in the table.
func (f *Fake) Len() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.entries)
}

// Add puts an entry in the table directly, as a mount made before the test started would be.
func (f *Fake) Add(e Entry) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = append(f.entries, e)
}

// Forget drops the most recent mount at target, as a mount removed behind the plugin's back
// (or lost in a reboot) would be.
func (f *Fake) Forget(target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := len(f.entries) - 1; i >= 0; i-- {
		if f.entries[i].MountPoint == target {
			f.entries = slices.Delete(f.entries, i, i+1)
			return nil
		}
	}
	return fmt.Errorf("forget %s: %w", target, ErrNotMounted)
}

// EmptyMount implements Interface: the fake mounts nothing.
func (f *Fake) EmptyMount(string) (release func() error, err error) {
	return func() error { return nil }, nil
}
