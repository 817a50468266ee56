package librarycache

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"time"
)

const refsFile = "refs.json"

// refStore remembers what the registry told us: the digest each tag resolved to (and when),
// and which image manifest this node's platform uses in a multi-platform index. It survives
// restarts so a node serves cached tags while the registry is down, and is small enough to
// rewrite whole (atomically) on every change.
type refStore struct {
	root     *os.Root
	platform string

	mu   sync.Mutex
	data refsData
	// writeMu serialises writes of the file, outside mu so that lookups never wait for a
	// disk flush.
	writeMu sync.Mutex
}

type refsData struct {
	// Platform is the node platform the index mappings were resolved for.
	Platform string `json:"platform"`
	// Tags maps repository:tag to its last resolution.
	Tags map[string]tagRecord `json:"tags"`
	// Indexes maps an index digest to the image manifest digest of Platform. Digests are
	// immutable, so these never expire while the image is cached.
	Indexes map[string]string `json:"indexes"`
}

type tagRecord struct {
	Digest   string    `json:"digest"`
	Resolved time.Time `json:"resolved"`
}

// loadRefs reads refs.json; a missing or unreadable file starts empty (it is a cache of
// registry answers, never the only copy of anything).
func loadRefs(root *os.Root, platform string) (*refStore, error) {
	s := &refStore{root: root, platform: platform, data: refsData{Platform: platform, Tags: map[string]tagRecord{}, Indexes: map[string]string{}}}
	b, err := root.ReadFile(refsFile)
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, err
	}
	var d refsData
	if err := json.Unmarshal(b, &d); err != nil {
		return s, fmt.Errorf("%s is corrupt, starting without remembered tags: %w", refsFile, err)
	}
	if d.Tags != nil {
		s.data.Tags = d.Tags
	}
	if d.Indexes != nil && d.Platform == platform {
		s.data.Indexes = d.Indexes
	}
	return s, nil
}

func (s *refStore) tag(key string) (tagRecord, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.data.Tags[key]
	return r, ok
}

func (s *refStore) setTag(key, digest string, at time.Time) error {
	s.mu.Lock()
	s.data.Tags[key] = tagRecord{Digest: digest, Resolved: at}
	s.mu.Unlock()
	return s.save()
}

func (s *refStore) index(digest string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d, ok := s.data.Indexes[digest]
	return d, ok
}

func (s *refStore) setIndex(indexDigest, imageDigest string) error {
	s.mu.Lock()
	s.data.Indexes[indexDigest] = imageDigest
	s.mu.Unlock()
	return s.save()
}

// prune forgets records whose image is no longer cached and that are older than maxAge, so
// the file does not grow with every tag ever seen.
func (s *refStore) prune(cached func(digest string) bool, maxAge time.Duration, now time.Time) error {
	s.mu.Lock()
	changed := false
	for k, r := range s.data.Tags {
		if !cached(r.Digest) && now.Sub(r.Resolved) > maxAge {
			delete(s.data.Tags, k)
			changed = true
		}
	}
	for k, d := range s.data.Indexes {
		if !cached(d) {
			delete(s.data.Indexes, k)
			changed = true
		}
	}
	s.mu.Unlock()
	if !changed {
		return nil
	}
	return s.save()
}

// save writes the whole file through a temporary file and a rename, so a crash leaves the
// old or the new content, never a torn file. The snapshot is taken once the write lock is
// held, so the last write always carries the latest state.
func (s *refStore) save() error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	s.mu.Lock()
	b, err := json.MarshalIndent(s.data, "", " ")
	s.mu.Unlock()
	if err != nil {
		return err
	}
	return writeFileAtomic(s.root, refsFile, b, 0o600)
}
