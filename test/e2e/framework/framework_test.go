package framework

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestParseMountInfo(t *testing.T) {
	const info = `47 42 254:0 /srv/agent\040shared /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/shared/mount ro,nosuid,nodev,relatime shared:6 master:2 - ext4 /dev/vda rw,discard
80 27 0:60 / /var/lib/kubelet/pods/u2/volumes/kubernetes.io~csi/apm-csi-libraries/mount rw,nosuid,nodev,relatime - overlay apm-csi rw,lowerdir+=/state/store/images/a/rootfs/datadog-init/package,lowerdir+=/state/store/generated/b/root,upperdir=/state/overlays/v/upper,workdir=/state/overlays/v/work,index=off,metacopy=off
81 27 0:61 / /mnt/legacy rw - overlay overlay ro,lowerdir=/l/one:/l/two\:colon:/l/three
`
	file := filepath.Join(t.TempDir(), "mountinfo")
	if err := os.WriteFile(file, []byte(info), 0o644); err != nil {
		t.Fatal(err)
	}
	ms, err := readMounts(file)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 3 {
		t.Fatalf("%d mounts", len(ms))
	}
	if ms[0].Root != "/srv/agent shared" || !ms[0].ReadOnly() || ms[0].FSType != "ext4" {
		t.Errorf("bind mount: %+v", ms[0])
	}
	if got := ms[1].LowerDirs(); !reflect.DeepEqual(got, []string{"/state/store/images/a/rootfs/datadog-init/package", "/state/store/generated/b/root"}) {
		t.Errorf("lowerdir+ layers: %q", got)
	}
	if u, _ := ms[1].Option("upperdir"); u != "/state/overlays/v/upper" || ms[1].ReadOnly() {
		t.Errorf("overlay: upper %q, %+v", u, ms[1])
	}
	if got := ms[2].LowerDirs(); !reflect.DeepEqual(got, []string{"/l/one", "/l/two:colon", "/l/three"}) {
		t.Errorf("legacy lowerdir: %q", got)
	}
	csi := CSIMountsUnder(ms, "/var/lib/kubelet")
	if len(csi) != 2 {
		t.Errorf("CSI mounts under the kubelet dir: %+v", csi)
	}
	if got := MountsWithOptionUnder(ms, "/state"); len(got) != 1 || got[0].MountPoint != ms[1].MountPoint {
		t.Errorf("overlays using /state: %+v", got)
	}
	if got := MountsAt(ms, "/mnt/legacy"); len(got) != 1 {
		t.Errorf("MountsAt: %+v", got)
	}
}
