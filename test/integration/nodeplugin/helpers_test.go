// Package nodeplugin holds the root-only integration tests of the node plugin: real bind and
// overlay mounts under a temporary kubelet dir, the gRPC server over a unix socket, restarts,
// the mount-leak test and the publish benchmark.
package nodeplugin

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
	"testing"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// dirStore stands in for the library cache (nodeplugin/librarycache, tested on its own): it
// serves immutable directories that the test filled, which is all the driver relies on.
type dirStore struct {
	root string
	mu   sync.Mutex
	errs map[string]error
}

// layerDir returns (creating it with one file naming the image) the directory for an image.
func (s *dirStore) layerDir(image string) (string, string, error) {
	sum := sha256.Sum256([]byte(image))
	digest := "sha256:" + hex.EncodeToString(sum[:])
	dir := filepath.Join(s.root, "layers", hex.EncodeToString(sum[:6]))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", err
	}
	name := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(image))
	if err := os.WriteFile(name, []byte(image+"\n"), 0o644); err != nil {
		return "", "", err
	}
	return dir, digest, nil
}

func (s *dirStore) LayerFor(ctx context.Context, _ string, lib volumeattrs.Library) (library.Layer, error) {
	s.mu.Lock()
	err := s.errs[lib.Image]
	s.mu.Unlock()
	if err != nil {
		return library.Layer{}, err
	}
	dir, digest, err := s.layerDir(lib.Image)
	return library.Layer{Dir: dir, Digest: digest}, err
}

func (s *dirStore) GeneratedFiles(files map[string]string) (string, error) {
	h := sha256.New()
	for _, k := range slices.Sorted(maps.Keys(files)) {
		fmt.Fprintf(h, "%s\x00%s\x00", k, files[k])
	}
	dir := filepath.Join(s.root, "generated", hex.EncodeToString(h.Sum(nil))[:12])
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

// plugin is a running node plugin (nodeplugintest.Plugin) over a temporary kubelet dir, with
// its host directories and the fake library store.
type plugin struct {
	*nodeplugintest.Plugin
	host  string
	store *dirStore
}

// startPlugin creates the directories, the allowlist (data: writable dir, shared: read-only
// dir, apm-socket: a unix socket file, demo: created on demand, all for every namespace;
// team-a: only for namespace team-a's service account app) and starts the server.
func startPlugin(t testing.TB) *plugin {
	t.Helper()
	p := newPlugin(t)
	p.Start()
	return p
}

// newPlugin is startPlugin without the start, for a test that changes p.Config or p.State
// first.
func newPlugin(t testing.TB) *plugin {
	t.Helper()
	np := nodeplugintest.New(t, nodeplugintest.Config{})
	p := &plugin{
		Plugin: np,
		host:   filepath.Join(np.Root, "host"),
		store:  &dirStore{root: filepath.Join(np.Root, "cache"), errs: map[string]error{}},
	}
	for _, d := range []string{"data", "shared", "team-a"} {
		if err := os.MkdirAll(filepath.Join(p.host, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	all := []string{"*"}
	hosts, err := hostdir.NewSet([]hostdir.Entry{
		{Name: "data", Path: filepath.Join(p.host, "data"), Namespaces: all},
		{Name: "shared", Path: filepath.Join(p.host, "shared"), ReadOnly: true, Namespaces: all},
		{Name: "apm-socket", Path: filepath.Join(p.host, "apm.socket"), Namespaces: all},
		{Name: "demo", Path: filepath.Join(p.host, "demo"), Create: true, Namespaces: all},
		// Team A's directory: only pods of namespace team-a, running as team-a/app.
		{Name: "team-a", Path: filepath.Join(p.host, "team-a"), Namespaces: []string{"team-a"}, ServiceAccounts: []string{"team-a/app"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	np.Config.HostDirs = hosts
	// The fake keeps its content across restarts, as the cache's store does on disk.
	np.Config.Libraries = func() (library.Store, func() error, error) { return p.store, nil, nil }
	return p
}
