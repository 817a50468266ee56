package library

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// BenchmarkCacheHitPublish: "Cache-hit NodePublishVolume of a three-library overlay volume:
// median and p99 (targets: median at most 5 ms, p99 at most 20 ms)". The volume is the
// webhook's injector layout (apm-inject + python + js + the preload file: four lower dirs),
// already cached; each publish goes through the gRPC server and mounts a real overlay with its
// own upper/work dirs and record. Unpublish runs with the timer stopped.
//
// The writable layer is what the node would choose for the temporary dir (tmpfs where its
// filesystem does not enforce project quotas); BenchmarkCacheHitPublishProjectQuota puts the
// state dir on an ext4 that does.
//
//	go test -run '^$' -bench CacheHitPublish -benchtime 1000x -count 5 ./test/integration/library/
func BenchmarkCacheHitPublish(b *testing.B) {
	benchCacheHitPublish(b, options{})
}

// BenchmarkCacheHitPublishProjectQuota is BenchmarkCacheHitPublish with the state dir on an
// ext4 filesystem with project quotas enforced, so that each writable layer is a project.
func BenchmarkCacheHitPublishProjectQuota(b *testing.B) {
	stateFS := nodeplugintest.Ext4(b, 1024, "quota,project", "prjquota")
	benchCacheHitPublish(b, options{stateDir: filepath.Join(stateFS, "state"), writable: writablelayer.ProjectQuota})
}

func benchCacheHitPublish(b *testing.B, opts options) {
	reg := libimages.Start(b)
	opts.registry = reg
	p := startPlugin(b, opts)
	vol := pushInjectorVolume(b, reg, "1.0.0")
	warm := p.Target("warm", "apm")
	p.MustPublish("csi-warm", warm, nodeplugintest.Ephemeral(vol.attrs(), "warm"), false)
	p.MustUnpublish("csi-warm", warm)
	reg.ResetCounts()

	latencies := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		id, pod := fmt.Sprintf("csi-%d", i), fmt.Sprintf("pod-%d", i)
		target := p.Target(pod, "apm")
		attrs := nodeplugintest.Ephemeral(vol.attrs(), pod)
		b.StartTimer()
		start := time.Now()
		err := p.Publish(id, target, attrs, false)
		latencies = append(latencies, time.Since(start))
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		p.MustUnpublish(id, target)
		b.StartTimer()
	}
	b.StopTimer()
	if n := len(reg.Requests()); n != 0 {
		b.Fatalf("cache-hit publishes made %d registry requests", n)
	}
	slices.Sort(latencies)
	b.ReportMetric(ms(percentile(latencies, 50)), "median-ms")
	b.ReportMetric(ms(percentile(latencies, 99)), "p99-ms")
	b.ReportMetric(ms(latencies[len(latencies)-1]), "max-ms")
}

// percentile returns the p-th percentile (nearest rank) of sorted durations.
func percentile(sorted []time.Duration, p int) time.Duration {
	rank := (p*len(sorted) + 99) / 100
	return sorted[max(rank, 1)-1]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// benchLargeLibrary is the size of the java library in the disk benchmark: real tracers are
// tens to hundreds of MB (dd-java-agent alone is about 30 MB).
const benchLargeLibrary = 32 << 20

// BenchmarkDiskPerVolume: "Disk added per extra pod volume (target: zero bytes until the pod
// writes) next to what an init-container copy adds". The volume holds apm-inject, python and a
// 32 MiB java library plus the preload file, already cached. Each iteration publishes
// extraVolumes more volumes of it and measures what they added to the filesystem holding the
// state dir, then copies the same library tree extraVolumes times into emptyDir-like dirs
// under the kubelet dir (what the init containers do) and measures that. The pod and volume
// dirs that kubelet creates in both cases are made before measuring. Both are measured
// two ways: statfs (used blocks of the filesystem, after sync; other processes on the
// machine add noise) and du-style (blocks of every inode below the state dir and the kubelet
// dir, each counted once, without crossing into mounts). Reported per volume:
//
//	volume-du-B      everything a volume adds: its record and its overlay/upper/work dirs
//	                 (the target dir under the mount is hidden from du; statfs sees it)
//	volume-upper-B   file data in the volumes' upper dirs (the pods have not written)
//	volume-statfs-B  statfs view of the same
//	initcopy-du-B, initcopy-statfs-B   the same for one init-container copy
//	library-B        apparent size of the library tree a pod sees
//
//	go test -run '^$' -bench DiskPerVolume -benchtime 1x -count 5 ./test/integration/library/
func BenchmarkDiskPerVolume(b *testing.B) {
	const extraVolumes = 10
	reg := libimages.Start(b)
	p := startPlugin(b, options{registry: reg})
	vol := pushInjectorVolume(b, reg, "1.0.0")
	vol.langs = append(vol.langs[:1], "java")
	big, err := libimages.Large(benchLargeLibrary, 7)
	if err != nil {
		b.Fatal(err)
	}
	vol.libs["java"] = nodeplugintest.Push(b, reg, "datadog/"+libref.PackageName("java"), "large", big)
	first := p.Target("first", "apm")
	p.MustPublish("csi-first", first, nodeplugintest.Ephemeral(vol.attrs(), "first"), false)
	defer p.MustUnpublish("csi-first", first)
	libraryBytes := apparentSize(b, first)

	var volDu, volUpper, volStatfs, copyDu, copyStatfs []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// kubelet creates the pod and volume dirs either way: made before measuring.
		var targets []string
		for v := range extraVolumes {
			targets = append(targets, p.Target(fmt.Sprintf("pod-%d-%d", i, v), "apm"))
		}
		duBefore, fsBefore := p.diskUsage(b), statfsUsed(b, p.State)
		for v, t := range targets {
			p.MustPublish(fmt.Sprintf("csi-%d-%d", i, v), t, nodeplugintest.Ephemeral(vol.attrs(), fmt.Sprintf("pod-%d-%d", i, v)), false)
		}
		duAfter, fsAfter := p.diskUsage(b), statfsUsed(b, p.State)
		volDu = append(volDu, float64(duAfter-duBefore)/extraVolumes)
		volStatfs = append(volStatfs, float64(fsAfter-fsBefore)/extraVolumes)
		volUpper = append(volUpper, float64(fileBlocks(b, filepath.Join(p.State, "overlays")))/extraVolumes)
		for v, t := range targets {
			p.MustUnpublish(fmt.Sprintf("csi-%d-%d", i, v), t)
		}

		var emptyDirs, copies []string
		for v := range extraVolumes {
			dir := filepath.Join(p.Kubelet, "pods", fmt.Sprintf("init-%d-%d", i, v), "volumes", "kubernetes.io~empty-dir", "datadog-auto-instrumentation")
			if err := os.MkdirAll(dir, 0o777); err != nil {
				b.Fatal(err)
			}
			emptyDirs = append(emptyDirs, dir)
			copies = append(copies, filepath.Dir(filepath.Dir(filepath.Dir(dir))))
		}
		duBefore, fsBefore = p.diskUsage(b), statfsUsed(b, p.State)
		for _, dir := range emptyDirs {
			if err := copyTree(first, dir); err != nil {
				b.Fatal(err)
			}
		}
		duAfter, fsAfter = p.diskUsage(b), statfsUsed(b, p.State)
		copyDu = append(copyDu, float64(duAfter-duBefore)/extraVolumes)
		copyStatfs = append(copyStatfs, float64(fsAfter-fsBefore)/extraVolumes)
		for _, c := range copies {
			if err := os.RemoveAll(c); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(median(volDu), "volume-du-B")
	b.ReportMetric(median(volUpper), "volume-upper-B")
	b.ReportMetric(median(volStatfs), "volume-statfs-B")
	b.ReportMetric(median(copyDu), "initcopy-du-B")
	b.ReportMetric(median(copyStatfs), "initcopy-statfs-B")
	b.ReportMetric(float64(libraryBytes), "library-B")
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// diskUsage is du -x over the state dir and the kubelet dir: allocated bytes of every inode,
// hardlinks counted once, not descending into mounts (a volume's overlay shows the library
// files, which live in the store and are counted there).
func (p *plugin) diskUsage(b testing.TB) int64 {
	b.Helper()
	unix.Sync()
	seen := map[[2]uint64]bool{}
	var total int64
	for _, root := range []string{p.State, p.Kubelet} {
		total += du(b, root, seen)
	}
	return total
}

func du(b testing.TB, root string, seen map[[2]uint64]bool) int64 {
	b.Helper()
	var rootSt unix.Stat_t
	if err := unix.Lstat(root, &rootSt); err != nil {
		b.Fatal(err)
	}
	return walkSum(b, root, func(p string, d fs.DirEntry) (int64, error) {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return 0, err
		}
		if st.Dev != rootSt.Dev {
			// A mount point (a published volume): count the directory under it, not its content.
			if d.IsDir() {
				return 0, filepath.SkipDir
			}
			return 0, nil
		}
		key := [2]uint64{st.Dev, st.Ino}
		if seen[key] {
			return 0, nil
		}
		seen[key] = true
		return st.Blocks * 512, nil
	})
}

// fileBlocks is the allocated bytes of the regular files below dir.
func fileBlocks(b testing.TB, dir string) int64 {
	b.Helper()
	return walkSum(b, dir, func(p string, d fs.DirEntry) (int64, error) {
		if !d.Type().IsRegular() {
			return 0, nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return 0, err
		}
		return st.Blocks * 512, nil
	})
}

// walkSum walks the tree at root and adds up size over its entries, failing b on an error.
// size may return filepath.SkipDir for a directory, to leave out what is below it.
func walkSum(b testing.TB, root string, size func(p string, d fs.DirEntry) (int64, error)) int64 {
	b.Helper()
	var total int64
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		n, err := size(p, d)
		total += n
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	return total
}

// statfsUsed is the used bytes of the filesystem holding dir, after flushing delayed
// allocations.
func statfsUsed(b testing.TB, dir string) int64 {
	b.Helper()
	unix.Sync()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		b.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// apparentSize is the total size of the regular files below dir, as a pod reads them.
func apparentSize(b testing.TB, dir string) int64 {
	b.Helper()
	return walkSum(b, dir, func(_ string, d fs.DirEntry) (int64, error) {
		if !d.Type().IsRegular() {
			return 0, nil
		}
		fi, err := d.Info()
		if err != nil {
			return 0, err
		}
		return fi.Size(), nil
	})
}

// copyTree copies src to dst as `cp -a` would for files, directories and symlinks: what the
// init containers do into the pod's emptyDir.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		out := filepath.Join(dst, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			if err := os.MkdirAll(out, fi.Mode().Perm()); err != nil {
				return err
			}
			return os.Chmod(out, fi.Mode().Perm())
		case d.Type()&fs.ModeSymlink != 0:
			link, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(link, out)
		case d.Type().IsRegular():
			in, err := os.Open(p)
			if err != nil {
				return err
			}
			defer in.Close()
			f, err := os.OpenFile(out, os.O_CREATE|os.O_EXCL|os.O_WRONLY, fi.Mode().Perm())
			if err != nil {
				return err
			}
			_, err = io.Copy(f, in)
			return errors.Join(err, f.Close())
		}
		return fmt.Errorf("%s: unexpected file type %v", p, fi.Mode().Type())
	})
}
