package librarycache

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
	"github.com/apm-csi/apm-csi/shared/libref"
)

// place returns the directory to hand out for the source directory of img placed at target
// inside a volume. At the volume root the image's own directory serves; elsewhere a view
// (a hardlink farm of the source below target) is built once and shared.
func (s *store) place(img *entry, source, target string) (string, error) {
	srcRel := path.Join(img.rel(), kindImage.content(), strings.TrimPrefix(source, "/"))
	if err := s.checkSourceDir(img, source); err != nil {
		return "", err
	}
	if target == "" {
		return filepath.Join(s.dir, srcRel), nil
	}
	key := contentKey(img.meta.Digest, source, target)
	if v := s.acquire(kindView, key); v != nil {
		s.release(v)
		return s.contentDir(v), nil
	}
	val, err, _ := s.builds.Do("view:"+key, func() (any, error) {
		s.mu.Lock()
		v := s.views[key]
		s.mu.Unlock()
		if v != nil && !v.removing {
			return v, nil
		}
		return s.buildView(img, srcRel, key, source, target)
	})
	if err != nil {
		return "", err
	}
	v := s.acquireEntry(val.(*entry))
	if v == nil {
		return "", fail(library.ErrDownloadInProgress, "its view was evicted from the cache right after it was built")
	}
	s.release(v)
	return s.contentDir(v), nil
}

func (s *store) contentDir(e *entry) string {
	return filepath.Join(s.dir, e.rel(), e.kind.content())
}

// contentKey names derived entries: a hash of the parts, unambiguous thanks to the NUL
// separators (none of the parts can hold one).
func contentKey(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))
}

// checkSourceDir verifies, one component at a time without following links, that source is
// a real directory of the image: overlayfs resolves lowerdir on the host, so a symlinked
// source must never be handed out.
func (s *store) checkSourceDir(img *entry, source string) error {
	p := path.Join(img.rel(), kindImage.content())
	for _, comp := range strings.Split(strings.TrimPrefix(source, "/"), "/") {
		if comp == "" {
			continue
		}
		p = path.Join(p, comp)
		fi, err := s.root.Lstat(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return fail(library.ErrImageRejected, "its content (%s) has no directory %s; set the library source to a directory that exists in the image (Datadog images keep a tracer in %s and the injector in %s)",
				img.meta.Digest, source, libref.LibrarySource, libref.InjectorSource)
		case err != nil:
			return localErr(err)
		case fi.Mode()&fs.ModeSymlink != 0:
			return fail(library.ErrImageRejected, "in its content (%s), %s is a symlink; a library source must be a real directory of the image", img.meta.Digest, "/"+strings.TrimPrefix(p, path.Join(img.rel(), kindImage.content())+"/"))
		case !fi.IsDir():
			return fail(library.ErrImageRejected, "in its content (%s), %s is not a directory", img.meta.Digest, "/"+strings.TrimPrefix(p, path.Join(img.rel(), kindImage.content())+"/"))
		}
	}
	return nil
}

// buildView creates views/<key>/root/<target> as a hardlink farm of srcRel: no file data is
// copied, and the files are the image's own inodes (same modes, owners, times).
func (s *store) buildView(img *entry, srcRel, key, source, target string) (*entry, error) {
	// A view's directories and links are inodes of its own: it is charged like an image.
	if err := s.checkBudget(img.meta.Image); err != nil {
		return nil, err
	}
	e, _, err := s.buildEntry(kindView, key, "view", func(rootRel string) (entryMeta, error) {
		if err := s.mkdirs(rootRel, path.Dir(path.Join(rootRel, target))); err != nil {
			return entryMeta{}, err
		}
		charged, err := s.farm(srcRel, path.Join(rootRel, target))
		if err != nil {
			return entryMeta{}, localErr(fmt.Errorf("building the view of %s at %s: %w", source, target, err))
		}
		// The parents of the target, one block each.
		charged += int64(strings.Count(target, "/")+1) * extract.BlockSize
		return entryMeta{Digest: img.meta.Digest, Image: img.meta.Image, ImageKey: img.key, Source: source, Target: target, Bytes: charged, Created: s.clock.Now().UTC(), BootID: s.bootID}, nil
	})
	return e, err
}

// buildEntry adds the entry k/key (an image, a view or generated files) to the store the way
// every entry gets there (see store.go): built in a fresh work dir of tmp/ named after
// purpose, where fill writes the content into rootRel (<work dir>/<k.content()>, not created
// yet) and returns the entry's metadata, then renamed into place in one step; a failed
// build's work dir is removed. If a concurrent build published the same key first, that entry
// is used (fresh is false): keys name content, so it holds the same; publishOrSettle says how
// a leftover at that key is settled.
func (s *store) buildEntry(k kind, key, purpose string, fill func(rootRel string) (entryMeta, error)) (e *entry, fresh bool, err error) {
	tmp, err := s.mkTemp(purpose)
	if err != nil {
		return nil, false, err
	}
	published := false
	defer func() {
		if published {
			return
		}
		if err := s.root.RemoveAll(tmp); err != nil {
			s.log.Error("cannot remove an abandoned work dir; the next start removes it", "path", filepath.Join(s.dir, tmp), "err", err)
		}
	}()
	meta, err := fill(path.Join(tmp, k.content()))
	if err != nil {
		return nil, false, err
	}
	if err := s.writeMeta(tmp, meta); err != nil {
		return nil, false, err
	}
	existing, err := s.publishOrSettle(tmp, k, key)
	if err != nil || existing != nil {
		return existing, false, err
	}
	published = true
	return s.add(&entry{kind: k, key: key, meta: meta}), true, nil
}

// mkdirs creates root and the plain 0755 directories from root down to dir. Modes are set
// explicitly: the umask must not make a view's parents unreadable to a pod's user.
func (s *store) mkdirs(root, dir string) error {
	if err := s.root.Mkdir(root, 0o755); err != nil {
		return localErr(err)
	}
	if err := s.root.Chmod(root, 0o755); err != nil {
		return localErr(err)
	}
	return s.mkdirsBelow(root, dir)
}

type dirAttrs struct {
	rel      string
	mode     fs.FileMode
	uid, gid int
	mtime    time.Time
}

// farm mirrors the tree at src into dst (which must not exist) with hardlinks. It returns
// what the new inodes are charged: a block per directory and symlink (hardlinks share the
// image's inodes, already charged to the image).
//
// Directories are resolved through the store's root, once each; the entries of a directory
// are then linked, read and created by name relative to the open source and view
// directories. Resolving every file's path through the root instead re-walks every
// component of both paths for each link, which cost four times the links themselves
// (BenchmarkColdSteps).
func (s *store) farm(src, dst string) (int64, error) {
	chown := os.Geteuid() == 0
	var dirs []dirAttrs
	var charged int64
	pending := []string{"."}
	for len(pending) > 0 {
		rel := pending[len(pending)-1]
		pending = pending[:len(pending)-1]
		subdirs, n, attrs, err := s.farmDir(path.Join(src, rel), path.Join(dst, rel), chown)
		if err != nil {
			return 0, err
		}
		charged += n
		dirs = append(dirs, attrs)
		for _, d := range subdirs {
			pending = append(pending, path.Join(rel, d))
		}
	}
	// Deepest first, so a read-only directory never blocks its children.
	slices.SortFunc(dirs, func(a, b dirAttrs) int { return strings.Count(b.rel, "/") - strings.Count(a.rel, "/") })
	for _, d := range dirs {
		if chown {
			if err := s.root.Lchown(d.rel, d.uid, d.gid); err != nil {
				return 0, err
			}
		}
		if err := s.root.Chmod(d.rel, d.mode); err != nil {
			return 0, err
		}
		if err := s.root.Chtimes(d.rel, d.mtime, d.mtime); err != nil {
			return 0, err
		}
	}
	return charged, nil
}

// farmDir creates the directory dst mirroring the directory src: hardlinks to its files and
// copies of its symlinks. It returns the names of src's subdirectories (for the caller to
// mirror next), what it charged, and the attributes to give dst once its tree is complete.
func (s *store) farmDir(src, dst string, chown bool) (subdirs []string, charged int64, attrs dirAttrs, err error) {
	from, err := s.root.Open(src)
	if err != nil {
		return nil, 0, attrs, err
	}
	defer from.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(from.Fd()), &st); err != nil {
		return nil, 0, attrs, &os.PathError{Op: "fstat", Path: src, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, 0, attrs, fmt.Errorf("%s is not a directory", src)
	}
	if err := s.root.Mkdir(dst, 0o700); err != nil {
		return nil, 0, attrs, err
	}
	charged = extract.BlockSize
	attrs = dirAttrs{rel: dst, mode: fs.FileMode(st.Mode).Perm(), uid: int(st.Uid), gid: int(st.Gid), mtime: time.Unix(st.Mtim.Unix())}
	if st.Mode&unix.S_ISVTX != 0 {
		attrs.mode |= fs.ModeSticky
	}
	to, err := s.root.Open(dst)
	if err != nil {
		return nil, 0, attrs, err
	}
	defer to.Close()
	entries, err := from.ReadDir(-1)
	if err != nil {
		return nil, 0, attrs, err
	}
	sfd, dfd := int(from.Fd()), int(to.Fd())
	for _, e := range entries {
		name := e.Name()
		switch t := e.Type(); {
		case t.IsRegular():
			if err := unix.Linkat(sfd, name, dfd, name, 0); err != nil {
				return nil, 0, attrs, &os.PathError{Op: "linkat", Path: path.Join(src, name), Err: err}
			}
		case t.IsDir():
			subdirs = append(subdirs, name)
		case t&fs.ModeSymlink != 0:
			if err := farmSymlink(sfd, dfd, name, chown); err != nil {
				return nil, 0, attrs, &os.PathError{Op: "copying symlink", Path: path.Join(src, name), Err: err}
			}
			charged += extract.BlockSize
		default:
			// The extractor never creates anything else.
			return nil, 0, attrs, fmt.Errorf("unexpected file type %v at %s", t, path.Join(src, name))
		}
	}
	return subdirs, charged, attrs, nil
}

// farmSymlink copies the symlink name of directory sfd into directory dfd, with its owner.
func farmSymlink(sfd, dfd int, name string, chown bool) error {
	buf := make([]byte, unix.PathMax+1)
	n, err := unix.Readlinkat(sfd, name, buf)
	if err != nil {
		return err
	}
	if n > unix.PathMax {
		return errors.New("link target longer than PATH_MAX")
	}
	if err := unix.Symlinkat(string(buf[:n]), dfd, name); err != nil {
		return err
	}
	if !chown {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Fstatat(sfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	return unix.Fchownat(dfd, name, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW)
}
