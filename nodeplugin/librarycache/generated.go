package librarycache

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
)

// maxGeneratedBytes bounds GeneratedFiles: it holds one-line files such as ld.so.preload.
const maxGeneratedBytes = 1 << 20

// generatedFiles is Cache.GeneratedFiles.
func (s *store) generatedFiles(files map[string]string) (string, error) {
	names, err := validateGenerated(files)
	if err != nil {
		return "", err
	}
	parts := []string{"generated-v1"}
	for _, n := range names {
		parts = append(parts, n, strconv.Itoa(len(files[n])), files[n])
	}
	key := contentKey(parts...)
	if e := s.acquire(kindGenerated, key); e != nil {
		s.release(e)
		return s.contentDir(e), nil
	}
	val, err, _ := s.builds.Do("generated:"+key, func() (any, error) {
		s.mu.Lock()
		e := s.generated[key]
		s.mu.Unlock()
		if e != nil && !e.removing {
			return e, nil
		}
		return s.buildGenerated(key, names, files)
	})
	if err != nil {
		return "", err
	}
	e := s.acquireEntry(val.(*entry))
	if e == nil {
		return "", fmt.Errorf("generated files %s were evicted right after they were written; retry", key)
	}
	s.release(e)
	return s.contentDir(e), nil
}

func validateGenerated(files map[string]string) ([]string, error) {
	if len(files) == 0 {
		return nil, errors.New("generated files: none given")
	}
	names := slices.Sorted(maps.Keys(files))
	total := 0
	for i, n := range names {
		if n == "" || path.Clean(n) != n || !filepath.IsLocal(n) || strings.ContainsRune(n, 0) {
			return nil, fmt.Errorf("generated file %q: want a clean relative path such as etc/ld.so.preload", n)
		}
		// Sorted order puts "a/b" right after "a" if both exist.
		if i+1 < len(names) && strings.HasPrefix(names[i+1], n+"/") {
			return nil, fmt.Errorf("generated files %q and %q: a file cannot also be a directory", n, names[i+1])
		}
		total += len(files[n])
	}
	if total > maxGeneratedBytes {
		return nil, fmt.Errorf("generated files hold %d bytes, the limit is %d", total, maxGeneratedBytes)
	}
	return names, nil
}

// buildGenerated writes generated/<key>/root holding exactly files (names sorted).
func (s *store) buildGenerated(key string, names []string, files map[string]string) (*entry, error) {
	e, _, err := s.buildEntry(kindGenerated, key, "generated", func(rootRel string) (entryMeta, error) {
		if err := s.mkdirs(rootRel, rootRel); err != nil {
			return entryMeta{}, err
		}
		var bytes int64
		for _, n := range names {
			p := path.Join(rootRel, n)
			if err := s.mkdirsBelow(rootRel, path.Dir(p)); err != nil {
				return entryMeta{}, err
			}
			if err := s.root.WriteFile(p, []byte(files[n]), 0o644); err != nil {
				return entryMeta{}, localErr(err)
			}
			if err := s.root.Chmod(p, 0o644); err != nil {
				return entryMeta{}, localErr(err)
			}
			bytes += extract.Charge(int64(len(files[n])))
		}
		// The root and each file's parents are inodes too.
		bytes += int64(len(names)) * extract.BlockSize
		return entryMeta{Bytes: bytes, Files: len(names), Created: s.clock.Now().UTC(), BootID: s.bootID}, nil
	})
	return e, err
}

// mkdirsBelow creates the 0755 directories between root (which exists) and dir.
func (s *store) mkdirsBelow(root, dir string) error {
	rest, _ := strings.CutPrefix(dir, root)
	p := root
	for _, comp := range strings.Split(strings.TrimPrefix(rest, "/"), "/") {
		if comp == "" {
			continue
		}
		p = path.Join(p, comp)
		err := s.root.Mkdir(p, 0o755)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return localErr(err)
		}
		if err := s.root.Chmod(p, 0o755); err != nil {
			return localErr(err)
		}
	}
	return nil
}
