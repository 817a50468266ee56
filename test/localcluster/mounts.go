package localcluster

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/mount-utils"
)

// mountsUnder lists the mount points at or below dir, deepest first (the order to unmount in).
func mountsUnder(dir string) ([]string, error) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	for _, mi := range infos {
		mp := unescapeMountPath(mi.MountPoint)
		if (mp == dir || strings.HasPrefix(mp, dir+"/")) && !seen[mp] {
			seen[mp] = true
			out = append(out, mp)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		di, dj := strings.Count(out[i], "/"), strings.Count(out[j], "/")
		if di != dj {
			return di > dj
		}
		return out[i] > out[j]
	})
	return out, nil
}

// unescapeMountPath undoes the octal escapes (\040 for space, ...) of /proc/*/mountinfo.
func unescapeMountPath(p string) string {
	if !strings.Contains(p, `\`) {
		return p
	}
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		if p[i] == '\\' && i+3 < len(p) {
			var v int
			if _, err := fmt.Sscanf(p[i+1:i+4], "%03o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(p[i])
	}
	return b.String()
}

// unmountAll unmounts everything at or below dir, deepest first; a busy mount is detached
// lazily (it disappears from the tree now and is released when its last user goes). Stacked
// mounts on one point need several passes.
func unmountAll(dir string) error {
	for pass := 0; pass < 10; pass++ {
		mps, err := mountsUnder(dir)
		if err != nil {
			return err
		}
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			if err := unix.Unmount(mp, unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				_ = unix.Unmount(mp, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
			}
		}
	}
	left, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("mounts left under %s: %s", dir, strings.Join(left, ", "))
	}
	return nil
}

// makeSharedMount turns dir into a mount point of its own with shared propagation (bind it
// onto itself, then make it rshared), so that mounts a privileged pod makes below it with
// Bidirectional propagation (the CSI node plugin's per-pod mounts) reach the host and so the
// kubelet and the application containers.
func makeSharedMount(dir string) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	mps, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	isMountPoint := false
	for _, mp := range mps {
		if mp == filepath.Clean(dir) {
			isMountPoint = true
		}
	}
	if !isMountPoint {
		if err := unix.Mount(dir, dir, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind %s onto itself: %w", dir, err)
		}
	}
	if err := unix.Mount("", dir, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make %s rshared: %w", dir, err)
	}
	return nil
}

// isSharedMount reports whether dir is a mount point with shared propagation.
func isSharedMount(dir string) (bool, error) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	for _, mi := range infos {
		if unescapeMountPath(mi.MountPoint) != dir {
			continue
		}
		for _, opt := range mi.OptionalFields {
			if strings.HasPrefix(opt, "shared:") {
				return true, nil
			}
		}
	}
	return false, nil
}
