package extract

import (
	"archive/tar"
	"bytes"
	"context"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzExtractEntries builds archives from a compact text description, one entry per line, so
// the fuzzer explores what the extractor decides (names, link targets, types, modes) rather
// than the tar parser's framing. A line is "<kind><name>" or "<kind><name>><target>" with kind
// f (file 0644), x (setuid file), d (dir), D (setgid dir), l (symlink), h (hardlink),
// c (char device), b (block device), p (FIFO), 7 (contiguous file, unsupported).
func FuzzExtractEntries(f *testing.F) {
	for _, s := range []string{
		"ddatadog-init\nfdatadog-init/package/a.py\nldatadog-init/package/cur>a.py",
		"f../outside/pwned",
		"f/outside/pwned",
		"levil>/outside\nfevil/pwned",
		"la/b>../../outside\nfa/b/c",
		"ld>.\nfd/x",
		"xf\nhg>f\nhh>../outside/sentinel\nhi>/etc/passwd",
		"cdev/null\npfifo\nbdev/sda\n7cont",
		"fa/.wh.b\nDa\nlr>/",
		"fa/b\nda\nla>x",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, desc string) {
		data, ok := describedArchive(desc)
		if !ok {
			return
		}
		fuzzOne(t, data)
	})
}

// FuzzExtract feeds raw bytes to the extractor: the tar framing itself is hostile too.
func FuzzExtract(f *testing.F) {
	for _, s := range []string{"ddatadog-init\nfdatadog-init/package/a.py\nldatadog-init/package/cur>a.py", "levil>/outside\nfevil/pwned", "xf\nhg>f"} {
		data, _ := describedArchive(s)
		// Without the end-of-archive blocks: the reader accepts that, and small inputs keep
		// the fuzzer's minimisation fast.
		f.Add(data[:len(data)-1024])
	}
	f.Fuzz(fuzzOne)
}

func describedArchive(desc string) ([]byte, bool) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, line := range strings.Split(desc, "\n") {
		if len(line) < 2 {
			continue
		}
		name, target, _ := strings.Cut(line[1:], ">")
		h := tar.Header{Name: name, Linkname: target, Mode: 0o644}
		switch line[0] {
		case 'f':
			h.Typeflag, h.Size = tar.TypeReg, int64(len(name))
		case 'x':
			h.Typeflag, h.Size, h.Mode = tar.TypeReg, int64(len(name)), 0o4755
		case 'd':
			h.Typeflag, h.Mode = tar.TypeDir, 0o755
		case 'D':
			h.Typeflag, h.Mode = tar.TypeDir, 0o2777
		case 'l':
			h.Typeflag = tar.TypeSymlink
		case 'h':
			h.Typeflag = tar.TypeLink
		case 'c':
			h.Typeflag = tar.TypeChar
		case 'b':
			h.Typeflag = tar.TypeBlock
		case 'p':
			h.Typeflag = tar.TypeFifo
		case '7':
			h.Typeflag, h.Size = tar.TypeCont, 1
		default:
			continue
		}
		if err := tw.WriteHeader(&h); err != nil {
			return nil, false
		}
		if h.Size > 0 {
			body := name
			if h.Typeflag == tar.TypeCont {
				body = "x"
			}
			if _, err := tw.Write([]byte(body)); err != nil {
				return nil, false
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, false
	}
	return buf.Bytes(), true
}

// fuzzOne extracts data and checks the invariants that make the result safe as an overlayfs
// lower dir: nothing outside the root changed, no device node or FIFO, no setuid/setgid bit,
// every symlink resolves inside the root.
func fuzzOne(t *testing.T, data []byte) {
	s := newSandbox(t)
	_, _ = Extract(context.Background(), bytes.NewReader(data), s.root, Options{MaxBytes: 1 << 20, MaxEntries: 1000})
	s.checkOutside(t)
	err := filepath.WalkDir(s.root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		m := fi.Mode()
		if m&(fs.ModeDevice|fs.ModeCharDevice|fs.ModeNamedPipe|fs.ModeSocket) != 0 {
			t.Errorf("%s: special file %v", p, m)
		}
		if m&(fs.ModeSetuid|fs.ModeSetgid) != 0 {
			t.Errorf("%s: setuid/setgid bit survived: %v", p, m)
		}
		if m&fs.ModeSymlink != 0 {
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(s.root, filepath.Dir(p))
			if path.IsAbs(target) || !filepath.IsLocal(path.Join(rel, target)) && path.Join(rel, target) != "." {
				t.Errorf("%s: symlink to %q leaves the root", p, target)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
