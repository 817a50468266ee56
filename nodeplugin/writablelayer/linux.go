//go:build linux

package writablelayer

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Project ids this package hands out: a range of its own, far from the low ids that people and
// kubelet's emptyDir quotas (from 1048577 up) use. An id is free when no inode and no block
// is charged to it.
const (
	firstProjectID uint32 = 0x7a000000
	projectIDSpan  uint32 = 1 << 24
	maxProbes             = 4096
)

// Kernel ABI not (yet) in golang.org/x/sys/unix: quotactl(2) commands and structures
// (linux/quota.h, linux/dqblk_xfs.h) and the FS_IOC_FS[GS]ETXATTR ioctls (linux/fs.h).
const (
	prjQuota = 2

	qGetQuota  = 0x800007
	qSetQuota  = 0x800008
	qXGetQStat = 'X'<<8 + 5

	qifBLimits = 1
	qifILimits = 4
	// qifDQBlkSize is the unit of if_dqblk's block limits.
	qifDQBlkSize = 1024

	fsQuotaPDQAcct = 0x10
	fsQuotaPDQEnfd = 0x20

	fsXflagProjInherit = 0x200

	iocWrite = 1
	iocRead  = 2
)

var (
	fsIocFSGetXattr = ioc(iocRead, 'X', 31, unsafe.Sizeof(fsxattr{}))
	fsIocFSSetXattr = ioc(iocWrite, 'X', 32, unsafe.Sizeof(fsxattr{}))
)

func ioc(dir, typ, nr, size uintptr) uintptr { return dir<<30 | size<<16 | typ<<8 | nr }

func qcmd(cmd, typ uint32) uint32 { return cmd<<8 | typ&0xff }

// ifDqblk is struct if_dqblk.
type ifDqblk struct {
	bHardLimit, bSoftLimit, curSpace  uint64
	iHardLimit, iSoftLimit, curInodes uint64
	bTime, iTime                      uint64
	valid                             uint32
	_                                 uint32
}

// fsxattr is struct fsxattr.
type fsxattr struct {
	xflags, extsize, nextents, projid, cowextsize uint32
	_                                             [8]byte
}

// fsQuotaStat is the start of struct fs_quota_stat: only the flags are read.
type fsQuotaStat struct {
	version int8
	_       int8
	flags   uint16
	_       [124]byte
}

func quotactlFd(f *os.File, cmd uint32, id uint32, addr unsafe.Pointer) error {
	_, _, errno := unix.Syscall6(unix.SYS_QUOTACTL_FD, f.Fd(), uintptr(cmd), uintptr(id), uintptr(addr), 0, 0)
	runtime.KeepAlive(f)
	if errno != 0 {
		return errno
	}
	return nil
}

func getFsxattr(f *os.File) (fsxattr, error) {
	var a fsxattr
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFSGetXattr, uintptr(unsafe.Pointer(&a)))
	runtime.KeepAlive(f)
	if errno != 0 {
		return a, errno
	}
	return a, nil
}

func setFsxattr(f *os.File, a fsxattr) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFSSetXattr, uintptr(unsafe.Pointer(&a)))
	runtime.KeepAlive(f)
	if errno != 0 {
		return errno
	}
	return nil
}

// Manager is the real Interface.
type Manager struct {
	dir       string
	mechanism Mechanism
	reason    string
	// mu makes choosing a free project id and charging the volume dir to it one step.
	mu sync.Mutex
	// removal removes released layer dirs in the background.
	removal *remover
	log     *slog.Logger
}

// Option configures a Manager.
type Option func(*Manager)

// WithLogger makes the Manager log what goes wrong in the background (removing released
// layers) to log.
func WithLogger(log *slog.Logger) Option { return func(m *Manager) { m.log = log } }

// New chooses the mechanism for the volume dirs that will live in dir: want, or with Auto
// project quotas where dir's filesystem enforces them and tmpfs elsewhere. Asking for
// ProjectQuota on a filesystem that does not enforce them is an error saying why.
//
// Released layer dirs are removed in the background (see removal.go); Close stops that, and
// layers released by an earlier process that were not removed yet are removed from New on.
func New(dir string, want Mechanism, opts ...Option) (*Manager, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	m := &Manager{dir: dir, log: slog.New(slog.DiscardHandler)}
	for _, o := range opts {
		o(m)
	}
	m.removal = newRemover(dir, m.log, m.removeLayer)
	switch want {
	case Auto, "":
		if err := probeProjectQuota(dir); err != nil {
			m.mechanism, m.reason = Tmpfs, err.Error()+": falling back to tmpfs-backed writable layers"
		} else {
			m.mechanism, m.reason = ProjectQuota, fmt.Sprintf("the filesystem of %s (%s) enforces project quotas", dir, fsTypeName(dir))
		}
	case ProjectQuota:
		if err := probeProjectQuota(dir); err != nil {
			return nil, err
		}
		m.mechanism, m.reason = ProjectQuota, fmt.Sprintf("configured; the filesystem of %s (%s) enforces project quotas", dir, fsTypeName(dir))
	case Tmpfs:
		m.mechanism, m.reason = Tmpfs, "configured"
	default:
		return nil, fmt.Errorf("unknown writable layer mechanism %q; use one of %v", want, Mechanisms)
	}
	if m.removal.leftovers() {
		if err := m.removal.start(); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Flush waits until every layer released so far is removed from the disk, or ctx ends.
func (m *Manager) Flush(ctx context.Context) error { return m.removal.flush(ctx.Done()) }

// Close stops removing released layers in the background, after the one being removed; the
// next Manager over the same dir removes the rest.
func (m *Manager) Close() error {
	m.removal.close()
	return nil
}

// Mechanism implements Interface.
func (m *Manager) Mechanism() Mechanism { return m.mechanism }

// Reason says why Mechanism was chosen, for the start-up log.
func (m *Manager) Reason() string { return m.reason }

// probeProjectQuota returns nil when dir's filesystem enforces project quota limits and lets
// this process set a directory's project id, or an error saying what is missing.
func probeProjectQuota(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	where := fmt.Sprintf("state dir filesystem %s at %s", fsTypeName(dir), dir)
	var st fsQuotaStat
	switch err := quotactlFd(f, qcmd(qXGetQStat, prjQuota), 0, unsafe.Pointer(&st)); {
	case errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.ESRCH):
		return fmt.Errorf("%s has no quotas enabled (ext4 needs the quota and project features and the prjquota mount option, xfs the pquota mount option; quotactl_fd needs Linux 5.14+)", where)
	case err != nil:
		return fmt.Errorf("%s does not support project quotas: quotactl: %w", where, err)
	case st.flags&fsQuotaPDQAcct == 0:
		return fmt.Errorf("%s lacks project quotas (ext4 needs the project and quota features and the prjquota mount option, xfs the pquota mount option)", where)
	case st.flags&fsQuotaPDQEnfd == 0:
		return fmt.Errorf("%s accounts project quotas but does not enforce their limits: mount it with prjquota (xfs: pquota)", where)
	}
	if _, err := getFsxattr(f); err != nil {
		return fmt.Errorf("%s cannot report directory project ids: %w", where, err)
	}
	return nil
}

func fsTypeName(dir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "unknown"
	}
	switch uint32(st.Type) {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlayfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	}
	return fmt.Sprintf("0x%x", uint32(st.Type))
}

// Prepare implements Interface.
func (m *Manager) Prepare(dir string, limit int64) (err error) {
	if limit <= 0 {
		return fmt.Errorf("writable layer limit must be positive, not %d", limit)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	defer func() {
		if err != nil {
			if rerr := m.Release(dir); rerr != nil {
				err = errors.Join(err, fmt.Errorf("cleaning up: %w", rerr))
			}
		}
	}()
	switch m.mechanism {
	case ProjectQuota:
		if err := m.chargeToNewProject(dir, limit); err != nil {
			return err
		}
	case Tmpfs:
		opts := fmt.Sprintf("size=%d,nr_inodes=%d,mode=0700", limit, inodeLimit(limit))
		if err := unix.Mount("apm-csi-writable", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
			return fmt.Errorf("mounting a %s tmpfs for the writable layer at %s: %w", FormatBytes(limit), dir, err)
		}
	default:
		return fmt.Errorf("writable layer mechanism %q is not set up", m.mechanism)
	}
	upper, work := Paths(dir)
	// The upper dir's root becomes the volume's root directory: world-writable like an
	// emptyDir, so a tracer running as any user can write its logs next to the library.
	if err := os.Mkdir(upper, 0o755); err != nil {
		return err
	}
	if err := os.Chmod(upper, 0o777); err != nil {
		return err
	}
	if err := os.Mkdir(work, 0o700); err != nil {
		return err
	}
	if m.mechanism == ProjectQuota {
		// Everything below inherits the project: check that the kernel did so.
		want, err := projectOf(dir)
		if err != nil {
			return err
		}
		for _, sub := range []string{upper, work} {
			if got, err := projectOf(sub); err != nil || got != want {
				return fmt.Errorf("%s did not inherit project id %d from %s (got %d, %v)", sub, want, dir, got, err)
			}
		}
	}
	return nil
}

// chargeToNewProject picks a free project id, sets its limits, then makes dir (and what will
// be created below it) belong to it. The limit is in place before the dir is charged, so
// there is no moment without one.
func (m *Manager) chargeToNewProject(dir string, limit int64) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	m.mu.Lock()
	defer m.mu.Unlock()
	h := fnv.New32a()
	h.Write([]byte(filepath.Base(dir)))
	start := h.Sum32() % projectIDSpan
	for i := range uint32(maxProbes) {
		id := firstProjectID + (start+i)%projectIDSpan
		var q ifDqblk
		err := quotactlFd(f, qcmd(qGetQuota, prjQuota), id, unsafe.Pointer(&q))
		switch {
		case errors.Is(err, unix.ENOENT): // xfs: no such dquot, so unused
		case err != nil:
			return fmt.Errorf("reading the quota of project %d: %w", id, err)
		case q.curInodes != 0 || q.curSpace != 0:
			continue // in use
		}
		// Unused: a limit left on it by a crash between removing a volume dir and clearing
		// its quota is simply replaced.
		if err := setProjectLimits(f, id, limit); err != nil {
			return err
		}
		a, err := getFsxattr(f)
		if err != nil {
			return fmt.Errorf("reading the project id of %s: %w", dir, err)
		}
		a.projid = id
		a.xflags |= fsXflagProjInherit
		if err := setFsxattr(f, a); err != nil {
			return fmt.Errorf("setting project id %d on %s: %w", id, dir, err)
		}
		return nil
	}
	return fmt.Errorf("no free project id among %d tried in %d-%d", maxProbes, firstProjectID, firstProjectID+projectIDSpan-1)
}

// setProjectLimits sets the block and inode hard limits of a project; limit 0 clears them.
func setProjectLimits(f *os.File, id uint32, limit int64) error {
	q := ifDqblk{valid: qifBLimits | qifILimits}
	if limit > 0 {
		q.bHardLimit = uint64((limit + qifDQBlkSize - 1) / qifDQBlkSize)
		q.iHardLimit = inodeLimit(limit)
	}
	if err := quotactlFd(f, qcmd(qSetQuota, prjQuota), id, unsafe.Pointer(&q)); err != nil {
		return fmt.Errorf("setting the quota of project %d to %s: %w", id, FormatBytes(limit), err)
	}
	return nil
}

// projectOf returns the project id of path.
func projectOf(path string) (uint32, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	a, err := getFsxattr(f)
	if err != nil {
		return 0, fmt.Errorf("reading the project id of %s: %w", path, err)
	}
	return a.projid, nil
}

// ProjectLimits returns the project id that path belongs to, with that project's block hard
// limit and usage (bytes), for tests and diagnostics.
func ProjectLimits(path string) (id uint32, limit, used int64, err error) {
	if id, err = projectOf(path); err != nil {
		return 0, 0, 0, err
	}
	limit, used, err = ProjectQuotaOf(path, id)
	return id, limit, used, err
}

// ProjectQuotaOf returns the block hard limit (bytes) and the usage (bytes) of project id on
// the filesystem of path, for tests and diagnostics.
func ProjectQuotaOf(path string, id uint32) (limit, used int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	var q ifDqblk
	if err := quotactlFd(f, qcmd(qGetQuota, prjQuota), id, unsafe.Pointer(&q)); err != nil {
		return 0, 0, err
	}
	return int64(q.bHardLimit) * qifDQBlkSize, int64(q.curSpace), nil
}

// Mount implements Interface: mount runs on a thread whose effective capabilities lack
// CAP_SYS_RESOURCE, so the overlay created there (which acts on its upper dir with its
// creator's credentials) cannot write past an ext4 quota, nor into ext4's blocks reserved for
// root.
func (m *Manager) Mount(mount func() error) error {
	runtime.LockOSThread()
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var caps [2]unix.CapUserData
	if err := unix.Capget(&hdr, &caps[0]); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("reading capabilities: %w", err)
	}
	const bit = 1 << unix.CAP_SYS_RESOURCE
	if caps[0].Effective&bit == 0 {
		defer runtime.UnlockOSThread()
		return mount()
	}
	saved := caps
	caps[0].Effective &^= bit
	if err := unix.Capset(&hdr, &caps[0]); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("dropping CAP_SYS_RESOURCE for the overlay mount: %w", err)
	}
	defer func() {
		// A thread whose capabilities cannot be restored stays locked: the runtime ends it
		// with this goroutine instead of reusing it.
		if unix.Capset(&hdr, &saved[0]) == nil {
			runtime.UnlockOSThread()
		}
	}()
	return mount()
}

// Resume implements Interface.
func (m *Manager) Resume(dir string, limit int64) error {
	if m.mechanism != ProjectQuota {
		return fmt.Errorf("a %s writable layer cannot be resumed", m.mechanism)
	}
	if limit <= 0 {
		return fmt.Errorf("writable layer limit must be positive, not %d", limit)
	}
	if filepath.Dir(dir) != filepath.Clean(m.dir) {
		return fmt.Errorf("refusing to resume %s: not a writable layer dir under %s", dir, m.dir)
	}
	// Through a handle on the manager's dir: nothing a pod left in the layer is followed.
	root, err := os.OpenRoot(m.dir)
	if err != nil {
		return err
	}
	defer root.Close()
	name := filepath.Base(dir)
	for _, sub := range []string{name, name + "/" + upperName} {
		fi, err := root.Lstat(sub)
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			return fmt.Errorf("%s/%s is not a directory", m.dir, sub)
		}
	}
	work := name + "/" + workName
	if err := root.RemoveAll(work); err != nil {
		return fmt.Errorf("removing the used work dir of %s: %w", dir, err)
	}
	if err := root.Mkdir(work, 0o700); err != nil {
		return err
	}
	id, err := projectOf(dir)
	if err != nil {
		return err
	}
	if id < firstProjectID || id-firstProjectID >= projectIDSpan {
		return fmt.Errorf("%s is not charged to a project of this plugin (project %d)", dir, id)
	}
	upper, workDir := Paths(dir)
	for _, sub := range []string{upper, workDir} {
		if got, err := projectOf(sub); err != nil || got != id {
			return fmt.Errorf("%s is not charged to project %d of %s (got %d, %v)", sub, id, dir, got, err)
		}
	}
	f, err := os.Open(m.dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return setProjectLimits(f, id, limit)
}

// Used implements Interface: what the layer's project is charged, or what a tmpfs layer's
// filesystem holds.
func (m *Manager) Used(dir string) (int64, error) {
	if id, err := projectOf(dir); err == nil && id >= firstProjectID && id-firstProjectID < projectIDSpan {
		_, used, err := ProjectQuotaOf(dir, id)
		return used, err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize, nil
}

// Release implements Interface: the tmpfs is unmounted now, and the dir set aside for removal
// in the background (removal.go), or removed now where it cannot be set aside.
func (m *Manager) Release(dir string) error {
	if filepath.Dir(dir) != filepath.Clean(m.dir) {
		return fmt.Errorf("refusing to remove %s: not a writable layer dir under %s", dir, m.dir)
	}
	// A tmpfs (or a stack of them, after a crash and a retried publish) on the dir.
	for range 16 {
		err := unix.Unmount(dir, unix.UMOUNT_NOFOLLOW)
		if errors.Is(err, unix.EBUSY) {
			err = unix.Unmount(dir, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			break // not a mount point (any more), or no dir at all
		}
		if err != nil {
			return fmt.Errorf("unmounting the writable layer at %s: %w", dir, err)
		}
	}
	setAsideErr := m.removal.setAsideDir(dir)
	if setAsideErr == nil {
		return nil
	}
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil // released already
	}
	m.log.Warn("removing a released writable layer in the call: it cannot be set aside for background removal", "dir", dir, "err", setAsideErr)
	return m.removeLayer(m.dir, filepath.Base(dir))
}

// removeLayer removes the layer dir name, a direct child of parent (the manager's dir, or a
// removal batch), and clears its project's limits. The removal goes through a handle on
// parent: it follows no link and cannot leave parent, whatever a pod left in its upper dir.
// The project id is read from the dir itself, so an orphan dir (no record) is released as
// well as a recorded one.
func (m *Manager) removeLayer(parent, name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return fmt.Errorf("refusing to remove %q in %s: not a plain name", name, parent)
	}
	id, idErr := projectOf(filepath.Join(parent, name))
	root, err := os.OpenRoot(parent)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	err = root.RemoveAll(name)
	root.Close()
	if err != nil {
		return err
	}
	if idErr != nil || id < firstProjectID || id-firstProjectID >= projectIDSpan {
		return nil
	}
	f, err := os.Open(m.dir)
	if err != nil {
		return err
	}
	defer f.Close()
	err = setProjectLimits(f, id, 0)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.ESRCH) {
		return nil // quotas are off now: nothing to clear
	}
	return err
}
