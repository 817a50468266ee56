package writablelayer_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
	"github.com/apm-csi/apm-csi/test/testenv"
)

const testLimit = 8 << 20

// newManager is writablelayer.New, with the manager closed when the test ends: its background
// removal must not hold the test's filesystem when that is unmounted.
func newManager(t *testing.T, dir string, want writablelayer.Mechanism) (*writablelayer.Manager, error) {
	m, err := writablelayer.New(dir, want)
	if err == nil {
		t.Cleanup(func() { m.Close() })
	}
	return m, err
}

// quotaFS is an ext4 filesystem that enforces project quotas, with a dir for volume dirs.
func quotaFS(t *testing.T) string {
	mnt := nodeplugintest.Ext4(t, 128, "quota,project", "prjquota")
	dir := filepath.Join(mnt, "overlays")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestNewChoosesProjectQuotasOnlyWhereTheyAreEnforced(t *testing.T) {
	for _, tc := range []struct {
		name, features, options string
		want                    writablelayer.Mechanism
		reason                  string
	}{
		{"ext4 with project quotas enforced", "quota,project", "prjquota", writablelayer.ProjectQuota, "enforces project quotas"},
		{"ext4 with project quotas accounted only", "quota,project", "", writablelayer.Tmpfs, "does not enforce"},
		{"ext4 without quotas", "", "", writablelayer.Tmpfs, "has no quotas enabled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := nodeplugintest.Ext4(t, 64, tc.features, tc.options)
			m, err := newManager(t, dir, writablelayer.Auto)
			if err != nil {
				t.Fatal(err)
			}
			if m.Mechanism() != tc.want || !strings.Contains(m.Reason(), tc.reason) {
				t.Errorf("mechanism %s (%s), want %s with a reason saying %q", m.Mechanism(), m.Reason(), tc.want, tc.reason)
			}
			_, err = writablelayer.New(dir, writablelayer.ProjectQuota)
			if (err == nil) != (tc.want == writablelayer.ProjectQuota) {
				t.Errorf("New(ProjectQuota) = %v", err)
			}
		})
	}
}

// layerOverlay prepares a writable layer in dir/vol with the limit and mounts an overlay of it
// over a lower dir, as the driver does; it returns the mount point.
func layerOverlay(t *testing.T, m writablelayer.Interface, dir string, limit int64) (vol, target string) {
	t.Helper()
	root := t.TempDir()
	lower, lower2 := filepath.Join(root, "lower"), filepath.Join(root, "lower2")
	target = filepath.Join(root, "target")
	for _, d := range []string{lower, lower2, target} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(lower, "library.txt"), []byte("tracer"), 0o644); err != nil {
		t.Fatal(err)
	}
	vol = filepath.Join(dir, "vol-"+filepath.Base(root))
	if err := m.Prepare(vol, limit); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Release(vol); err != nil {
			t.Error(err)
		}
	})
	upper, work := writablelayer.Paths(vol)
	mnt := mounter.New()
	if err := m.Mount(func() error {
		return mnt.Overlay(target, mounter.Overlay{Lower: []string{lower, lower2}, Upper: upper, Work: work})
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// EINVAL: the test unmounted it already.
		if err := unix.Unmount(target, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			t.Error(err)
		}
	})
	return vol, target
}

func statfsUsed(t *testing.T, dir string) int64 {
	t.Helper()
	unix.Sync()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

func checkFilledToLimit(t *testing.T, res nodeplugintest.FillResult, limit int64) {
	t.Helper()
	t.Logf("writer stopped after %d bytes (limit %d): %s", res.Written, limit, res.Err)
	if !res.IsOutOfSpace() {
		t.Fatalf("writer was not stopped by ENOSPC/EDQUOT: wrote %d bytes of a %d limit, error %q", res.Written, limit, res.Err)
	}
	if res.Written > limit || res.Written < limit-limit/8 {
		t.Errorf("writer stopped after %d bytes, want about the limit of %d", res.Written, limit)
	}
}

func TestProjectQuotaStopsAPodAtItsLimit(t *testing.T) {
	dir := quotaFS(t)
	m, err := newManager(t, dir, writablelayer.Auto)
	if err != nil {
		t.Fatal(err)
	}
	if m.Mechanism() != writablelayer.ProjectQuota {
		t.Fatalf("mechanism %s: %s", m.Mechanism(), m.Reason())
	}
	vol, target := layerOverlay(t, m, dir, testLimit)
	other, otherTarget := layerOverlay(t, m, dir, testLimit)
	id, limit, _, err := writablelayer.ProjectLimits(vol)
	if err != nil {
		t.Fatal(err)
	}
	otherID, _, _, err := writablelayer.ProjectLimits(other)
	if err != nil {
		t.Fatal(err)
	}
	if id == otherID || limit != testLimit {
		t.Fatalf("volumes got projects %d and %d, limit %d", id, otherID, limit)
	}
	// The pod sees its limit as the size of its volume.
	checkVolumeSize(t, target, testLimit)

	before := statfsUsed(t, dir)
	checkFilledToLimit(t, nodeplugintest.Fill(t, filepath.Join(target, "fill"), 4*testLimit), testLimit)
	if grew := statfsUsed(t, dir) - before; grew > testLimit+1<<20 {
		t.Errorf("the node filesystem grew by %d bytes for a %d limit", grew, testLimit)
	}
	// Another volume on the same filesystem is unaffected.
	if res := nodeplugintest.Fill(t, filepath.Join(otherTarget, "small"), 1<<20); res.Err != "" || res.Written != 1<<20 {
		t.Errorf("another volume could not write 1 MiB: %+v", res)
	}

	if err := unix.Unmount(target, 0); err != nil {
		t.Fatal(err)
	}
	if err := m.Release(vol); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(vol); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("volume dir still there: %v", err)
	}
	if limit, used, err := writablelayer.ProjectQuotaOf(dir, id); err != nil || limit != 0 || used != 0 {
		t.Errorf("project %d after release: limit %d, used %d, %v; want both 0", id, limit, used, err)
	}
}

func TestTmpfsStopsAPodAtItsLimit(t *testing.T) {
	testenv.RequireRoot(t)
	// The state dir on a filesystem of its own, so that its usage is not moved by other
	// writers on the machine.
	dir := filepath.Join(nodeplugintest.Ext4(t, 64, "", ""), "overlays")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	m, err := newManager(t, dir, writablelayer.Tmpfs)
	if err != nil {
		t.Fatal(err)
	}
	vol, target := layerOverlay(t, m, dir, testLimit)
	_, otherTarget := layerOverlay(t, m, dir, testLimit)
	checkVolumeSize(t, target, testLimit)
	before := statfsUsed(t, dir)
	checkFilledToLimit(t, nodeplugintest.Fill(t, filepath.Join(target, "fill"), 4*testLimit), testLimit)
	if grew := statfsUsed(t, dir) - before; grew > 1<<20 {
		t.Errorf("the node filesystem grew by %d bytes", grew)
	}
	if res := nodeplugintest.Fill(t, filepath.Join(otherTarget, "small"), 1<<20); res.Err != "" || res.Written != 1<<20 {
		t.Errorf("another volume could not write 1 MiB: %+v", res)
	}
	if err := unix.Unmount(target, 0); err != nil {
		t.Fatal(err)
	}
	if err := m.Release(vol); err != nil {
		t.Fatal(err)
	}
	if n := nodeplugintest.CountMounts(t, vol); n != 0 {
		t.Errorf("%d mounts left on the volume dir", n)
	}
	if _, err := os.Stat(vol); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("volume dir still there: %v", err)
	}
}

// effectiveCaps returns the calling thread's effective capability set (low word).
func effectiveCaps(t *testing.T) uint32 {
	t.Helper()
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		t.Fatal(err)
	}
	return data[0].Effective
}

// TestMountRunsWithoutTheQuotaOverride: the overlay mount (whose credentials overlayfs uses
// for every write to the upper dir) is made without CAP_SYS_RESOURCE, which would let writes
// exceed ext4 quota hard limits, and the thread gets it back afterwards.
func TestMountRunsWithoutTheQuotaOverride(t *testing.T) {
	testenv.RequireRoot(t)
	const bit = 1 << unix.CAP_SYS_RESOURCE
	m, err := newManager(t, t.TempDir(), writablelayer.Tmpfs)
	if err != nil {
		t.Fatal(err)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if effectiveCaps(t)&bit == 0 {
		testenv.Unsupported(t, "this process lacks CAP_SYS_RESOURCE")
	}
	var during uint32
	if err := m.Mount(func() error { during = effectiveCaps(t); return nil }); err != nil {
		t.Fatal(err)
	}
	if during&bit != 0 {
		t.Error("the mount ran with CAP_SYS_RESOURCE")
	}
	if during|bit != effectiveCaps(t) {
		t.Errorf("capabilities during the mount %#x, after %#x: only CAP_SYS_RESOURCE should differ", during, effectiveCaps(t))
	}
	if effectiveCaps(t)&bit == 0 {
		t.Error("CAP_SYS_RESOURCE was not restored")
	}
}

// checkVolumeSize checks that a pod sees its limit as the size of its volume.
func checkVolumeSize(t *testing.T, target string, limit int64) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil {
		t.Fatal(err)
	}
	if size := int64(st.Blocks) * st.Bsize; size != limit {
		t.Errorf("statfs of the volume reports %d bytes, want the limit %d", size, limit)
	}
}

// TestResumeKeepsTheUpperDirWithAFreshWorkDirAndTheLimit: a project-quota layer resumed after
// its overlay went (a node reboot) keeps what its upper dir holds, gets an empty work dir,
// stays charged to its project and takes the new limit; a tmpfs layer cannot be resumed.
func TestResumeKeepsTheUpperDirWithAFreshWorkDirAndTheLimit(t *testing.T) {
	dir := quotaFS(t)
	m, err := newManager(t, dir, writablelayer.ProjectQuota)
	if err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(dir, "vol")
	if err := m.Prepare(vol, testLimit); err != nil {
		t.Fatal(err)
	}
	upper, work := writablelayer.Paths(vol)
	if err := os.WriteFile(filepath.Join(upper, "kept"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(work, "work"), 0o700); err != nil {
		t.Fatal(err)
	}
	id, _, _, err := writablelayer.ProjectLimits(vol)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Resume(vol, 2*testLimit); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(upper, "kept")); err != nil || string(got) != "x" {
		t.Fatalf("upper dir after Resume: %q, %v", got, err)
	}
	if entries, err := os.ReadDir(work); err != nil || len(entries) != 0 {
		t.Fatalf("work dir after Resume: %v, %v; want empty", entries, err)
	}
	gotID, limit, _, err := writablelayer.ProjectLimits(vol)
	if err != nil || gotID != id || limit != 2*testLimit {
		t.Fatalf("after Resume: project %d limit %d (%v); want project %d limit %d", gotID, limit, err, id, 2*testLimit)
	}
	if err := m.Release(vol); err != nil {
		t.Fatal(err)
	}
}

// TestResumeRefusesATmpfsLayer: a tmpfs layer does not outlive a reboot; Resume says so
// rather than mounting an empty layer as if it were the kept one.
func TestResumeRefusesATmpfsLayer(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "overlays")
	m, err := newManager(t, dir, writablelayer.Tmpfs)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Resume(filepath.Join(dir, "vol"), testLimit); err == nil || !strings.Contains(err.Error(), "cannot be resumed") {
		t.Fatalf("Resume of a tmpfs layer: %v", err)
	}
}

// removalBatches lists what the removal dir next to dir (dir-removing/a and b) holds.
func removalBatches(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	for _, b := range []string{"a", "b"} {
		entries, err := os.ReadDir(filepath.Join(dir+"-removing", b))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
		for _, e := range entries {
			out = append(out, b+"/"+e.Name())
		}
	}
	return out
}

// TestReleaseUnmountsAtOnceAndRemovesTheLayerLater: a released layer's tmpfs is gone when
// Release returns, and so is its dir from the layers dir; the dir itself is removed in the
// background, without following what a pod left in it: a link to a file outside removes the
// link, not the file.
func TestReleaseUnmountsAtOnceAndRemovesTheLayerLater(t *testing.T) {
	testenv.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "overlays")
	m, err := newManager(t, dir, writablelayer.Tmpfs)
	if err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(t.TempDir(), "host-file")
	if err := os.WriteFile(outside, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(dir, "vol")
	if err := m.Prepare(vol, testLimit); err != nil {
		t.Fatal(err)
	}
	upper, _ := writablelayer.Paths(vol)
	// What a pod can leave in its upper dir.
	if err := os.Symlink(outside, filepath.Join(upper, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Dir(outside), filepath.Join(upper, "dirlink")); err != nil {
		t.Fatal(err)
	}
	if err := m.Release(vol); err != nil {
		t.Fatal(err)
	}
	if n := nodeplugintest.CountMounts(t, dir); n != 0 {
		t.Errorf("%d mounts left in the layers dir after Release", n)
	}
	if _, err := os.Lstat(vol); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("layer dir still in the layers dir after Release: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := m.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if left := removalBatches(t, dir); len(left) != 0 {
		t.Errorf("after Flush the removal dir still holds %v", left)
	}
	if b, err := os.ReadFile(outside); err != nil || string(b) != "keep" {
		t.Errorf("the file a pod's link pointed to: %q, %v", b, err)
	}
}

// TestReleaseRemovesInPlaceWhereTheLayerCannotBeSetAside: with the removal dir on another
// filesystem (the rename fails with EXDEV), Release removes the layer itself, as it did
// before layers were removed in the background.
func TestReleaseRemovesInPlaceWhereTheLayerCannotBeSetAside(t *testing.T) {
	testenv.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "overlays")
	if err := os.MkdirAll(dir+"-removing", 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("elsewhere", dir+"-removing", "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir+"-removing", unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting the test's tmpfs: %v", err)
		}
	})
	m, err := newManager(t, dir, writablelayer.Tmpfs)
	if err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(dir, "vol")
	if err := m.Prepare(vol, testLimit); err != nil {
		t.Fatal(err)
	}
	if err := m.Release(vol); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(vol); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("layer dir still there after Release: %v", err)
	}
	if left := removalBatches(t, dir); len(left) != 0 {
		t.Errorf("the removal dir on another filesystem holds %v", left)
	}
}
