//go:build linux

package writablelayer

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Released layer dirs are removed in the background.
//
// Removing a directory frees its block. On a filesystem mounted with online discard (ext4's
// -o discard) that waits for the journal, and with another process writing to the same disk
// the wait reaches tens of milliseconds: a pod's unpublish would pay it for a dir that nobody
// will see again. Release therefore only unmounts the layer's tmpfs (which frees its memory at
// once) and renames the dir, in one step that frees nothing, into the current one of two batch
// dirs in the removal dir (a sibling of the layers' dir on the same filesystem,
// <dir>-removing/a and b). A goroutine removes what the other batch holds.
//
// A batch receives renames only while it is current: before removing anything the remover
// makes the other batch current, and it removes only from the batch that is not. So a slow
// removal holds no directory lock that Release or Prepare needs (the kernel locks the parent
// dir of what it removes), and no directory is created or removed for the batches themselves.
// A project-quota layer keeps its project charged until it is removed, so its id is not
// handed out again meanwhile; its limit is cleared after.
//
// What a crash or a stop leaves in the removal dir is removed when the next process first
// releases a layer or calls Flush, and New starts that when it finds some. Where the rename
// cannot be done (the removal dir on another filesystem, say), Release removes the dir
// itself, as before.

// removalSuffix names the removal dir next to the layers' dir.
const removalSuffix = "-removing"

// batches are the names of the two batch dirs in the removal dir.
var batches = [2]string{"a", "b"}

// remover sets released layer dirs aside and removes them in the background.
type remover struct {
	dir    string // the removal dir
	log    *slog.Logger
	remove func(parent, name string) error // removes one layer dir set aside in parent

	once    sync.Once
	initErr error

	// mu guards current: a rename into it holds mu for reading, making the other batch
	// current holds it for writing.
	mu      sync.RWMutex
	current int // index in batches of the batch renames go to
	started bool
	// seq numbers what is set aside, so that names never repeat in a batch.
	seq atomic.Uint64

	wake chan struct{} // a pass is wanted (buffered, one)
	stop chan struct{} // closed by Close
	done chan struct{} // closed when the goroutine ends

	// passMu guards what passes report to Flush.
	passMu sync.Mutex
	// batchErr is, for each batch, what its last pass could not remove (logged too).
	batchErr   [2]error
	passes     uint64        // passes done
	morePasses int           // passes to run without being poked (leftovers at start)
	passDone   chan struct{} // closed and replaced at the end of each pass
	closed     bool
}

func newRemover(layersDir string, log *slog.Logger, remove func(parent, name string) error) *remover {
	return &remover{
		dir:      filepath.Clean(layersDir) + removalSuffix,
		log:      log,
		remove:   remove,
		wake:     make(chan struct{}, 1),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
		passDone: make(chan struct{}),
	}
}

// leftovers reports whether an earlier process left layers to remove.
func (r *remover) leftovers() bool {
	for _, b := range batches {
		if entries, err := os.ReadDir(filepath.Join(r.dir, b)); err == nil && len(entries) > 0 {
			return true
		}
	}
	return false
}

// start creates the removal dir and its batches, and starts the goroutine, once. What the
// batches hold already is an earlier process's: the first pass removes it.
func (r *remover) start() error {
	r.once.Do(func() {
		leftovers := false
		for _, b := range batches {
			if err := os.MkdirAll(filepath.Join(r.dir, b), 0o700); err != nil {
				r.initErr = fmt.Errorf("creating the removal dir of writable layers: %w", err)
				return
			}
			entries, err := os.ReadDir(filepath.Join(r.dir, b))
			if err != nil {
				r.initErr = fmt.Errorf("reading the removal dir of writable layers: %w", err)
				return
			}
			for _, e := range entries {
				leftovers = true
				// Names are <seq>-<layer>: go on from the highest.
				seq, _, _ := strings.Cut(e.Name(), "-")
				if n, err := strconv.ParseUint(seq, 10, 64); err == nil && n > r.seq.Load() {
					r.seq.Store(n)
				}
			}
		}
		r.mu.Lock()
		r.started = true
		r.mu.Unlock()
		go r.run()
		if leftovers {
			// Both batches: the first pass empties one, the second the other.
			r.passMu.Lock()
			r.morePasses = 1
			r.passMu.Unlock()
			r.poke()
		}
	})
	return r.initErr
}

func (r *remover) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// setAsideDir renames dir (a layer dir, nothing mounted on it any more) into the current batch,
// for the goroutine to remove. It fails, leaving dir where it is, when that cannot be done.
func (r *remover) setAsideDir(dir string) error {
	if err := r.start(); err != nil {
		return err
	}
	r.mu.RLock()
	batch := filepath.Join(r.dir, batches[r.current])
	name := strconv.FormatUint(r.seq.Add(1), 10) + "-" + filepath.Base(dir)
	err := unix.Renameat2(unix.AT_FDCWD, dir, unix.AT_FDCWD, filepath.Join(batch, name), unix.RENAME_NOREPLACE)
	r.mu.RUnlock()
	if err != nil {
		return &os.LinkError{Op: "rename", Old: dir, New: batch, Err: err}
	}
	r.poke()
	return nil
}

// run removes batches each time it is poked, until Close.
func (r *remover) run() {
	defer close(r.done)
	for {
		select {
		case <-r.stop:
			return
		case <-r.wake:
		}
		select {
		case <-r.stop: // a stop wins over a pass wanted meanwhile
			return
		default:
		}
		batch, err := r.pass()
		r.passMu.Lock()
		if !errors.Is(err, errStopped) {
			r.batchErr[batch] = err
			r.passes++
		}
		if r.morePasses > 0 {
			r.morePasses--
			r.poke()
		}
		close(r.passDone)
		r.passDone = make(chan struct{})
		r.passMu.Unlock()
	}
}

var errStopped = errors.New("writable layer removal stopped")

// pass makes the other batch current and removes what the batch that was current holds (the
// one that is current now was emptied by the pass before, unless that failed).
func (r *remover) pass() (batch int, err error) {
	r.mu.Lock()
	old := r.current
	r.current = 1 - old
	r.mu.Unlock()
	return old, r.removeBatch(batches[old])
}

// removeBatch removes what a batch holds. A layer that cannot be removed is logged and kept
// for a later pass.
func (r *remover) removeBatch(batch string) error {
	path := filepath.Join(r.dir, batch)
	entries, err := os.ReadDir(path)
	if err != nil {
		return fmt.Errorf("reading a removal batch of writable layers: %w", err)
	}
	var errs []error
	for _, e := range entries {
		select {
		case <-r.stop:
			return errStopped
		default:
		}
		if err := r.remove(path, e.Name()); err != nil {
			r.log.Error("cannot remove a released writable layer; it is retried after a later release and at the next start", "dir", filepath.Join(path, e.Name()), "err", err)
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// flush waits until every dir set aside before the call is removed, or done is closed: two
// passes that begin after the call, which empty both batches.
func (r *remover) flush(done <-chan struct{}) error {
	if !r.leftoversOrStarted() {
		return nil
	}
	if err := r.start(); err != nil {
		return err
	}
	r.passMu.Lock()
	want := r.passes + 2
	r.passMu.Unlock()
	for {
		r.passMu.Lock()
		closed, passes, err, ch := r.closed, r.passes, errors.Join(r.batchErr[0], r.batchErr[1]), r.passDone
		r.passMu.Unlock()
		switch {
		case closed:
			return errStopped
		case passes >= want:
			return err
		}
		r.poke()
		select {
		case <-ch:
		case <-done:
			return errors.New("writable layers not all removed yet")
		}
	}
}

// leftoversOrStarted reports whether there can be anything to remove.
func (r *remover) leftoversOrStarted() bool {
	r.mu.RLock()
	started := r.started
	r.mu.RUnlock()
	return started || r.leftovers()
}

// close stops the goroutine after the layer it is removing; what is left is removed by the
// next process.
func (r *remover) close() {
	r.passMu.Lock()
	if r.closed {
		r.passMu.Unlock()
		return
	}
	r.closed = true
	r.passMu.Unlock()
	close(r.stop)
	r.mu.RLock()
	started := r.started
	r.mu.RUnlock()
	if started {
		<-r.done
	}
}
