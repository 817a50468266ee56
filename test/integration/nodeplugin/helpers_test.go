// Package nodeplugin holds the root-only integration tests of the node plugin: real bind and
// overlay mounts under a temporary kubelet dir, the gRPC server over a unix socket, restarts,
// the mount-leak test and the publish benchmark.
package nodeplugin

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/library/librarytest"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// plugin is a running node plugin (nodeplugintest.Plugin) over a temporary kubelet dir, with
// its host directories and a library store that serves test directories (librarytest).
type plugin struct {
	*nodeplugintest.Plugin
	host  string
	store *librarytest.Store
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
		store:  librarytest.New(filepath.Join(np.Root, "cache")),
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
