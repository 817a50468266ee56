package librarycache

import (
	"encoding/json"
	"io/fs"
	"os"
	"path"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Durability. An entry is renamed into place as soon as it is complete, so the first volume
// does not wait for its data to reach the disk; a background worker then flushes the store's
// filesystem once (syncfs covers every entry published meanwhile) and records each entry as
// durable. A process crash loses nothing (the page cache survives it): Start flushes what the
// previous process left unflushed. A power loss or kernel crash can tear files written
// before the flush: entries of an earlier boot that were never marked durable are removed at
// start. So after any crash an entry is complete or absent.
//
// The flush waits until no download is running (at most maxFlushDelay): syncfs writes back
// every dirty page of the filesystem, so flushing the first library of a cold volume while
// its siblings are still being extracted makes their writes queue behind the writeback. The
// wait changes nothing about what a crash can leave: until the flush, the entry is served but
// not yet recorded durable, as before.

// maxFlushDelay bounds how long a busy node postpones the flush of finished entries.
const maxFlushDelay = 10 * time.Second

const bootIDFile = "/proc/sys/kernel/random/boot_id"

func readBootID() string {
	b, err := os.ReadFile(bootIDFile)
	if err != nil {
		// Without a boot id every unflushed entry counts as from another boot: removed.
		return ""
	}
	return strings.TrimSpace(string(b))
}

// makeDurableLocked queues e for the durability worker. Guarded by s.mu.
func (s *store) makeDurableLocked(e *entry) {
	if e.meta.Durable {
		return
	}
	s.pendingDurable = append(s.pendingDurable, e)
	select {
	case s.durableSignal <- struct{}{}:
	default:
	}
}

// durabilityWorker runs until the cache closes.
func (s *store) durabilityWorker() {
	defer s.life.wg.Done()
	for {
		select {
		case <-s.life.bg.Done():
			return
		case <-s.durableSignal:
		}
		s.waitIdle(s.life.bg, maxFlushDelay)
		s.mu.Lock()
		pending := s.pendingDurable
		s.pendingDurable = nil
		s.mu.Unlock()
		if len(pending) == 0 {
			continue
		}
		if err := s.syncStore(); err != nil {
			s.log.Error("cannot flush the library store to disk; entries stay unconfirmed and are removed after a reboot", "err", err)
			continue
		}
		for _, e := range pending {
			s.recordDurable(e)
		}
	}
}

// recordDurable rewrites e's entry.json as durable. It excludes GC passes meanwhile: a GC
// removing the entry under the rewrite would race the new file into a directory being
// deleted, and the removal would fail with "directory not empty".
func (s *store) recordDurable(e *entry) {
	s.gcMu.Lock()
	defer s.gcMu.Unlock()
	s.mu.Lock()
	live := s.entries(e.kind)[e.key] == e && !e.removing
	meta := e.meta
	s.mu.Unlock()
	if !live {
		return
	}
	if s.beforeDurableRewrite != nil {
		s.beforeDurableRewrite()
	}
	meta.Durable = true
	if err := s.rewriteMeta(e.rel(), meta); err != nil {
		s.log.Error("cannot record a cache entry as durable; it is removed after a reboot", "entry", e.rel(), "err", err)
		return
	}
	s.mu.Lock()
	e.meta.Durable = true
	s.mu.Unlock()
}

func (s *store) syncStore() error {
	f, err := s.root.Open(".")
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

// rewriteMeta replaces entry.json atomically and durably: written beside, synced, renamed,
// and the directory synced.
func (s *store) rewriteMeta(dirRel string, m entryMeta) error {
	b, err := json.MarshalIndent(m, "", " ")
	if err != nil {
		return err
	}
	if err := writeFileAtomic(s.root, path.Join(dirRel, metaFile), b, 0o644); err != nil {
		return err
	}
	d, err := s.root.Open(dirRel)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// writeFileAtomic replaces the file name of root with data: written to name+".tmp" beside it,
// synced, then renamed over it, so a crash leaves the old or the new content, never a torn
// file. Making the rename itself durable (syncing the directory) is left to the caller.
func writeFileAtomic(root *os.Root, name string, data []byte, perm fs.FileMode) error {
	tmp := name + ".tmp"
	f, err := root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return root.Rename(tmp, name)
}
