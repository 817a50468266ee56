package driver

import (
	"context"
	"os"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// withSocketEntry maps the DSDSocket volume type to entry.
func withSocketEntry(entry string) fixtureOption {
	return func(c *Config) { c.DatadogSockets = map[string]string{volumeattrs.TypeDSDSocket: entry} }
}

// A read-only bind mount is read-only only through its per-mount flag, which a container
// runtime clears when it bind-mounts the target into a container whose volumeMount is not
// readOnly. So every volume served as a read-only bind of host or shared data needs the pod's
// CSI volume to be readOnly (kubelet then mounts it read-only into every container), and a
// read-only library volume is always an overlay, whose superblock no remount makes writable.
func TestReadOnlyVolumesNeedThePodsReadOnlyFlagOrAreOverlays(t *testing.T) {
	tests := []struct {
		name  string
		opts  []fixtureOption
		attrs map[string]string
		// refused: without the CSI readonly flag the publish fails with FailedPrecondition
		// naming this; otherwise it is served as an overlay with no upper dir.
		refused string
	}{
		{name: "read-only hostdir entry", attrs: hostdirAttrs("ro-data"), refused: `hostdir entry "ro-data" is read-only on this node`},
		{name: "writable entry asked read-only by attribute", attrs: map[string]string{"type": "hostdir", "name": "data", "readOnly": "true"}, refused: `the volume asks for hostdir entry "data" read-only`},
		{name: "socket type mapped to a read-only entry", opts: []fixtureOption{withSocketEntry("ro-data")}, attrs: map[string]string{"type": volumeattrs.TypeDSDSocket}, refused: `volume type DSDSocket (mapped to its hostdir entry by --datadog-socket-entry): hostdir entry "ro-data" is read-only`},
		{name: "preload file", attrs: map[string]string{"type": "DatadogInjectorPreload"}, refused: "the preload file (type DatadogInjectorPreload) is always read-only"},
		{name: "read-only single-layer library", attrs: func() map[string]string {
			a := libraryAttrs("r.local/a:v1")
			a["readOnly"] = "true"
			return a
		}()},
	}
	for _, tt := range tests {
		for _, podReadOnly := range []bool{false, true} {
			name := tt.name + "/pod volume writable"
			if podReadOnly {
				name = tt.name + "/pod volume readOnly"
			}
			t.Run(name, func(t *testing.T) {
				f := newFixture(t, tt.opts...)
				target := f.target("pod-a")
				req := f.publishReq("vol-1", target, tt.attrs)
				req.Readonly = podReadOnly
				_, err := f.d.NodePublishVolume(context.Background(), req)
				if tt.refused != "" && !podReadOnly {
					wantCode(t, err, codes.FailedPrecondition, tt.refused, "readOnly: true under the pod's csi: volume source", "re-enable writes")
					if f.m.Len() != 0 || len(f.d.Records()) != 0 {
						t.Fatalf("a refused publish left %d mounts, records %+v", f.m.Len(), f.d.Records())
					}
					if _, err := os.Stat(target); !os.IsNotExist(err) {
						t.Fatalf("a refused publish left the target behind: %v", err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				table, _ := f.m.MountTable()
				if len(table) != 1 || !table[0].HasMountOption("ro") {
					t.Fatalf("mounts = %+v, want one read-only mount", table)
				}
				if tt.refused == "" {
					if table[0].FsType != "overlay" {
						t.Fatalf("read-only library served as %s (%+v), want an overlay: a bind of the shared layer could be remounted writable", table[0].FsType, table[0])
					}
					if _, ok := table[0].Option("upperdir"); ok {
						t.Fatalf("read-only library overlay has an upper dir: %+v", table[0])
					}
					if lower := table[0].LowerDirs(); len(lower) != 2 {
						t.Fatalf("lower dirs = %q, want the layer and the empty dir", lower)
					}
				}
			})
		}
	}
}

// The empty lower dir of read-only single-layer library overlays shows through in every such
// volume: a node plugin whose empty dir has content refuses to start rather than serve it.
func TestStartRefusesANonEmptyEmptyDir(t *testing.T) {
	f := newFixture(t)
	if err := os.Chmod(f.state+"/empty", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.state+"/empty/planted", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := f.d.cfg
	if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "must stay empty") {
		t.Fatalf("New with a non-empty empty dir: %v, want a refusal", err)
	}
}
