package framework

import (
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"k8s.io/apimachinery/pkg/types"
)

// Mount is one line of /proc/self/mountinfo. The tests run on the node, so the host's mount
// table is the node's.
type Mount struct {
	MountPoint string
	Root       string
	FSType     string
	Source     string
	// Options are the per-mount options (ro, nosuid, ...); SuperOptions the filesystem's
	// (for overlayfs: lowerdir, upperdir, workdir).
	Options      string
	SuperOptions string
}

// Option returns a filesystem option's value (e.g. "upperdir"), and whether it is present.
func (m Mount) Option(key string) (string, bool) {
	for _, o := range splitOptions(m.SuperOptions) {
		k, v, _ := strings.Cut(o, "=")
		if k == key {
			return v, true
		}
	}
	return "", false
}

// LowerDirs returns an overlay's lower directories, top first: one "lowerdir+=" option per
// layer when the overlay was built with the new mount API (fsconfig), or the ':'-separated
// "lowerdir=" of mount(2).
func (m Mount) LowerDirs() []string {
	var out []string
	for _, o := range splitOptions(m.SuperOptions) {
		if v, ok := strings.CutPrefix(o, "lowerdir+="); ok {
			out = append(out, v)
		}
	}
	if len(out) > 0 {
		return out
	}
	v, ok := m.Option("lowerdir")
	if !ok || v == "" {
		return nil
	}
	// Entries are separated by ':'; a literal ':' is escaped as "\:".
	cur := strings.Builder{}
	for i := 0; i < len(v); i++ {
		switch {
		case v[i] == '\\' && i+1 < len(v):
			i++
			cur.WriteByte(v[i])
		case v[i] == ':':
			out = append(out, cur.String())
			cur.Reset()
		default:
			cur.WriteByte(v[i])
		}
	}
	return append(out, cur.String())
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

// splitOptions splits filesystem options at commas. The paths the node plugin mounts never
// contain one.
func splitOptions(s string) []string { return strings.Split(s, ",") }

func inode(info fs.FileInfo) (uint64, bool) {
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return st.Ino, true
}

// Mounts reads the mount table.
func Mounts() ([]Mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseMountInfo(f)
}

func parseMountInfo(r io.Reader) ([]Mount, error) {
	var out []Mount
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" && i >= 6 {
				sep = i
				break
			}
		}
		if sep < 0 || len(fields) < sep+4 {
			continue
		}
		out = append(out, Mount{
			Root:         unescape(fields[3]),
			MountPoint:   unescape(fields[4]),
			Options:      fields[5],
			FSType:       fields[sep+1],
			Source:       unescape(fields[sep+2]),
			SuperOptions: unescape(fields[sep+3]),
		})
	}
	return out, sc.Err()
}

// unescape decodes mountinfo's octal escapes (\040 for a space, ...).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
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
