// Package librarytest is a library.Store for tests of the CSI driver: it serves directories
// it creates instead of pulling images, and the errors a test configures. The real store,
// nodeplugin/librarycache, is tested on its own against a real registry.
package librarytest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// Store serves each library as a directory below Root holding one file named after the image
// (its content is the image reference), so a test can see which layers a mount composed.
// The zero value is not usable: set Root.
type Store struct {
	// Root is where layer and generated-file directories are created.
	Root string

	mu sync.Mutex
	// errs holds the error LayerFor returns per image.
	errs map[string]error
	// before, when set, runs first in every LayerFor call; an error it returns is the call's.
	before func(ctx context.Context, image string) error
	calls  int
}

var _ library.Store = (*Store)(nil)

// New returns a Store over root.
func New(root string) *Store { return &Store{Root: root} }

// FailWith makes LayerFor return err for image (nil clears it).
func (s *Store) FailWith(image string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.errs == nil {
		s.errs = map[string]error{}
	}
	if err == nil {
		delete(s.errs, image)
		return
	}
	s.errs[image] = err
}

// Before sets a hook that runs first in every LayerFor call (nil removes it); an error it
// returns is the call's. Tests use it to block a call or to watch its context.
func (s *Store) Before(hook func(ctx context.Context, image string) error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.before = hook
}

// Calls returns how many times LayerFor was called.
func (s *Store) Calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

// LayerFor implements library.Store: the same image, source and target always give the same
// directory and digest, as the cache's views do.
func (s *Store) LayerFor(ctx context.Context, _ string, lib volumeattrs.Library) (library.Layer, error) {
	s.mu.Lock()
	s.calls++
	before, err := s.before, s.errs[lib.Image]
	s.mu.Unlock()
	if before != nil {
		if err := before(ctx, lib.Image); err != nil {
			return library.Layer{}, err
		}
	}
	if err != nil {
		return library.Layer{}, err
	}
	sum := sha256.Sum256([]byte(lib.Image + "\x00" + lib.Source + "\x00" + lib.Target))
	dir := filepath.Join(s.Root, "layers", hex.EncodeToString(sum[:8]))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return library.Layer{}, err
	}
	name := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(lib.Image))
	if err := os.WriteFile(name, []byte(lib.Image+"\n"), 0o644); err != nil {
		return library.Layer{}, err
	}
	return library.Layer{Dir: dir, Digest: "sha256:" + hex.EncodeToString(sum[:])}, nil
}

// GeneratedFiles implements library.Store: one directory per distinct set of files.
func (s *Store) GeneratedFiles(files map[string]string) (string, error) {
	h := sha256.New()
	for _, k := range slices.Sorted(maps.Keys(files)) {
		fmt.Fprintf(h, "%s\x00%s\x00", k, files[k])
	}
	dir := filepath.Join(s.Root, "generated", hex.EncodeToString(h.Sum(nil))[:16])
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return "", err
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return "", err
		}
	}
	return dir, nil
}
