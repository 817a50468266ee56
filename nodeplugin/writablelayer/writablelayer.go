// Package writablelayer gives each writable library volume its private overlayfs upper and
// work dirs inside a kernel-enforced size limit, so that a pod filling its volume gets ENOSPC
// or EDQUOT in its own writes and cannot fill the node's disk.
//
// Two mechanisms, chosen once at start for the directory that holds the per-volume dirs
// (<state-dir>/overlays):
//
//   - ProjectQuota, where that directory's filesystem (ext4 or xfs) enforces project quotas
//     (the project feature, mounted with prjquota/pquota): each volume dir gets its own project
//     id, inherited by everything created below it, and a block and inode hard limit. The
//     writes land on the node's disk, inside the limit.
//   - Tmpfs otherwise: each volume dir is a tmpfs mount of the limit's size holding upper and
//     work. The writes live in memory, charged to the memory cgroup of the pod that writes them.
//
// The driver sees only Interface, so that its logic is unit-tested with Fake; the system calls
// are tested as root under test/.
package writablelayer

import (
	"fmt"
	"path/filepath"
)

// Mechanism is what enforces the limit.
type Mechanism string

const (
	// Auto picks ProjectQuota where the filesystem enforces project quotas, Tmpfs elsewhere.
	Auto Mechanism = "auto"
	// ProjectQuota limits each volume dir with an ext4/xfs project quota.
	ProjectQuota Mechanism = "project-quota"
	// Tmpfs makes each volume dir a size-limited tmpfs mount.
	Tmpfs Mechanism = "tmpfs"
)

// Mechanisms lists the values New accepts, for flag help and errors.
var Mechanisms = []Mechanism{Auto, ProjectQuota, Tmpfs}

// Size defaults (bytes): what a volume gets without a writableLimit attribute, and the most an
// attribute may ask for.
const (
	DefaultLimit    int64 = 256 << 20
	DefaultMaxLimit int64 = 1 << 30
)

// Names of the dirs inside a volume dir: the reconcile recognises an overlay's upper and work
// dirs as <overlays>/<key>/upper and <overlays>/<key>/work.
const (
	upperName = "upper"
	workName  = "work"
)

// Paths returns the upper and work dirs Prepare creates inside dir.
func Paths(dir string) (upper, work string) {
	return filepath.Join(dir, upperName), filepath.Join(dir, workName)
}

// Interface is what the driver needs for the writable layer of a volume.
type Interface interface {
	// Mechanism reports what enforces the limits.
	Mechanism() Mechanism
	// Prepare creates dir (an existing empty dir is reused) with the upper and work dirs
	// returned by Paths, whose contents together may not exceed limit bytes. The upper dir is
	// world-writable: it becomes the volume's root directory. On error nothing is left
	// allocated.
	Prepare(dir string, limit int64) error
	// Mount runs mount, the overlay mount that uses a prepared dir, with credentials that
	// cannot exceed the limit: overlayfs writes to its upper dir with its mounter's
	// credentials, and ext4 lets CAP_SYS_RESOURCE write past quota hard limits.
	Mount(mount func() error) error
	// Resume makes a dir that Prepare made and an earlier mount used ready for a new mount
	// that keeps its upper dir: a fresh, empty work dir (overlayfs refuses a used one) and
	// the limit set again. Only ProjectQuota dirs outlive a node reboot; Resume refuses the
	// others. On error dir is left as it was (the caller decides whether to release it).
	Resume(dir string, limit int64) error
	// Used returns the bytes dir's layer takes (for a project-quota layer, what its project
	// is charged).
	Used(dir string) (int64, error)
	// Release frees what Prepare allocated for dir and removes dir, whichever mechanism
	// prepared it (a node may change mechanism between restarts). Anything already gone is
	// fine.
	Release(dir string) error
}

// FormatBytes writes n as a Kubernetes-style binary quantity when it is a whole number of
// KiB, MiB, GiB or TiB (64Mi), in bytes otherwise, for messages.
func FormatBytes(n int64) string {
	for _, u := range []struct {
		suffix string
		size   int64
	}{{"Ti", 1 << 40}, {"Gi", 1 << 30}, {"Mi", 1 << 20}, {"Ki", 1 << 10}} {
		if n >= u.size && n%u.size == 0 {
			return fmt.Sprintf("%d%s", n/u.size, u.suffix)
		}
	}
	return fmt.Sprintf("%d", n)
}

// inodeLimit is how many files, directories and links a volume's writable layer may hold:
// one per 4 KiB of its size, at least 1024. It keeps a pod from using up the node
// filesystem's inodes (project quota) or the node's memory with empty files (tmpfs).
func inodeLimit(limit int64) uint64 {
	return uint64(max(limit/4096, 1024))
}
