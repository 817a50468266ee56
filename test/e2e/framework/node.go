package framework

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"k8s.io/apimachinery/pkg/types"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
)

// Mount is one line of /proc/self/mountinfo. The tests run on the node, so the host's mount
// table is the node's.
type Mount struct {
	MountPoint string
	Root       string
	FSType     string
	Source     string
	// Options are the per-mount options (ro, nosuid, ...); SuperOptions the filesystem's
	// (for overlayfs: lowerdir, upperdir, workdir), as the kernel writes them (octal escapes).
	Options      string
	SuperOptions string
}

// Option returns a filesystem option's value (e.g. "upperdir"), and whether it is present.
func (m Mount) Option(key string) (string, bool) { return m.entry().Option(key) }

// LowerDirs returns an overlay's lower directories, top first: one "lowerdir+=" option per
// layer when the overlay was built with the new mount API (fsconfig), or the ':'-separated
// "lowerdir=" of mount(2). The node plugin's parser reads them (mounter.Entry.LowerDirs).
func (m Mount) LowerDirs() []string { return m.entry().LowerDirs() }

func (m Mount) entry() mounter.Entry {
	return mounter.Entry{FsType: m.FSType, SuperOptions: strings.Split(m.SuperOptions, ",")}
}

// ReadOnly reports whether the mount is read-only.
func (m Mount) ReadOnly() bool {
	for _, o := range strings.Split(m.Options, ",") {
		if o == "ro" {
			return true
		}
	}
	return false
}

func inode(info fs.FileInfo) (uint64, bool) {
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return st.Ino, true
}

// Mounts reads the mount table, with the node plugin's parser (mounter.ReadMountTable).
func Mounts() ([]Mount, error) { return readMounts("/proc/self/mountinfo") }

func readMounts(mountInfo string) ([]Mount, error) {
	table, err := mounter.ReadMountTable(mountInfo)
	if err != nil {
		return nil, err
	}
	out := make([]Mount, 0, len(table))
	for _, e := range table {
		out = append(out, Mount{
			MountPoint:   e.MountPoint,
			Root:         e.Root,
			FSType:       e.FsType,
			Source:       e.Source,
			Options:      strings.Join(e.MountOptions, ","),
			SuperOptions: strings.Join(e.SuperOptions, ","),
		})
	}
	return out, nil
}

// CSIMountDir is where kubelet has a pod's CSI volume mounted (the target path it passes to
// NodePublishVolume).
func CSIMountDir(kubeletDir string, pod types.UID, volume string) string {
	return filepath.Join(kubeletDir, "pods", string(pod), "volumes", "kubernetes.io~csi", volume, "mount")
}

// MountsAt returns the mounts whose mount point is exactly dir (stacked mounts appear once
// each).
func MountsAt(all []Mount, dir string) []Mount {
	var out []Mount
	for _, m := range all {
		if m.MountPoint == dir {
			out = append(out, m)
		}
	}
	return out
}

// CSIMountsUnder returns every mount below kubelet's pods dir that is an apm-csi volume
// target (kubernetes.io~csi/<volume>/mount) or below one.
func CSIMountsUnder(all []Mount, kubeletDir string) []Mount {
	prefix := filepath.Join(kubeletDir, "pods") + "/"
	var out []Mount
	for _, m := range all {
		if strings.HasPrefix(m.MountPoint, prefix) && strings.Contains(m.MountPoint, "/volumes/kubernetes.io~csi/") {
			out = append(out, m)
		}
	}
	return out
}

// MountsWithOptionUnder returns the overlay mounts that use a directory below dir as their
// upper dir or as one of their lower dirs.
func MountsWithOptionUnder(all []Mount, dir string) []Mount {
	var out []Mount
	for _, m := range all {
		if m.FSType != "overlay" {
			continue
		}
		dirs := m.LowerDirs()
		if u, ok := m.Option("upperdir"); ok {
			dirs = append(dirs, u)
		}
		for _, d := range dirs {
			if strings.HasPrefix(d, dir+"/") || d == dir {
				out = append(out, m)
				break
			}
		}
	}
	return out
}

// Entries lists the names in a directory (none if it does not exist).
func Entries(dir string) ([]string, error) {
	es, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	sort.Strings(out)
	return out, nil
}

// DirUsage returns the number of regular files and their total size below dir, counting each
// inode once (views are hardlink farms of image entries).
func DirUsage(dir string) (files int, bytes int64, err error) {
	seen := map[uint64]bool{}
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if ino, ok := inode(info); ok {
			if seen[ino] {
				return nil
			}
			seen[ino] = true
		}
		files++
		bytes += info.Size()
		return nil
	})
	return files, bytes, err
}

// HumanBytes formats a size.
func HumanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
