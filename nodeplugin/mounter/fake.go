package mounter

import (
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"sync"
)

// Fake is an in-memory mount table for unit tests of the driver's logic. Targets are real
// paths (tests use t.TempDir), so existence checks behave as they do for real; only the mounts
// themselves are simulated.
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

// IsMountPoint implements Interface.
func (f *Fake) IsMountPoint(path string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("ismountpoint", path); err != nil {
		return false, err
	}
	if _, err := os.Lstat(path); err != nil {
		return false, err
	}
	return slices.ContainsFunc(f.entries, func(e Entry) bool { return e.MountPoint == path }), nil
}

// Bind implements Interface.
func (f *Fake) Bind(source, target string, readOnly bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("bind", target); err != nil {
		return err
	}
	if _, err := os.Stat(target); err != nil {
		return err
	}
	opts := []string{"rw", "nosuid", "nodev"}
	if readOnly {
		opts[0] = "ro"
	}
	f.entries = append(f.entries, Entry{MountPoint: target, FsType: "bind", Source: source, Root: source, MountOptions: opts})
	return nil
}

// Overlay implements Interface.
func (f *Fake) Overlay(target string, o Overlay) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := o.Validate(); err != nil {
		return err
	}
	if err := f.fail("overlay", target); err != nil {
		return err
	}
	if _, err := os.Stat(target); err != nil {
		return err
	}
	super := []string{"lowerdir=" + strings.Join(o.Lower, ":")}
	opts := []string{"ro", "nosuid", "nodev"}
	if !o.ReadOnly() {
		super = append(super, "upperdir="+o.Upper, "workdir="+o.Work)
		opts[0] = "rw"
	}
	f.entries = append(f.entries, Entry{MountPoint: target, FsType: "overlay", Source: overlaySource, Root: "/", MountOptions: opts, SuperOptions: super})
	return nil
}

// Unmount implements Interface: it removes the most recent mount at target.
func (f *Fake) Unmount(target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("unmount", target); err != nil {
		return err
	}
	for i := len(f.entries) - 1; i >= 0; i-- {
		if f.entries[i].MountPoint == target {
			f.entries = slices.Delete(f.entries, i, i+1)
			return nil
		}
	}
	if _, err := os.Lstat(target); err != nil {
		return fmt.Errorf("unmount %s: %w", target, fs.ErrNotExist)
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
