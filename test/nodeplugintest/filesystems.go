package nodeplugintest

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/test/testenv"
)

// Ext4 makes a fresh ext4 filesystem of sizeMiB in a sparse image file, attaches it to a loop
// device and mounts it with mountOptions (e.g. "prjquota") on a new directory, which it
// returns. features are mkfs.ext4 -O features (e.g. "quota,project"; empty for the
// defaults). The filesystem is unmounted and the loop device detached at cleanup, after
// cleanups registered later (a plugin using it) have run. It needs root, mkfs.ext4 (Debian's
// e2fsprogs) and losetup; a missing one skips the test locally and fails it under CI.
func Ext4(t testing.TB, sizeMiB int, features, mountOptions string) string {
	t.Helper()
	testenv.RequireRoot(t)
	mkfs := testenv.RequireBinary(t, "mkfs.ext4")
	losetup := testenv.RequireBinary(t, "losetup")
	dir := t.TempDir()
	image := filepath.Join(dir, "fs.img")
	f, err := os.Create(image)
	if err != nil {
		t.Fatal(err)
	}
	err = f.Truncate(int64(sizeMiB) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"-q", "-F", "-m", "0"}
	if features != "" {
		args = append(args, "-O", features)
	}
	if out, err := exec.Command(mkfs, append(args, image)...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	out, err := exec.Command(losetup, "--find", "--show", image).CombinedOutput()
	if err != nil {
		testenv.Missing(t, "no loop device: losetup --find --show: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command(losetup, "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev, mnt, "ext4", 0, mountOptions); err != nil {
		if errors.Is(err, unix.EINVAL) && strings.Contains(features, "quota") {
			testenv.Unsupported(t, "this kernel cannot mount ext4 with the quota feature (it needs CONFIG_QUOTA and CONFIG_QFMT_V2; see dmesg): mount %s on %s -o %q: %v", dev, mnt, mountOptions, err)
		}
		t.Fatalf("mount %s on %s -o %q: %v", dev, mnt, mountOptions, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
			if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
				t.Errorf("detach %s: %v", mnt, err)
			}
		}
	})
	return mnt
}

// FillResult is what a writer that wrote until it failed got.
type FillResult struct {
	// Written is the size of the file when the writer stopped.
	Written int64
	// Err is the error of the write that failed, as dd reported it (strerror text).
	Err string
}

// IsOutOfSpace reports whether the writer stopped on ENOSPC or EDQUOT.
func (r FillResult) IsOutOfSpace() bool {
	e := strings.ToLower(r.Err)
	return strings.Contains(e, unix.ENOSPC.Error()) || strings.Contains(e, unix.EDQUOT.Error())
}

// Fill writes zeros to a new file at path from a separate process running as uid and gid
// 65534 (no capabilities, like a pod's process), in 64 KiB writes, until a write fails or
// maxBytes are written. The test creates the file and hands it to the writer as its standard
// output, so the writer needs no access to the directories above it.
func Fill(t testing.TB, path string, maxBytes int64) FillResult {
	t.Helper()
	dd := testenv.RequireBinary(t, "dd")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatalf("writer: %v", err)
	}
	defer f.Close()
	var stderr bytes.Buffer
	cmd := exec.Command(dd, "if=/dev/zero", "bs=64K", "count="+strconv.FormatInt((maxBytes+64<<10-1)/(64<<10), 10), "status=none")
	cmd.Stdout, cmd.Stderr = f, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	runErr := cmd.Run()
	fi, err := f.Stat()
	if err != nil {
		t.Fatalf("writer: %v", err)
	}
	res := FillResult{Written: fi.Size()}
	if runErr != nil {
		res.Err = strings.TrimSpace(stderr.String())
		if res.Err == "" {
			res.Err = runErr.Error()
		}
	}
	return res
}
