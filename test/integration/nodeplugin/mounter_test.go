package nodeplugin

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
	"github.com/apm-csi/apm-csi/test/testenv"
)

func mounterDirs(t *testing.T, names ...string) (string, map[string]string) {
	t.Helper()
	testenv.RequireRoot(t)
	root := t.TempDir()
	t.Cleanup(func() { nodeplugintest.UnmountUnder(t, root) })
	dirs := map[string]string{}
	for _, n := range names {
		dirs[n] = filepath.Join(root, n)
		if err := os.MkdirAll(dirs[n], 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return root, dirs
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func TestBindMount(t *testing.T) {
	_, d := mounterDirs(t, "src", "rw", "ro")
	m := mounter.New()
	writeFile(t, filepath.Join(d["src"], "f"), "host data")

	// Writable: a write through the mount lands in the source.
	if err := m.Bind(d["src"], d["rw"], false); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(d["rw"], "from-pod"), "x")
	if readFile(t, filepath.Join(d["src"], "from-pod")) != "x" {
		t.Fatal("write through a writable bind mount did not reach the source")
	}
	e := nodeplugintest.EntryAt(t, d["rw"])
	if !e.HasMountOption("rw") || !e.HasMountOption("nosuid") || !e.HasMountOption("nodev") {
		t.Fatalf("writable bind options %v, want rw,nosuid,nodev", e.MountOptions)
	}

	// Read-only: really read-only, not just requested.
	if err := m.Bind(d["src"], d["ro"], true); err != nil {
		t.Fatal(err)
	}
	if readFile(t, filepath.Join(d["ro"], "f")) != "host data" {
		t.Fatal("read-only bind does not show the source")
	}
	err := os.WriteFile(filepath.Join(d["ro"], "g"), nil, 0o644)
	if !errors.Is(err, unix.EROFS) {
		t.Fatalf("write to a read-only bind mount: %v, want EROFS", err)
	}
	if e := nodeplugintest.EntryAt(t, d["ro"]); !e.HasMountOption("ro") {
		t.Fatalf("read-only bind options %v", e.MountOptions)
	}

	// Same-filesystem bind mounts are detected (IsLikelyNotMountPoint would miss them).
	for _, p := range []string{d["rw"], d["ro"]} {
		if ok, err := m.IsMountPoint(p); err != nil || !ok {
			t.Fatalf("IsMountPoint(%s) = %t, %v", p, ok, err)
		}
		if err := m.Unmount(p); err != nil {
			t.Fatal(err)
		}
		if ok, err := m.IsMountPoint(p); err != nil || ok {
			t.Fatalf("IsMountPoint(%s) after unmount = %t, %v", p, ok, err)
		}
		if err := m.Unmount(p); !errors.Is(err, mounter.ErrNotMounted) {
			t.Fatalf("second unmount: %v, want ErrNotMounted", err)
		}
	}
	if _, err := m.IsMountPoint(filepath.Join(d["src"], "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("IsMountPoint of a missing path: %v", err)
	}
	// The source's data is untouched by the unmounts.
	if readFile(t, filepath.Join(d["src"], "f")) != "host data" {
		t.Fatal("source changed")
	}
}

func TestBindMountSocketReadOnly(t *testing.T) {
	root, d := mounterDirs(t, "agent")
	sock := filepath.Join(d["agent"], "apm.socket")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	answered := serveReply(l, "pong")
	target := filepath.Join(root, "target.socket")
	writeFile(t, target, "")
	m := mounter.New()
	if err := m.Bind(sock, target, true); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := m.Unmount(target); err != nil {
			t.Error(err)
		}
	}()
	// A client connects through the read-only mount: sockets are usable on a read-only mount.
	got, err := readReply(target, answered)
	if err != nil {
		t.Fatalf("through the mounted socket: %v", err)
	}
	if got != "pong" {
		t.Fatalf("read %q through the socket", got)
	}
}

func TestOverlaySharedLowerIsolatedWrites(t *testing.T) {
	_, d := mounterDirs(t, "lower", "a/upper", "a/work", "a/mnt", "b/upper", "b/work", "b/mnt")
	writeFile(t, filepath.Join(d["lower"], "lib.so"), "library")
	m := mounter.New()
	for _, pod := range []string{"a", "b"} {
		if err := m.Overlay(d[pod+"/mnt"], mounter.Overlay{Lower: []string{d["lower"]}, Upper: d[pod+"/upper"], Work: d[pod+"/work"]}); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(d["a/mnt"], "log.txt"), "a's log")
	writeFile(t, filepath.Join(d["a/mnt"], "lib.so"), "patched by a")

	if _, err := os.Stat(filepath.Join(d["b/mnt"], "log.txt")); !os.IsNotExist(err) {
		t.Fatal("a write in one overlay is visible in another")
	}
	if got := readFile(t, filepath.Join(d["b/mnt"], "lib.so")); got != "library" {
		t.Fatalf("b sees %q, want the lower's content", got)
	}
	if got := readFile(t, filepath.Join(d["lower"], "lib.so")); got != "library" {
		t.Fatalf("the shared lower dir changed: %q", got)
	}
	if got := readFile(t, filepath.Join(d["a/upper"], "lib.so")); got != "patched by a" {
		t.Fatalf("copy-up not in a's upper dir: %q", got)
	}
	e := nodeplugintest.EntryAt(t, d["a/mnt"])
	if got := e.LowerDirs(); !slices.Equal(got, []string{d["lower"]}) {
		t.Fatalf("LowerDirs() = %q", got)
	}
	if v, _ := e.Option("upperdir"); v != d["a/upper"] {
		t.Fatalf("upperdir = %q", v)
	}
	if e.Source != "apm-csi" || !e.HasMountOption("nosuid") || !e.HasMountOption("nodev") {
		t.Fatalf("overlay entry %+v", e)
	}
	for _, pod := range []string{"a", "b"} {
		if ok, err := m.IsMountPoint(d[pod+"/mnt"]); !ok || err != nil {
			t.Fatalf("IsMountPoint overlay: %t %v", ok, err)
		}
		if err := m.Unmount(d[pod+"/mnt"]); err != nil {
			t.Fatal(err)
		}
	}
}

// TestOverlayVolatile: a volatile writable overlay (fsconfig and mount(2) alike) works as any
// other and shows "volatile" in the mount table.
func TestOverlayVolatile(t *testing.T) {
	for _, legacy := range []bool{false, true} {
		t.Run(fmt.Sprintf("legacy=%t", legacy), func(t *testing.T) {
			_, d := mounterDirs(t, "lower", "upper", "work", "mnt")
			writeFile(t, filepath.Join(d["lower"], "lib.so"), "library")
			m := mounter.New()
			m.LegacyOverlay = legacy
			if err := m.Overlay(d["mnt"], mounter.Overlay{Lower: []string{d["lower"]}, Upper: d["upper"], Work: d["work"], Volatile: true}); err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(d["mnt"], "log.txt"), "log")
			if got := readFile(t, filepath.Join(d["upper"], "log.txt")); got != "log" {
				t.Fatalf("upper dir holds %q", got)
			}
			// Shown as "volatile" before Linux 6.6, as "fsync=volatile" since.
			if e := nodeplugintest.EntryAt(t, d["mnt"]); !slices.Contains(e.SuperOptions, "volatile") && !slices.Contains(e.SuperOptions, "fsync=volatile") {
				t.Fatalf("overlay options %q lack volatile", e.SuperOptions)
			}
			if err := m.Unmount(d["mnt"]); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestOverlayReadOnly(t *testing.T) {
	for _, legacy := range []bool{false, true} {
		t.Run(fmt.Sprintf("legacy=%t", legacy), func(t *testing.T) {
			_, d := mounterDirs(t, "top", "bottom", "mnt")
			writeFile(t, filepath.Join(d["top"], "both"), "top")
			writeFile(t, filepath.Join(d["bottom"], "both"), "bottom")
			writeFile(t, filepath.Join(d["bottom"], "only-bottom"), "b")
			m := mounter.New()
			m.LegacyOverlay = legacy
			if err := m.Overlay(d["mnt"], mounter.Overlay{Lower: []string{d["top"], d["bottom"]}}); err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := m.Unmount(d["mnt"]); err != nil {
					t.Error(err)
				}
			}()
			if got := readFile(t, filepath.Join(d["mnt"], "both")); got != "top" {
				t.Fatalf("the first lower dir must win: got %q", got)
			}
			if got := readFile(t, filepath.Join(d["mnt"], "only-bottom")); got != "b" {
				t.Fatalf("bottom layer not visible: %q", got)
			}
			if err := os.WriteFile(filepath.Join(d["mnt"], "new"), nil, 0o644); !errors.Is(err, unix.EROFS) {
				t.Fatalf("write to a read-only overlay: %v, want EROFS", err)
			}
			e := nodeplugintest.EntryAt(t, d["mnt"])
			if !e.HasMountOption("ro") || !slices.Equal(e.LowerDirs(), []string{d["top"], d["bottom"]}) {
				t.Fatalf("entry %+v, lower %q", e, e.LowerDirs())
			}
		})
	}
}

// TestOverlayManyLowerDirs: the new mount API takes each lower dir separately, so a stack whose
// option string exceeds the one-page limit of mount(2) still mounts; the legacy path refuses it
// with an explanation instead of letting the kernel truncate the options.
func TestOverlayManyLowerDirs(t *testing.T) {
	root, d := mounterDirs(t, "upper", "work", "mnt", "mnt-legacy")
	var lower []string
	for i := range 40 {
		dir := filepath.Join(root, "layers", fmt.Sprintf("sha256-%064d", i), "fs")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, fmt.Sprintf("f%d", i)), "x")
		lower = append(lower, dir)
	}
	if n := len(strings.Join(lower, ":")); n <= os.Getpagesize() {
		t.Fatalf("test stack is only %d bytes; it must exceed a page", n)
	}
	m := mounter.New()
	o := mounter.Overlay{Lower: lower, Upper: d["upper"], Work: d["work"]}
	if err := m.Overlay(d["mnt"], o); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := m.Unmount(d["mnt"]); err != nil {
			t.Error(err)
		}
	}()
	if _, err := os.Stat(filepath.Join(d["mnt"], "f39")); err != nil {
		t.Fatalf("the bottom layer is not visible: %v", err)
	}
	if got := nodeplugintest.EntryAt(t, d["mnt"]).LowerDirs(); !slices.Equal(got, lower) {
		t.Fatalf("mount table shows %d lower dirs, want %d", len(got), len(lower))
	}

	legacy := mounter.New()
	legacy.LegacyOverlay = true
	err := legacy.Overlay(d["mnt-legacy"], o)
	if err == nil || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("legacy mount of an oversized stack: %v, want a limit error", err)
	}
	if ok, _ := m.IsMountPoint(d["mnt-legacy"]); ok {
		t.Fatal("the refused legacy mount mounted something")
	}
}

func TestOverlayErrorsAreExplained(t *testing.T) {
	root, d := mounterDirs(t, "upper", "work", "mnt")
	err := mounter.New().Overlay(d["mnt"], mounter.Overlay{Lower: []string{filepath.Join(root, "missing")}, Upper: d["upper"], Work: d["work"]})
	if err == nil || !strings.Contains(err.Error(), filepath.Join(root, "missing")) {
		t.Fatalf("error %v does not name the missing lower dir", err)
	}
}

// TestOwnMountIsIdempotentAndLeavesNoChildren: the library store's own mount is one bind
// mount of the dir onto itself, with none of the mounts of its parent below it; a second call
// (a restart after a crash) reuses it instead of stacking another, and only the call that
// made it unmounts it.
func TestOwnMountIsIdempotentAndLeavesNoChildren(t *testing.T) {
	root, dirs := mounterDirs(t, "state/overlays/a")
	store := filepath.Join(root, "state", "store")
	// A mount next to the store in the same parent, as a writable layer's tmpfs is.
	if err := unix.Mount("tmpfs", dirs["state/overlays/a"], "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := unix.Unmount(dirs["state/overlays/a"], 0); err != nil {
			t.Error(err)
		}
	}()

	release, err := mounter.OwnMount(store)
	if err != nil {
		t.Fatal(err)
	}
	if n := nodeplugintest.CountMounts(t, store); n != 1 {
		t.Fatalf("%d mounts on the store after OwnMount, want 1", n)
	}
	if e := nodeplugintest.EntryAt(t, store); e.FsType == "tmpfs" {
		t.Fatalf("the store's mount is %+v, want a bind mount of the store dir", e)
	}
	if m := nodeplugintest.MountsUnder(t, store); len(m) != 0 {
		t.Fatalf("mounts below the store: %q, want none", m)
	}

	again, err := mounter.OwnMount(store)
	if err != nil {
		t.Fatal(err)
	}
	if n := nodeplugintest.CountMounts(t, store); n != 1 {
		t.Fatalf("%d mounts on the store after a second OwnMount, want 1 (no stacking)", n)
	}
	if err := again(); err != nil {
		t.Fatal(err)
	}
	if n := nodeplugintest.CountMounts(t, store); n != 1 {
		t.Fatalf("the release of a call that reused the mount unmounted it: %d mounts", n)
	}
	if err := release(); err != nil {
		t.Fatal(err)
	}
	if n := nodeplugintest.CountMounts(t, store); n != 0 {
		t.Fatalf("%d mounts on the store after release, want 0", n)
	}
}
