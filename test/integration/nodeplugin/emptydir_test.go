package nodeplugin

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// TestEmptyLowerDirIsAMountOfItsOwn: the empty lower dir of read-only single-layer library
// overlays is a mount of its own while the plugin runs, with none of the writable layers'
// mounts below it (so composing such an overlay does not walk every live volume's mount);
// stopping the plugin releases it without disturbing an overlay that uses it, and the next
// start makes it again.
func TestEmptyLowerDirIsAMountOfItsOwn(t *testing.T) {
	p := startPlugin(t)
	empty := filepath.Join(p.State, "empty")
	if n := nodeplugintest.CountMounts(t, empty); n != 1 {
		t.Fatalf("%d mounts on %s while the plugin runs, want 1", n, empty)
	}
	writable, single := p.Target("pod-a", "apm"), p.Target("pod-b", "apm")
	p.MustPublish("csi-a", writable, nodeplugintest.Ephemeral(injectorAttrs(), "a"), false)
	p.MustPublish("csi-b", single, nodeplugintest.Ephemeral(map[string]string{"type": "library", "library.0.image": "registry.local/dd-lib-java-init:v1"}, "b"), true)
	if m := nodeplugintest.MountsUnder(t, empty); len(m) != 0 {
		t.Fatalf("mounts below the empty dir: %q, want none", m)
	}
	before, err := os.ReadDir(single)
	if err != nil || len(before) == 0 {
		t.Fatalf("the single-layer volume shows %v, %v", before, err)
	}

	p.Stop()
	if n := nodeplugintest.CountMounts(t, empty); n != 0 {
		t.Fatalf("%d mounts on %s after the plugin stopped, want 0", n, empty)
	}
	if after, err := os.ReadDir(single); err != nil || len(after) != len(before) {
		t.Fatalf("the single-layer volume after the plugin stopped shows %v, %v; want %d entries", after, err, len(before))
	}

	p.Start()
	if n := nodeplugintest.CountMounts(t, empty); n != 1 {
		t.Fatalf("%d mounts on %s after a restart, want 1", n, empty)
	}
	p.MustUnpublish("csi-a", writable)
	p.MustUnpublish("csi-b", single)
}
