package writablelayer

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
)

// Fake is an Interface for unit tests: plain directories without a limit, and a log of what
// was asked.
type Fake struct {
	// Mech is what Mechanism reports; empty reports Tmpfs.
	Mech Mechanism
	// PrepareErr and MountErr, when set, are returned by Prepare (which then leaves nothing
	// behind) and by Mount (without running the mount).
	PrepareErr, MountErr error

	mu sync.Mutex
	// limits holds the limit of every dir prepared and not released.
	limits   map[string]int64
	released []string
	mounts   int
}

// NewFake returns an empty Fake.
func NewFake() *Fake { return &Fake{limits: map[string]int64{}} }

// Mechanism implements Interface.
func (f *Fake) Mechanism() Mechanism {
	if f.Mech == "" {
		return Tmpfs
	}
	return f.Mech
}

// Prepare implements Interface.
func (f *Fake) Prepare(dir string, limit int64) error {
	if f.PrepareErr != nil {
		return f.PrepareErr
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	upper, work := Paths(dir)
	if err := os.Mkdir(upper, 0o755); err != nil {
		return errors.Join(err, os.RemoveAll(dir))
	}
	if err := os.Chmod(upper, 0o777); err != nil {
		return errors.Join(err, os.RemoveAll(dir))
	}
	if err := os.Mkdir(work, 0o700); err != nil {
		return errors.Join(err, os.RemoveAll(dir))
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.limits[dir] = limit
	return nil
}

// Resume implements Interface: a fresh work dir, and the limit recorded again.
func (f *Fake) Resume(dir string, limit int64) error {
	upper, work := Paths(dir)
	if fi, err := os.Lstat(upper); err != nil {
		return fmt.Errorf("no upper dir to resume in %s: %w", dir, err)
	} else if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", upper)
	}
	if err := os.RemoveAll(work); err != nil {
		return err
	}
	if err := os.Mkdir(work, 0o700); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.limits[dir] = limit
	return nil
}

// Mount implements Interface.
func (f *Fake) Mount(mount func() error) error {
	f.mu.Lock()
	f.mounts++
	f.mu.Unlock()
	if f.MountErr != nil {
		return f.MountErr
	}
	return mount()
}

// Used implements Interface: the sizes of the regular files below dir.
func (f *Fake) Used(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(_ string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if e.Type().IsRegular() {
			fi, err := e.Info()
			if err != nil {
				return err
			}
			n += fi.Size()
		}
		return nil
	})
	return n, err
}

// Release implements Interface.
func (f *Fake) Release(dir string) error {
	f.mu.Lock()
	delete(f.limits, dir)
	f.released = append(f.released, dir)
	f.mu.Unlock()
	return os.RemoveAll(dir)
}

// Limits returns the limit of every dir prepared and not yet released.
func (f *Fake) Limits() map[string]int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]int64{}
	for k, v := range f.limits {
		out[k] = v
	}
	return out
}

// Released returns the dirs Release was called for, in order.
func (f *Fake) Released() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.released...)
}

// Mounts returns how many mounts ran through Mount.
func (f *Fake) Mounts() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mounts
}
