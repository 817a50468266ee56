//go:build linux

package writablelayer

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// deadlock bounds how long a test waits for what should happen at once, so that a call that
// blocks fails the test instead of hanging it.
const deadlock = 30 * time.Second

// layerDirs makes n layer dirs with a file each in a fresh layers dir.
func layerDirs(t *testing.T, n int) (layers string, dirs []string) {
	t.Helper()
	layers = filepath.Join(t.TempDir(), "overlays")
	for i := range n {
		dir := filepath.Join(layers, fmt.Sprintf("key%d", i))
		if err := os.MkdirAll(filepath.Join(dir, "upper"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "upper", "log"), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, dir)
	}
	return layers, dirs
}

// batchContents lists what the removal dir's batches hold.
func batchContents(t *testing.T, r *remover) []string {
	t.Helper()
	var out []string
	for _, b := range batches {
		entries, err := os.ReadDir(filepath.Join(r.dir, b))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			out = append(out, b+"/"+e.Name())
		}
	}
	return out
}

func flushWithin(r *remover, d time.Duration) error {
	done := make(chan struct{})
	timer := time.AfterFunc(d, func() { close(done) })
	defer timer.Stop()
	return r.flush(done)
}

// A release must not wait for the removal of an earlier layer: that removal is what waits for
// the disk.
func TestSettingAsideNeverWaitsForARemovalInProgress(t *testing.T) {
	layers, dirs := layerDirs(t, 3)
	unblock := make(chan struct{})
	var mu sync.Mutex
	var removed []string
	r := newRemover(layers, slog.New(slog.DiscardHandler), func(parent, name string) error {
		<-unblock
		mu.Lock()
		removed = append(removed, name)
		mu.Unlock()
		return os.RemoveAll(filepath.Join(parent, name))
	})
	t.Cleanup(r.close)

	setAside := make(chan error)
	go func() {
		for _, dir := range dirs {
			setAside <- r.setAsideDir(dir)
		}
	}()
	for range dirs {
		select {
		case err := <-setAside:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(deadlock):
			t.Fatal("setting a layer aside waited for the removal of an earlier one")
		}
	}
	for _, dir := range dirs {
		if _, err := os.Lstat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s is still in the layers dir after release (%v)", dir, err)
		}
	}
	if got := batchContents(t, r); len(got) != len(dirs) {
		t.Errorf("removal batches hold %v, want the %d layers set aside", got, len(dirs))
	}
	close(unblock)
	if err := flushWithin(r, deadlock); err != nil {
		t.Fatal(err)
	}
	if got := batchContents(t, r); len(got) != 0 {
		t.Errorf("after Flush the removal batches still hold %v", got)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(removed) != len(dirs) {
		t.Errorf("removed %v, want each of the %d layers once", removed, len(dirs))
	}
}

func TestLayersAnEarlierProcessSetAsideAreRemoved(t *testing.T) {
	layers := filepath.Join(t.TempDir(), "overlays")
	for _, p := range []string{"a/7-key1/upper/deep", "b/12-key2/work"} {
		if err := os.MkdirAll(filepath.Join(layers+removalSuffix, p), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	m, err := New(layers, Tmpfs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := flushWithin(m.removal, deadlock); err != nil {
		t.Fatal(err)
	}
	if got := batchContents(t, m.removal); len(got) != 0 {
		t.Errorf("layers of the earlier process still in the removal dir: %v", got)
	}
	// New names go on after the ones found, so that a name never meets a leftover.
	if seq := m.removal.seq.Load(); seq < 12 {
		t.Errorf("set-aside numbering restarts at %d, below the leftovers' 12", seq)
	}
}

func TestALayerThatCannotBeRemovedIsReportedAndRetried(t *testing.T) {
	layers, dirs := layerDirs(t, 1)
	var failing sync.Mutex
	fail := true
	r := newRemover(layers, slog.New(slog.DiscardHandler), func(parent, name string) error {
		failing.Lock()
		defer failing.Unlock()
		if fail {
			return errors.New("device busy")
		}
		return os.RemoveAll(filepath.Join(parent, name))
	})
	t.Cleanup(r.close)
	if err := r.setAsideDir(dirs[0]); err != nil {
		t.Fatal(err)
	}
	if err := flushWithin(r, deadlock); err == nil || !strings.Contains(err.Error(), "device busy") {
		t.Fatalf("Flush with a layer that cannot be removed: %v, want its error", err)
	}
	if got := batchContents(t, r); len(got) != 1 {
		t.Fatalf("the layer that could not be removed is gone from the batches: %v", got)
	}
	failing.Lock()
	fail = false
	failing.Unlock()
	if err := flushWithin(r, deadlock); err != nil {
		t.Fatal(err)
	}
	if got := batchContents(t, r); len(got) != 0 {
		t.Errorf("after the retry the batches still hold %v", got)
	}
}

func TestCloseStopsRemovingAndTheNextManagerGoesOn(t *testing.T) {
	layers, dirs := layerDirs(t, 2)
	m, err := New(layers, Tmpfs)
	if err != nil {
		t.Fatal(err)
	}
	// The goroutine is stopped before it removes anything: what is set aside stays.
	started := make(chan struct{})
	var once sync.Once
	release := make(chan struct{})
	m.removal.remove = func(parent, name string) error {
		once.Do(func() { close(started) })
		<-release
		return os.RemoveAll(filepath.Join(parent, name))
	}
	for _, dir := range dirs {
		if err := m.removal.setAsideDir(dir); err != nil {
			t.Fatal(err)
		}
	}
	<-started
	closed := make(chan struct{})
	go func() { m.Close(); close(closed) }()
	<-m.removal.stop // Close has asked the goroutine to stop
	close(release)
	select {
	case <-closed:
	case <-time.After(deadlock):
		t.Fatal("Close did not return once the removal in progress ended")
	}
	left := batchContents(t, m.removal)
	if len(left) == 0 || len(left) == len(dirs) {
		t.Fatalf("after Close the batches hold %v: want the layer removed before Close and not the other", left)
	}

	next, err := New(layers, Tmpfs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { next.Close() })
	if err := flushWithin(next.removal, deadlock); err != nil {
		t.Fatal(err)
	}
	if got := batchContents(t, next.removal); len(got) != 0 {
		t.Errorf("the next manager left %v", got)
	}
}
