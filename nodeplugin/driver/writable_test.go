package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
)

func withWritableLimits(def, maxLimit int64) fixtureOption {
	return func(c *Config) { c.DefaultWritableLimit, c.MaxWritableLimit = def, maxLimit }
}

func TestWritableLayerGetsTheAskedOrDefaultLimit(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  []fixtureOption
		limit string // writableLimit attribute; "" for none
		want  int64
	}{
		{name: "built-in default", want: writablelayer.DefaultLimit},
		{name: "node default", opts: []fixtureOption{withWritableLimits(32<<20, 1<<30)}, want: 32 << 20},
		{name: "attribute", limit: "64Mi", want: 64 << 20},
		{name: "attribute at the maximum", opts: []fixtureOption{withWritableLimits(64<<20, 128<<20)}, limit: "128Mi", want: 128 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, tc.opts...)
			attrs := libraryAttrs("r.local/a:v1")
			if tc.limit != "" {
				attrs["writableLimit"] = tc.limit
			}
			target := f.target("pod-a")
			if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", target, attrs)); err != nil {
				t.Fatal(err)
			}
			rec := f.d.Records()[0]
			if got := f.wl.Limits(); len(got) != 1 || got[rec.OverlayDir] != tc.want {
				t.Fatalf("prepared layers %v, want %s limited to %d", got, rec.OverlayDir, tc.want)
			}
			if rec.WritableLimit != tc.want || rec.WritableLayer != string(writablelayer.Tmpfs) {
				t.Errorf("record says limit %d by %q", rec.WritableLimit, rec.WritableLayer)
			}
			// The overlay was mounted through the layer's Mount, with the layer's dirs.
			if f.wl.Mounts() != 1 {
				t.Errorf("%d mounts through the writable layer, want 1", f.wl.Mounts())
			}
			upper, work := writablelayer.Paths(rec.OverlayDir)
			table, _ := f.m.MountTable()
			if u, _ := table[0].Option("upperdir"); u != upper {
				t.Errorf("upperdir %q, want %q", u, upper)
			}
			if w, _ := table[0].Option("workdir"); w != work {
				t.Errorf("workdir %q, want %q", w, work)
			}

			if _, err := f.d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: target}); err != nil {
				t.Fatal(err)
			}
			if got := f.wl.Limits(); len(got) != 0 {
				t.Errorf("layers not released after unpublish: %v", got)
			}
			if rel := f.wl.Released(); len(rel) != 1 || rel[0] != rec.OverlayDir {
				t.Errorf("released %q, want %s", rel, rec.OverlayDir)
			}
		})
	}
}

func TestWritableLimitAboveTheMaximumIsRefusedBeforeAnythingIsAllocated(t *testing.T) {
	for _, readonly := range []bool{false, true} {
		f := newFixture(t, withWritableLimits(0, 512<<20))
		attrs := libraryAttrs("r.local/a:v1")
		attrs["writableLimit"] = "2Gi"
		target := f.target("pod-a")
		req := f.publishReq("vol-1", target, attrs)
		req.Readonly = readonly
		_, err := f.d.NodePublishVolume(context.Background(), req)
		wantCode(t, err, codes.InvalidArgument, `volume attribute "writableLimit" asks for a writable layer of 2Gi (2147483648 bytes)`, "512Mi (536870912 bytes)", "--max-writable-layer")
		if f.store.Calls() != 0 {
			t.Errorf("the library store was asked for %d layers", f.store.Calls())
		}
		if len(f.wl.Limits()) != 0 || f.m.Len() != 0 || len(f.d.Records()) != 0 {
			t.Errorf("allocated: layers %v, %d mounts, records %+v", f.wl.Limits(), f.m.Len(), f.d.Records())
		}
		if _, err := os.Stat(target); !os.IsNotExist(err) {
			t.Error("target created")
		}
	}
}

func TestWritableLayerFailureFreesEverything(t *testing.T) {
	for _, step := range []string{"prepare", "overlay mount"} {
		t.Run(step, func(t *testing.T) {
			f := newFixture(t)
			if step == "prepare" {
				f.wl.PrepareErr = errors.New("tmpfs: ENOMEM")
			} else {
				f.m.Errors["overlay"] = errors.New("EPERM")
			}
			target := f.target("pod-a")
			_, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", target, libraryAttrs("r.local/a:v1")))
			wantCode(t, err, codes.Internal)
			if step == "prepare" && !strings.Contains(err.Error(), "preparing the writable layer: tmpfs: ENOMEM") {
				t.Errorf("error %q does not say what failed", err)
			}
			if list, _ := f.d.store.List(); len(list) != 0 {
				t.Errorf("records left: %+v", list)
			}
			if len(f.wl.Limits()) != 0 {
				t.Errorf("writable layers left: %v", f.wl.Limits())
			}
			if entries, _ := os.ReadDir(filepath.Join(f.state, "overlays")); len(entries) != 0 {
				t.Errorf("overlay dirs left: %v", entries)
			}
			if _, err := os.Stat(target); !os.IsNotExist(err) {
				t.Error("target left behind")
			}
		})
	}
}

func TestReconcileReleasesOrphanWritableLayers(t *testing.T) {
	f := newFixture(t)
	orphan := filepath.Join(f.state, "overlays", "orphan")
	if err := f.wl.Prepare(orphan, 1<<20); err != nil {
		t.Fatal(err)
	}
	d, err := New(Config{NodeID: "node-1", KubeletDir: f.kubelet, StateDir: f.state, Mounter: f.m, WritableLayers: f.wl, Libraries: f.store})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	if rel := f.wl.Released(); len(rel) != 1 || rel[0] != orphan {
		t.Errorf("released %q, want the orphan %s", rel, orphan)
	}
}

func TestNewRefusesADefaultWritableLimitAboveTheMaximum(t *testing.T) {
	root := t.TempDir()
	_, err := New(Config{NodeID: "n", KubeletDir: filepath.Join(root, "k"), StateDir: filepath.Join(root, "s"), Mounter: mounter.NewFake(),
		WritableLayers: writablelayer.NewFake(), DefaultWritableLimit: 2 << 30, MaxWritableLimit: 1 << 30})
	if err == nil || !strings.Contains(err.Error(), "2Gi") || !strings.Contains(err.Error(), "--max-writable-layer") {
		t.Fatalf("New = %v, want an error naming both sizes and the flags", err)
	}
	if _, err := New(Config{NodeID: "n", KubeletDir: filepath.Join(root, "k"), StateDir: filepath.Join(root, "s"), Mounter: mounter.NewFake()}); err == nil {
		t.Fatal("New accepted a config without writable layers")
	}
}

// TestProjectQuotaUpperIsVolatile: an upper dir on the state dir's filesystem (project
// quota) is mounted volatile, so that its unmount does not write back the whole filesystem;
// a tmpfs one is not (it has nothing to write back).
func TestProjectQuotaUpperIsVolatile(t *testing.T) {
	for _, mech := range []writablelayer.Mechanism{writablelayer.ProjectQuota, writablelayer.Tmpfs} {
		t.Run(string(mech), func(t *testing.T) {
			f := newFixture(t)
			f.wl.Mech = mech
			if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", f.target("pod-a"), libraryAttrs("r.local/a:v1"))); err != nil {
				t.Fatal(err)
			}
			table, _ := f.m.MountTable()
			if got, want := slices.Contains(table[0].SuperOptions, "volatile"), mech == writablelayer.ProjectQuota; got != want {
				t.Fatalf("overlay options %q: volatile %t, want %t", table[0].SuperOptions, got, want)
			}
		})
	}
}

// TestKeepingWritableLayersNeedsProjectQuotas: --keep-writable-layers with tmpfs writable
// layers (which a reboot empties) is refused at start with a message naming both settings.
func TestKeepingWritableLayersNeedsProjectQuotas(t *testing.T) {
	root := t.TempDir()
	_, err := New(Config{NodeID: "n", KubeletDir: filepath.Join(root, "kubelet"), StateDir: filepath.Join(root, "state"),
		Mounter: mounter.NewFake(), WritableLayers: writablelayer.NewFake(), KeepWritableLayers: true})
	if err == nil || !strings.Contains(err.Error(), "--keep-writable-layers") || !strings.Contains(err.Error(), "project-quota") {
		t.Fatalf("New with kept tmpfs layers: %v", err)
	}
}

// TestKeptRecordWithoutALayerGetsAFreshOne: with --keep-writable-layers, a kept record whose
// layer was never made (a crash between writing the record and preparing the layer) does not
// fail the next publish of its volume: the publish prepares a fresh layer.
func TestKeptRecordWithoutALayerGetsAFreshOne(t *testing.T) {
	f := newFixture(t, func(c *Config) {
		layers := writablelayer.NewFake()
		layers.Mech = writablelayer.ProjectQuota
		c.WritableLayers, c.KeepWritableLayers = layers, true
	})
	ctx := context.Background()
	target := f.target("pod-a")
	req := f.publishReq("vol-a", target, libraryAttrs("r.local/a:v1"))
	if _, err := f.d.NodePublishVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	rec := f.d.record(target)
	// The reboot: the mount is gone, and so (the crash) is the layer.
	if err := f.m.Forget(target); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(rec.OverlayDir); err != nil {
		t.Fatal(err)
	}
	if err := f.d.Close(); err != nil {
		t.Fatal(err)
	}
	d, err := New(f.d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	if err := d.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if d.record(target) == nil {
		t.Fatal("the kept record was dropped at start")
	}
	if _, err := d.NodePublishVolume(ctx, req); err != nil {
		t.Fatalf("publish of a kept record without its layer: %v", err)
	}
	if upper, _ := writablelayer.Paths(rec.OverlayDir); !dirExists(upper) {
		t.Fatal("no fresh upper dir after the publish")
	}
}

func dirExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}
