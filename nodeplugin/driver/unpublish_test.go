package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
)

func unpublish(f *fixture, volumeID, target string) error {
	_, err := f.d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target})
	return err
}

func TestUnpublish(t *testing.T) {
	t.Run("a request without volume id or target path is refused", func(t *testing.T) {
		f := newFixture(t)
		for _, tc := range []struct{ volumeID, target, field string }{
			{"", f.target("pod-a"), "volume_id"},
			{"v", "", "target_path"},
		} {
			wantCode(t, unpublish(f, tc.volumeID, tc.target), codes.InvalidArgument, tc.field)
		}
	})

	t.Run("a path that is not a kubelet CSI target is OK and left alone", func(t *testing.T) {
		f := newFixture(t)
		for _, p := range []string{"/etc/passwd", f.kubelet + "/pods/../plugins/x", f.kubelet + "/pods/u/volumes/kubernetes.io~csi/v/mount/.."} {
			if err := unpublish(f, "v", p); err != nil {
				t.Fatalf("unpublish of %s: %v", p, err)
			}
		}
		if len(f.m.Calls) != 0 {
			t.Fatalf("unpublish of paths that are not targets called the mounter: %q", f.m.Calls)
		}
	})

	t.Run("a target never published is OK", func(t *testing.T) {
		f := newFixture(t)
		if err := unpublish(f, "never", f.target("pod-a")); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("another volume id leaves the published volume mounted", func(t *testing.T) {
		f := newFixture(t)
		target := f.target("pod-a")
		if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", target, hostdirAttrs("data"))); err != nil {
			t.Fatal(err)
		}
		if err := unpublish(f, "vol-other", target); err != nil {
			t.Fatal(err)
		}
		if f.m.Mounts(target) != 1 || len(f.d.Records()) != 1 {
			t.Fatal("unpublish of another volume removed this one's mount or record")
		}
	})

	t.Run("the mount and the record and the target go but not the host dir; a repeat is OK", func(t *testing.T) {
		f := newFixture(t)
		target := f.target("pod-a")
		if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", target, hostdirAttrs("data"))); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if err := unpublish(f, "vol-1", target); err != nil {
				t.Fatal(err)
			}
		}
		if f.m.Len() != 0 || len(f.d.Records()) != 0 {
			t.Fatal("unpublish left state")
		}
		if _, err := os.Stat(target); !os.IsNotExist(err) {
			t.Fatal("target not removed")
		}
		if _, err := os.Stat(filepath.Join(f.host, "data")); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("mounts stacked by an older publish are all removed", func(t *testing.T) {
		f := newFixture(t)
		target := f.target("pod-a")
		if err := os.MkdirAll(target, 0o755); err != nil {
			t.Fatal(err)
		}
		for range 5 {
			f.m.Add(mounter.Entry{MountPoint: target, FsType: "bind"})
		}
		if err := unpublish(f, "vol-1", target); err != nil {
			t.Fatal(err)
		}
		if f.m.Mounts(target) != 0 {
			t.Fatalf("%d stacked mounts left", f.m.Mounts(target))
		}
	})

	t.Run("data that did not come from the plugin is reported, not deleted", func(t *testing.T) {
		f := newFixture(t)
		target := f.target("pod-a")
		if err := os.MkdirAll(target, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(target, "keep"), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		wantCode(t, unpublish(f, "vol-1", target), codes.Internal, "non-empty")
		if _, err := os.Stat(filepath.Join(target, "keep")); err != nil {
			t.Fatal("unpublish deleted data")
		}
	})

	t.Run("a failed unmount keeps the record", func(t *testing.T) {
		f := newFixture(t)
		f.m.Errors["unmount"] = errors.New("EBUSY")
		if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-2", f.target("pod-b"), hostdirAttrs("data"))); err != nil {
			t.Fatal(err)
		}
		wantCode(t, unpublish(f, "vol-2", f.target("pod-b")), codes.Internal, "EBUSY")
		if len(f.d.Records()) != 1 {
			t.Fatal("the record of a volume that is still mounted was dropped")
		}
	})
}
