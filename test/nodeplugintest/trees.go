package nodeplugintest

import (
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// ReadTree returns the regular files below dir (relative path -> content), as a process in
// the container sees them through a volume: relative symlinks that stay inside dir are
// followed (their files appear under the link's path too); absolute symlinks, which resolve
// against the container's root rather than dir, and links leaving dir are not.
func ReadTree(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		switch {
		case d.Type().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out[rel] = string(b)
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if resolved := filepath.Join(filepath.Dir(p), target); !filepath.IsAbs(target) && strings.HasPrefix(resolved, dir+"/") {
				for k, v := range ReadTree(t, resolved) {
					out[filepath.Join(rel, k)] = v
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// DiffTrees compares two ReadTree results and describes every difference, in path order
// ("missing p", "p = got, want w", "unexpected p"); empty means equal.
func DiffTrees(got, want map[string]string) string {
	var d []string
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if g, ok := got[k]; !ok {
			d = append(d, "missing "+k)
		} else if g != want[k] {
			d = append(d, fmt.Sprintf("%s = %q, want %q", k, g, want[k]))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(got)) {
		if _, ok := want[k]; !ok {
			d = append(d, "unexpected "+k)
		}
	}
	return strings.Join(d, "; ")
}

// Prefixed returns files with every path placed below prefix: where a library's files
// (libimages.LibraryFiles) appear in a volume that places it at a target.
func Prefixed(prefix string, files map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range files {
		out[filepath.Join(prefix, k)] = v
	}
	return out
}
