// Package configreloadtest provides what tests of configuration reloading share: a directory
// laid out the way kubelet mounts a ConfigMap, updated the way kubelet updates it.
package configreloadtest

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/apm-csi/apm-csi/webhook/config"
)

// ConfigMap is a directory laid out as kubelet mounts a ConfigMap: each version in its own
// timestamped directory, ..data a symlink to the current one (swapped with one rename), and
// config.yaml a symlink through ..data.
type ConfigMap struct {
	dir string
	n   int
}

// MountConfigMap lays out a ConfigMap mount in a temporary directory with config.yaml holding
// content.
func MountConfigMap(t testing.TB, content string) *ConfigMap {
	t.Helper()
	m := &ConfigMap{dir: t.TempDir()}
	m.Update(t, content)
	if err := os.Symlink(filepath.Join("..data", "config.yaml"), m.Path()); err != nil {
		t.Fatal(err)
	}
	return m
}

// Path is the mounted config.yaml.
func (m *ConfigMap) Path() string { return filepath.Join(m.dir, "config.yaml") }

// Update writes a new version and swaps ..data to it in one rename, as kubelet does.
func (m *ConfigMap) Update(t testing.TB, content string) {
	t.Helper()
	m.n++
	ts := fmt.Sprintf("..2026_12_05_21_00_%02d.%d", m.n, m.n)
	if err := os.Mkdir(filepath.Join(m.dir, ts), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(m.dir, ts, "config.yaml"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(m.dir, "..data_tmp")
	if err := os.Symlink(ts, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(m.dir, "..data")); err != nil {
		t.Fatal(err)
	}
}

// Hash is the hash of the configuration content parses to.
func Hash(t testing.TB, content string) string {
	t.Helper()
	c, err := config.Parse([]byte(content))
	if err != nil {
		t.Fatal(err)
	}
	return c.Hash()
}
