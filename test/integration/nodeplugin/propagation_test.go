package nodeplugin

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// The environment of TestHelperBindInNamespace, set by TestBindFlagsReachTheHostCopy.
const (
	envBindSource   = "APM_CSI_TEST_BIND_SOURCE"
	envBindTarget   = "APM_CSI_TEST_BIND_TARGET"
	envBindReadOnly = "APM_CSI_TEST_BIND_READONLY"
	envBindLegacy   = "APM_CSI_TEST_BIND_LEGACY"
	envBindParentNS = "APM_CSI_TEST_BIND_PARENT_NS"
)

// TestBindFlagsReachTheHostCopy reproduces the node plugin's situation: the plugin mounts in
// its own mount namespace below kubelet's pods dir, a shared mount, and kubelet gives pods the
// host's copy of each mount, which propagation made. Here a shared directory stands for the
// pods dir, a child process in a mount namespace of its own (whose copy of that directory is
// a peer) for the plugin, and this process for the host: the flags of its copy are the ones
// pods get. They must be those asked for: read-only when asked, and always nosuid,nodev. A
// remount after attaching (the original implementation) changes only the plugin's copy.
func TestBindFlagsReachTheHostCopy(t *testing.T) {
	testenv.RequireRoot(t)
	unshare := testenv.RequireBinary(t, "unshare")
	parentNS, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	for _, legacy := range []bool{false, true} {
		t.Run(fmt.Sprintf("legacy=%t", legacy), func(t *testing.T) {
			root := t.TempDir()
			// Registered first, so it runs last: nothing of the test may stay mounted.
			t.Cleanup(func() { nodeplugintest.UnmountUnder(t, root) })
			host := filepath.Join(root, "host")
			pods := filepath.Join(root, "pods")
			// The child's temporary dir, where the legacy path stages its mounts, is on the
			// shared mount on purpose: the staging mounts must not leak to the host either.
			tmp := filepath.Join(pods, "tmp")
			for _, d := range []string{filepath.Join(host, "dir"), filepath.Join(host, "restricted"), pods} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			writeFile(t, filepath.Join(host, "dir", "f"), "host data")
			writeFile(t, filepath.Join(host, "restricted", "f"), "restricted data")
			preload := filepath.Join(host, "ld.so.preload")
			writeFile(t, preload, "/datadog-lib/injector.so\n")
			sock := filepath.Join(host, "apm.socket")
			l, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			answered := serveReply(l, "pong")
			// A source on a read-only, noexec mount: a writable bind of it keeps both
			// restrictions (Bind adds restrictions, never lifts one).
			restricted := filepath.Join(host, "restricted")
			mustMount(t, restricted, restricted, unix.MS_BIND)
			mustMount(t, "", restricted, unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOEXEC)
			// The pods dir: a mount point in a peer group of its own (not that of "/", should
			// "/" be shared), so that only the child's namespace shares it.
			mustMount(t, pods, pods, unix.MS_BIND)
			mustMount(t, "", pods, unix.MS_PRIVATE)
			mustMount(t, "", pods, unix.MS_SHARED)
			if err := os.Mkdir(tmp, 0o755); err != nil {
				t.Fatal(err)
			}

			tests := []struct {
				name, source string
				readOnly     bool
				file         bool
				wantOpts     []string
			}{
				{name: "read-only dir", source: filepath.Join(host, "dir"), readOnly: true, wantOpts: []string{"ro", "nosuid", "nodev"}},
				{name: "writable dir", source: filepath.Join(host, "dir"), wantOpts: []string{"rw", "nosuid", "nodev"}},
				{name: "read-only file", source: preload, readOnly: true, file: true, wantOpts: []string{"ro", "nosuid", "nodev"}},
				{name: "read-only socket", source: sock, readOnly: true, file: true, wantOpts: []string{"ro", "nosuid", "nodev"}},
				{name: "writable dir on a ro noexec mount", source: restricted, wantOpts: []string{"ro", "nosuid", "nodev", "noexec"}},
			}
			m := mounter.New()
			for i, tt := range tests {
				target := filepath.Join(pods, fmt.Sprintf("target-%d", i))
				if tt.file {
					writeFile(t, target, "")
				} else if err := os.Mkdir(target, 0o750); err != nil {
					t.Fatal(err)
				}
				t.Run(tt.name, func(t *testing.T) {
					defer func() {
						if ok, _ := m.IsMountPoint(target); ok {
							_ = m.Unmount(target)
						}
					}()
					bindInNamespace(t, unshare, parentNS, tt.source, target, tt.readOnly, legacy, tmp)

					// This namespace's copy, the one kubelet would give a pod.
					e := nodeplugintest.EntryAt(t, target)
					for _, opt := range tt.wantOpts {
						if !e.HasMountOption(opt) {
							t.Errorf("the host's copy of the mount has options %v, want %v", e.MountOptions, tt.wantOpts)
							break
						}
					}
					switch {
					case tt.source == sock:
						assertPong(t, target, answered)
					case tt.file:
						if got := readFile(t, target); got != readFile(t, tt.source) {
							t.Errorf("the mounted file reads %q", got)
						}
						f, err := os.OpenFile(target, os.O_WRONLY|os.O_APPEND, 0)
						if err == nil {
							f.Close()
						}
						if !errors.Is(err, unix.EROFS) {
							t.Errorf("open the read-only file for writing through the host's copy: %v, want EROFS", err)
						}
					case tt.readOnly || tt.source == restricted:
						if _, err := os.Stat(filepath.Join(target, "f")); err != nil {
							t.Errorf("the mounted dir does not show the source: %v", err)
						}
						err := os.WriteFile(filepath.Join(target, "new"), nil, 0o644)
						if !errors.Is(err, unix.EROFS) {
							t.Errorf("write through the host's copy of a read-only mount: %v, want EROFS", err)
						}
					default:
						writeFile(t, filepath.Join(target, "from-pod"), "x")
						if readFile(t, filepath.Join(tt.source, "from-pod")) != "x" {
							t.Error("a write through the host's copy of a writable mount did not reach the source")
						}
					}

					// No staging mount or dir is left, in the child (checked there) or here.
					if left := mountsBelow(t, tmp); len(left) > 0 {
						t.Errorf("staging mounts reached the host: %v", left)
					}
					if ents, err := os.ReadDir(tmp); err != nil || len(ents) > 0 {
						t.Errorf("staging dir left in %s: %v (%v)", tmp, ents, err)
					}

					// Unmount from the host's side, as after a plugin restart; twice is
					// ErrNotMounted, as for any mount.
					if err := m.Unmount(target); err != nil {
						t.Fatal(err)
					}
					if ok, err := m.IsMountPoint(target); err != nil || ok {
						t.Fatalf("IsMountPoint(%s) after unmount = %t, %v", target, ok, err)
					}
					if err := m.Unmount(target); !errors.Is(err, mounter.ErrNotMounted) {
						t.Fatalf("second unmount: %v, want ErrNotMounted", err)
					}
				})
			}

			if err := unix.Unmount(pods, unix.UMOUNT_NOFOLLOW); err != nil {
				t.Errorf("unmount %s: %v", pods, err)
			}
			if err := unix.Unmount(restricted, unix.UMOUNT_NOFOLLOW); err != nil {
				t.Errorf("unmount %s: %v", restricted, err)
			}
			if left := mountsBelow(t, root); len(left) > 0 {
				t.Errorf("mounts left under %s: %v", root, left)
			}
		})
	}
}

// bindInNamespace runs mounter.Bind in a new mount namespace that shares the mounts (and their
// propagation) of this one. util-linux unshare, not SysProcAttr.Unshareflags: Go's runtime makes
// every mount of a new namespace private, which would cut it off from the shared pods dir.
func bindInNamespace(t *testing.T, unshare, parentNS, source, target string, readOnly, legacy bool, tmp string) {
	t.Helper()
	cmd := exec.Command(unshare, "--mount", "--propagation", "unchanged",
		os.Args[0], "-test.run", "^TestHelperBindInNamespace$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(),
		envBindSource+"="+source,
		envBindTarget+"="+target,
		envBindReadOnly+"="+strconv.FormatBool(readOnly),
		envBindLegacy+"="+strconv.FormatBool(legacy),
		envBindParentNS+"="+parentNS,
		"TMPDIR="+tmp,
	)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestHelperBindInNamespace") {
		t.Fatalf("Bind in a separate mount namespace: %v\n%s", err, out)
	}
}

// TestHelperBindInNamespace is the child of TestBindFlagsReachTheHostCopy, which runs it in a
// mount namespace of its own; alone it does nothing.
func TestHelperBindInNamespace(t *testing.T) {
	source, target := os.Getenv(envBindSource), os.Getenv(envBindTarget)
	if source == "" || target == "" {
		t.Skip("run by TestBindFlagsReachTheHostCopy only")
	}
	ns, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	if ns == os.Getenv(envBindParentNS) {
		t.Fatalf("running in the parent's mount namespace %s", ns)
	}
	readOnly, _ := strconv.ParseBool(os.Getenv(envBindReadOnly))
	m := mounter.New()
	m.LegacyBind, _ = strconv.ParseBool(os.Getenv(envBindLegacy))
	if err := m.Bind(source, target, readOnly); err != nil {
		t.Fatal(err)
	}
	// The plugin's own copy has the flags too.
	e := nodeplugintest.EntryAt(t, target)
	if (readOnly && !e.HasMountOption("ro")) || !e.HasMountOption("nosuid") || !e.HasMountOption("nodev") {
		t.Errorf("the plugin's copy of the mount has options %v, want nosuid,nodev (and ro: %t)", e.MountOptions, readOnly)
	}
	if left := mountsBelow(t, os.TempDir()); len(left) > 0 {
		t.Errorf("staging mounts left: %v", left)
	}
	if ents, err := os.ReadDir(os.TempDir()); err != nil || len(ents) > 0 {
		t.Errorf("staging dir left in %s: %v (%v)", os.TempDir(), ents, err)
	}
}

// mountsBelow lists the mount points strictly below dir in this namespace.
func mountsBelow(t testing.TB, dir string) []string {
	t.Helper()
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range table {
		if strings.HasPrefix(e.MountPoint, dir+"/") {
			out = append(out, e.MountPoint)
		}
	}
	return out
}

// mustMount calls mount(2) and registers the unmount (lazy, as a test may fail half-way).
func mustMount(t *testing.T, source, target string, flags uintptr) {
	t.Helper()
	if err := unix.Mount(source, target, "", flags, ""); err != nil {
		t.Fatalf("mount %q on %s (flags %#x): %v", source, target, flags, err)
	}
	if flags&(unix.MS_BIND|unix.MS_REMOUNT) == unix.MS_BIND {
		t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
	}
}

// serveReply answers every connection to l with reply and closes it, as an agent's socket
// would, until l is closed. The outcome of each answer goes to the returned channel; one that
// finds it full is dropped (each test makes one connection and reads its outcome).
func serveReply(l net.Listener, reply string) <-chan error {
	answered := make(chan error, 1)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_, err = c.Write([]byte(reply))
			if cerr := c.Close(); err == nil {
				err = cerr
			}
			select {
			case answered <- err:
			default:
			}
		}
	}()
	return answered
}

// readReply connects to the socket at path, which serveReply answers, and returns what it
// read once the server closed the connection; answered is serveReply's channel.
func readReply(path string, answered <-chan error) (string, error) {
	c, err := net.Dial("unix", path)
	if err != nil {
		return "", fmt.Errorf("connect: %w", err)
	}
	defer c.Close()
	got, err := io.ReadAll(c)
	if err != nil {
		return string(got), fmt.Errorf("read: %w", err)
	}
	if err := <-answered; err != nil {
		return string(got), fmt.Errorf("the socket's server could not answer: %w", err)
	}
	return string(got), nil
}

// assertPong connects to the socket at path, which serveReply(l, "pong") answers.
func assertPong(t *testing.T, path string, answered <-chan error) {
	t.Helper()
	got, err := readReply(path, answered)
	if err != nil {
		t.Errorf("through the mounted socket: %v", err)
		return
	}
	if got != "pong" {
		t.Errorf("read %q through the mounted socket", got)
	}
}
