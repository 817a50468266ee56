package extract

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/test/testenv"
)

func owner(t *testing.T, p string) (uid, gid int) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return int(st.Uid), int(st.Gid)
}

// entry is one tar entry of a test archive.
type entry struct {
	hdr  tar.Header
	body string
}

func reg(name, body string, mode int64) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(body))}, body: body}
}
func dir(name string, mode int64) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode}}
}
func symlink(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}}
}
func hardlink(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: 0o644}}
}
func special(typ byte, name string) entry {
	return entry{hdr: tar.Header{Typeflag: typ, Name: name, Mode: 0o644}}
}

func archive(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("writing header %q: %v", h.Name, err)
		}
		if _, err := io.WriteString(tw, e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// sandbox is a directory with the extraction root and a sibling "outside" directory holding
// a sentinel, so a test can prove that nothing escaped.
type sandbox struct {
	base, root, outside string
}

func newSandbox(t testing.TB) sandbox {
	t.Helper()
	base := t.TempDir()
	s := sandbox{base: base, root: filepath.Join(base, "root"), outside: filepath.Join(base, "outside")}
	for _, d := range []string{s.root, s.outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(s.outside, "sentinel"), []byte("untouched"), 0o644); err != nil {
		t.Fatal(err)
	}
	return s
}

// checkOutside fails the test if anything but the sentinel exists outside the root, or if
// the sentinel changed.
func (s sandbox) checkOutside(t testing.TB) {
	t.Helper()
	entries, err := os.ReadDir(s.base)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() != "root" && e.Name() != "outside" {
			t.Errorf("extraction created %q next to the root", e.Name())
		}
	}
	out, err := os.ReadDir(s.outside)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 1 {
		t.Errorf("outside directory holds %d entries, want only the sentinel", len(out))
	}
	b, err := os.ReadFile(filepath.Join(s.outside, "sentinel"))
	if err != nil || string(b) != "untouched" {
		t.Errorf("sentinel changed: %q, %v", b, err)
	}
}

func TestExtractWritesTree(t *testing.T) {
	s := newSandbox(t)
	mtime := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)
	file := reg("datadog-init/package/ddtrace/__init__.py", "print('hi')\n", 0o644)
	file.hdr.ModTime = mtime
	ro := dir("datadog-init/package/ro", 0o555)
	ro.hdr.ModTime = mtime
	data := archive(t,
		dir("datadog-init", 0o755),
		dir("datadog-init/package", 0o755),
		file,
		reg("datadog-init/package/run.sh", "#!/bin/sh\n", 0o755),
		ro,
		reg("datadog-init/package/ro/inside", "x", 0o444),
		symlink("datadog-init/package/current", "ddtrace"),
		hardlink("datadog-init/package/run2.sh", "datadog-init/package/run.sh"),
		// No parent entries: created implicitly.
		reg("opt/lib/x.so", "elf", 0o755),
	)
	st, err := Extract(context.Background(), bytes.NewReader(data), s.root, Options{})
	if err != nil {
		t.Fatalf("Extract: %v", err)
	}
	s.checkOutside(t)
	want := Stats{Entries: 9, Files: 4, Dirs: 3, Symlinks: 1, Hardlinks: 1, Bytes: int64(len("print('hi')\n") + len("#!/bin/sh\n") + 1 + 3)}
	if st.Entries != want.Entries || st.Files != want.Files || st.Dirs != want.Dirs || st.Symlinks != want.Symlinks || st.Hardlinks != want.Hardlinks || st.Bytes != want.Bytes {
		t.Errorf("stats = %+v, want %+v", st, want)
	}
	pkg := filepath.Join(s.root, "datadog-init/package")
	if b, _ := os.ReadFile(filepath.Join(pkg, "ddtrace/__init__.py")); string(b) != "print('hi')\n" {
		t.Errorf("file content = %q", b)
	}
	fi, err := os.Stat(filepath.Join(pkg, "ddtrace/__init__.py"))
	if err != nil {
		t.Fatal(err)
	}
	if !fi.ModTime().Equal(mtime) {
		t.Errorf("mtime = %v, want %v (kept for .pyc checks)", fi.ModTime(), mtime)
	}
	if fi, _ := os.Stat(filepath.Join(pkg, "run.sh")); fi.Mode().Perm() != 0o755 {
		t.Errorf("run.sh mode = %v, want 0755", fi.Mode())
	}
	if fi, _ := os.Stat(filepath.Join(pkg, "ro")); fi.Mode().Perm() != 0o555 || !fi.ModTime().Equal(mtime) {
		t.Errorf("ro dir mode %v mtime %v, want 0555 and %v (applied after its children)", fi.Mode(), fi.ModTime(), mtime)
	}
	if l, _ := os.Readlink(filepath.Join(pkg, "current")); l != "ddtrace" {
		t.Errorf("symlink target = %q, want ddtrace", l)
	}
	a, _ := os.Stat(filepath.Join(pkg, "run.sh"))
	b, _ := os.Stat(filepath.Join(pkg, "run2.sh"))
	if !os.SameFile(a, b) {
		t.Errorf("run2.sh is not a hardlink of run.sh")
	}
	if fi, _ := os.Stat(filepath.Join(s.root, "opt/lib")); fi == nil || !fi.IsDir() || fi.Mode().Perm() != 0o755 {
		t.Errorf("implicit parent dir = %v, want a 0755 directory", fi)
	}
}

// TestExtractRejects covers the entries that make an archive unacceptable: each must fail
// with ErrRejected naming the entry, and leave nothing outside the root.
func TestExtractRejects(t *testing.T) {
	tests := []struct {
		name    string
		entries []entry
		opts    Options
		// wantInMsg must appear in the error message.
		wantInMsg string
	}{
		{"dotdot name", []entry{reg("../outside/pwned", "x", 0o644)}, Options{}, "climbs out"},
		{"dotdot in the middle", []entry{reg("a/../../outside/pwned", "x", 0o644)}, Options{}, "climbs out"},
		{"absolute name", []entry{reg("/outside/pwned", "x", 0o644)}, Options{}, "absolute path"},
		{"escaping relative symlink", []entry{symlink("a/link", "../../outside")}, Options{}, "outside the image root"},
		{"hardlink out of the tree", []entry{hardlink("pwned", "../outside/sentinel")}, Options{}, "outside the image root"},
		{"absolute hardlink", []entry{hardlink("pwned", "/etc/passwd")}, Options{}, "outside the image root"},
		{"hardlink to missing file", []entry{hardlink("pwned", "nothing")}, Options{}, "not a regular file earlier"},
		{"hardlink to a directory", []entry{dir("d", 0o755), hardlink("pwned", "d")}, Options{}, "not a regular file earlier"},
		{"hardlink to a symlink", []entry{symlink("l", "x"), hardlink("pwned", "l")}, Options{}, "not a regular file earlier"},
		{"hardlink through a symlinked dir", []entry{dir("d", 0o755), reg("d/f", "x", 0o644), symlink("l", "d"), hardlink("pwned", "l/f")}, Options{}, "not a regular file earlier"},
		{"character device", []entry{special(tar.TypeChar, "dev/null")}, Options{}, "device node"},
		{"overlay whiteout device", []entry{special(tar.TypeChar, "datadog-init/package")}, Options{}, "device node"},
		{"block device", []entry{special(tar.TypeBlock, "dev/sda")}, Options{}, "device node"},
		{"fifo", []entry{special(tar.TypeFifo, "fifo")}, Options{}, "FIFO"},
		{"unsupported type", []entry{special(tar.TypeCont, "cont")}, Options{}, "unsupported tar type"},
		{"file over the byte cap", []entry{reg("big", strings.Repeat("x", 101), 0o644)}, Options{MaxBytes: 100}, "100 byte limit"},
		{"files summing over the byte cap", []entry{reg("a", strings.Repeat("x", 60), 0o644), reg("b", strings.Repeat("x", 60), 0o644)}, Options{MaxBytes: 100}, "100 byte limit"},
		{"skipped files count toward the byte cap", []entry{reg("f", "x", 0o644), reg("f", strings.Repeat("x", 60), 0o644), reg("g", strings.Repeat("x", 60), 0o644)}, Options{MaxBytes: 100}, "byte limit"},
		{"entry cap", []entry{dir("a", 0o755), dir("b", 0o755), dir("c", 0o755)}, Options{MaxEntries: 2}, "more than 2 entries"},
		{"long component", []entry{reg(strings.Repeat("a", 256), "x", 0o644)}, Options{}, "longer than 255"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSandbox(t)
			_, err := Extract(context.Background(), bytes.NewReader(archive(t, tt.entries...)), s.root, tt.opts)
			if !errors.Is(err, ErrRejected) {
				t.Fatalf("Extract error = %v, want ErrRejected", err)
			}
			if !strings.Contains(err.Error(), tt.wantInMsg) {
				t.Errorf("error %q does not say %q", err, tt.wantInMsg)
			}
			s.checkOutside(t)
		})
	}
}

func TestExtractTrailingData(t *testing.T) {
	data := archive(t, reg("a", "x", 0o644))
	s := newSandbox(t)
	if _, err := Extract(context.Background(), io.MultiReader(bytes.NewReader(data), bytes.NewReader(make([]byte, 10240))), s.root, Options{}); err != nil {
		t.Errorf("record padding after the archive: %v", err)
	}
	s = newSandbox(t)
	_, err := Extract(context.Background(), io.MultiReader(bytes.NewReader(data), bytes.NewReader(make([]byte, maxTrailingBytes+1))), s.root, Options{})
	if !errors.Is(err, ErrRejected) {
		t.Errorf("%d bytes after the archive: %v, want ErrRejected", maxTrailingBytes+1, err)
	}
}

func TestExtractByteCapStopsBeforeWriting(t *testing.T) {
	s := newSandbox(t)
	_, err := Extract(context.Background(), bytes.NewReader(archive(t,
		reg("small", "ok", 0o644),
		reg("bomb", strings.Repeat("\x00", 1<<20), 0o644),
	)), s.root, Options{MaxBytes: 1 << 10})
	if !errors.Is(err, ErrRejected) {
		t.Fatalf("err = %v, want ErrRejected", err)
	}
	if _, err := os.Lstat(filepath.Join(s.root, "bomb")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the over-cap file was created (%v); the cap must apply before writing", err)
	}
}

// TestExtractChargesEveryInode: directories, links and empty files hold no bytes but take an
// inode and a block each; they count against the cap, and DiskBytes reports the charge.
func TestExtractChargesEveryInode(t *testing.T) {
	var entries []entry
	for i := range 10 {
		entries = append(entries, dir(fmt.Sprintf("d%d", i), 0o755))
	}
	s := newSandbox(t)
	_, err := Extract(context.Background(), bytes.NewReader(archive(t, entries...)), s.root, Options{MaxBytes: 9 * BlockSize})
	if !errors.Is(err, ErrRejected) || !strings.Contains(err.Error(), "byte limit") {
		t.Fatalf("10 directories under a 9-block cap: err = %v, want a byte limit rejection", err)
	}
	s = newSandbox(t)
	stats, err := Extract(context.Background(), bytes.NewReader(archive(t, append(entries, reg("a/f", "x", 0o644), symlink("l", "a/f"))...)), s.root, Options{MaxBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	// 10 directories, the implied parent "a", one file (one block), one symlink.
	if want := int64(13 * BlockSize); stats.DiskBytes != want {
		t.Errorf("DiskBytes = %d, want %d", stats.DiskBytes, want)
	}
}

// TestExtractNeutralises covers entries that are written differently from what the archive
// says, or skipped, because writing them verbatim would be unsafe.
func TestExtractNeutralises(t *testing.T) {
	tests := []struct {
		name    string
		entries []entry
		check   func(t *testing.T, root string, st Stats)
	}{
		{
			name:    "absolute symlink rewritten relative",
			entries: []entry{dir("bin", 0o755), reg("bin/busybox", "elf", 0o755), symlink("bin/sh", "/bin/busybox"), symlink("etc/rootlink", "/")},
			check: func(t *testing.T, root string, st Stats) {
				if l, _ := os.Readlink(filepath.Join(root, "bin/sh")); l != "busybox" {
					t.Errorf("bin/sh -> %q, want busybox", l)
				}
				if l, _ := os.Readlink(filepath.Join(root, "etc/rootlink")); l != ".." {
					t.Errorf("etc/rootlink -> %q, want ..", l)
				}
				if st.RewrittenSymlinks != 2 {
					t.Errorf("RewrittenSymlinks = %d, want 2", st.RewrittenSymlinks)
				}
			},
		},
		{
			name:    "write through an absolute symlink to the outside",
			entries: []entry{symlink("evil", "/outside"), reg("evil/pwned", "x", 0o644)},
			check: func(t *testing.T, root string, st Stats) {
				if st.Skipped != 1 || st.Files != 0 {
					t.Errorf("stats %+v: the write through the link must be skipped", st)
				}
				if _, err := os.Lstat(filepath.Join(root, "outside/pwned")); err == nil {
					t.Errorf("the write followed the rewritten link inside the root")
				}
			},
		},
		{
			name:    "write through an in-tree symlink",
			entries: []entry{dir("real", 0o755), symlink("link", "real"), reg("link/file", "x", 0o644)},
			check: func(t *testing.T, root string, st Stats) {
				if _, err := os.Lstat(filepath.Join(root, "real/file")); err == nil {
					t.Errorf("link/file was written through the symlink into real/")
				}
				if st.Skipped != 1 {
					t.Errorf("Skipped = %d, want 1", st.Skipped)
				}
			},
		},
		{
			name:    "entry below a file",
			entries: []entry{reg("f", "x", 0o644), reg("f/child", "y", 0o644)},
			check: func(t *testing.T, root string, st Stats) {
				if st.Skipped != 1 || st.Files != 1 {
					t.Errorf("stats %+v, want the child skipped", st)
				}
			},
		},
		{
			name:    "setuid and setgid stripped, sticky kept",
			entries: []entry{reg("suid", "x", 0o4755), reg("sgid", "x", 0o2755), dir("sgiddir", 0o2775), dir("tmp", 0o1777)},
			check: func(t *testing.T, root string, st Stats) {
				for name, want := range map[string]fs.FileMode{"suid": 0o755, "sgid": 0o755, "sgiddir": fs.ModeDir | 0o775, "tmp": fs.ModeDir | fs.ModeSticky | 0o777} {
					fi, err := os.Lstat(filepath.Join(root, name))
					if err != nil {
						t.Fatal(err)
					}
					if got := fi.Mode()&^fs.ModeType | fi.Mode()&fs.ModeDir; got != want {
						t.Errorf("%s mode = %v, want %v", name, got, want)
					}
				}
				if st.SetIDStripped != 3 {
					t.Errorf("SetIDStripped = %d, want 3", st.SetIDStripped)
				}
			},
		},
		{
			name:    "whiteout markers skipped",
			entries: []entry{reg("a/.wh.b", "", 0o644), reg(".wh..wh..opq", "", 0o644)},
			check: func(t *testing.T, root string, st Stats) {
				if _, err := os.Lstat(filepath.Join(root, "a/.wh.b")); err == nil {
					t.Errorf("a whiteout marker was written")
				}
				if st.Skipped != 2 {
					t.Errorf("Skipped = %d, want 2", st.Skipped)
				}
			},
		},
		{
			name:    "first entry wins",
			entries: []entry{reg("f", "upper", 0o644), reg("f", "lower", 0o644), symlink("f", "x")},
			check: func(t *testing.T, root string, st Stats) {
				if b, _ := os.ReadFile(filepath.Join(root, "f")); string(b) != "upper" {
					t.Errorf("f = %q, want upper", b)
				}
			},
		},
		{
			name:    "explicit dir after implicit creation gets its mode",
			entries: []entry{reg("d/f", "x", 0o644), dir("d", 0o700), dir("d", 0o777)},
			check: func(t *testing.T, root string, st Stats) {
				if fi, _ := os.Stat(filepath.Join(root, "d")); fi.Mode().Perm() != 0o700 {
					t.Errorf("d mode = %v, want 0700 (the first explicit entry)", fi.Mode())
				}
			},
		},
		{
			name:    "root entries ignored",
			entries: []entry{dir("./", 0o700), dir("/", 0o700), reg("./x", "y", 0o644)},
			check: func(t *testing.T, root string, st Stats) {
				if fi, _ := os.Stat(root); fi.Mode().Perm() != 0o755 {
					t.Errorf("root mode changed to %v", fi.Mode())
				}
				if b, _ := os.ReadFile(filepath.Join(root, "x")); string(b) != "y" {
					t.Errorf("./x not extracted as x")
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSandbox(t)
			st, err := Extract(context.Background(), bytes.NewReader(archive(t, tt.entries...)), s.root, Options{})
			if err != nil {
				t.Fatalf("Extract: %v", err)
			}
			tt.check(t, s.root, st)
			s.checkOutside(t)
		})
	}
}

func TestExtractReadErrors(t *testing.T) {
	data := archive(t, reg("a", strings.Repeat("x", 4096), 0o644))
	tests := []struct {
		name string
		r    io.Reader
	}{
		{"truncated in a file", bytes.NewReader(data[:1024])},
		{"garbage header", bytes.NewReader(bytes.Repeat([]byte{0xff}, 1024))},
		{"failing reader", io.MultiReader(bytes.NewReader(data[:512]), iotestErrReader{})},
		// mutate.Extract writes the end-of-archive marker before it reports a failure.
		{"failure after the end of the archive", io.MultiReader(bytes.NewReader(data), iotestErrReader{})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSandbox(t)
			_, err := Extract(context.Background(), tt.r, s.root, Options{})
			var re *ReadError
			if !errors.As(err, &re) {
				t.Fatalf("err = %v (%T), want *ReadError", err, err)
			}
			if errors.Is(err, ErrRejected) {
				t.Errorf("a read error must not claim the archive was rejected: %v", err)
			}
		})
	}
}

type iotestErrReader struct{}

func (iotestErrReader) Read([]byte) (int, error) { return 0, errors.New("connection reset by peer") }

func TestExtractCancelled(t *testing.T) {
	s := newSandbox(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Extract(ctx, bytes.NewReader(archive(t, reg("a", "x", 0o644))), s.root, Options{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

func TestExtractPreservesOwnership(t *testing.T) {
	testenv.RequireRoot(t) // chown
	s := newSandbox(t)
	f := reg("f", "x", 0o644)
	f.hdr.Uid, f.hdr.Gid = 10000, 10001
	d := dir("d", 0o755)
	d.hdr.Uid, d.hdr.Gid = 10002, 10003
	if _, err := Extract(context.Background(), bytes.NewReader(archive(t, f, d)), s.root, Options{PreserveOwnership: true}); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][2]int{"f": {10000, 10001}, "d": {10002, 10003}} {
		uid, gid := owner(t, filepath.Join(s.root, name))
		if uid != want[0] || gid != want[1] {
			t.Errorf("%s owner = %d:%d, want %d:%d", name, uid, gid, want[0], want[1])
		}
	}
}

// BenchmarkExtract measures throughput and allocation of a 64 MiB file; allocations must not
// grow with the file size (the copy buffer is fixed).
func BenchmarkExtract(b *testing.B) {
	data := archive(b, reg("big", strings.Repeat("x", 64<<20), 0o644))
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		dir := b.TempDir()
		b.StartTimer()
		if _, err := Extract(context.Background(), bytes.NewReader(data), dir, Options{}); err != nil {
			b.Fatal(err)
		}
	}
}
