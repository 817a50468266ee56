package driver

import (
	"context"
	"log/slog"
	"reflect"
	"testing"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// TestRestartKeepsEveryFieldOfARecord: start-up loads the records without their attributes
// (nothing but diagnostics reads them), yet what Records shows after a restart is the record
// as published, attributes included, and a volume published after the restart has its own.
func TestRestartKeepsEveryFieldOfARecord(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	attrs := libraryAttrs("r.local/a:v1", "r.local/b:v2")
	attrs["csi.storage.k8s.io/pod.name"] = "app"
	if _, err := f.d.NodePublishVolume(ctx, f.publishReq("vol-a", f.target("pod-a"), attrs)); err != nil {
		t.Fatal(err)
	}
	before := f.d.Records()
	if len(before) != 1 || len(before[0].Attributes) == 0 {
		t.Fatalf("records before the restart: %+v", before)
	}

	d2, err := New(Config{NodeID: "node-1", KubeletDir: f.kubelet, StateDir: f.state, Mounter: f.m, WritableLayers: f.wl, Libraries: f.store, Logger: slog.New(slog.NewTextHandler(f.logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d2.Close() })
	if err := d2.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	after := d2.Records()
	if len(after) != 1 || !after[0].Created.Equal(before[0].Created) {
		t.Fatalf("records after the restart: %+v\nwant %+v", after, before)
	}
	after[0].Created = before[0].Created
	if !reflect.DeepEqual(after[0], before[0]) {
		t.Fatalf("record after the restart %+v\nwant %+v", after[0], before[0])
	}

	if _, err := d2.NodePublishVolume(ctx, f.publishReq("vol-b", f.target("pod-b"), libraryAttrs("r.local/c:v3"))); err != nil {
		t.Fatal(err)
	}
	for _, r := range d2.Records() {
		if r.VolumeID == "vol-b" && r.Attributes[volumeattrs.LibraryKey(0, "image")] != "r.local/c:v3" {
			t.Fatalf("record of a volume published after the restart: %+v", r)
		}
	}
}
