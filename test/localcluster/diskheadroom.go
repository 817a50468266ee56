package localcluster

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Disk thresholds of the cluster's kubelet (kubeletConfig): pods are evicted and the node is
// tainted DiskPressure when less than imagefsEvictionPercent of the disk is available, and
// image GC starts at (100 - that) percent used. A cluster started within headroomPercent of
// them would go under pressure while the tests pull and write, and fail with pods Pending for
// a reason that has nothing to do with what they test.
const (
	imagefsEvictionPercent = 15
	headroomPercent        = 2
)

// checkDiskHeadroom refuses to start a cluster whose kubelet or image filesystem (the one
// holding dir) is within headroom percent of the kubelet's eviction threshold. kubelet measures what is available to unprivileged users
// (statfs f_bavail), so the blocks reserved for root do not count as free.
func checkDiskHeadroom(dir string, headroom uint64) error {
	var st unix.Statfs_t
	for {
		err := unix.Statfs(dir, &st)
		if err == nil {
			break
		}
		if !errors.Is(err, fs.ErrNotExist) || filepath.Dir(dir) == dir {
			return fmt.Errorf("checking free disk space at %s: %w", dir, err)
		}
		dir = filepath.Dir(dir)
	}
	total, avail := st.Blocks*uint64(st.Bsize), st.Bavail*uint64(st.Bsize)
	need := total * (imagefsEvictionPercent + headroom) / 100
	if avail >= need {
		return nil
	}
	return fmt.Errorf("the disk holding %s has %.1f GiB available of %.1f GiB (%d%%); the cluster's kubelet, like a real node's, evicts pods and taints the node DiskPressure below %d%% available and starts image GC at %d%% used: free at least %.1f GiB (for example old Go build cache entries, leftover test dirs under /tmp) and run again",
		dir, gib(avail), gib(total), avail*100/total, imagefsEvictionPercent, 100-imagefsEvictionPercent, gib(need-avail))
}

func gib(n uint64) float64 { return float64(n) / (1 << 30) }
