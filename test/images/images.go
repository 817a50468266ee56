// Package images builds the container images the local cluster and the end-to-end tests run,
// without a Docker engine and without any public registry: an image is an empty base plus one
// layer written here from host files, with an OCI config (entrypoint, env, OCI labels), saved
// as an image tarball that `ctr images import` (and so the local cluster's ImportImage) loads.
//
// Images are reproducible: every timestamp is fixed (SOURCE_DATE_EPOCH, or the Unix epoch), so
// the same inputs give the same digest and a re-import is a no-op.
package images

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// OCI image-spec annotation keys, used as image config labels.
const (
	LabelTitle       = "org.opencontainers.image.title"
	LabelDescription = "org.opencontainers.image.description"
	LabelSource      = "org.opencontainers.image.source"
	LabelVersion     = "org.opencontainers.image.version"
	LabelRevision    = "org.opencontainers.image.revision"
	LabelCreated     = "org.opencontainers.image.created"
	LabelVendor      = "org.opencontainers.image.vendor"
	LabelLicenses    = "org.opencontainers.image.licenses"
)

// ProjectSource is the value of the source label on every image built here.
const ProjectSource = "https://github.com/apm-csi/apm-csi"

// DefaultPath is the PATH of images that do not set one.
const DefaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// File is one entry of an image's single layer.
type File struct {
	// Path is the absolute path inside the image.
	Path string
	// Source is a host file whose content is copied; leave empty to use Data or Symlink.
	Source string
	// Data is the content when Source is empty.
	Data []byte
	// Mode holds the permission bits (including setuid/sticky if wanted). Zero means the
	// Source file's permission bits, or 0644 for Data.
	Mode fs.FileMode
	// Symlink, when set, makes Path a symbolic link to this target (Source and Data unused).
	Symlink string
	// Dir, when true, makes Path a directory (Mode defaults to 0755).
	Dir bool
}

// Spec describes an image built from files.
type Spec struct {
	// Ref is the image reference the tarball is tagged with, e.g. localhost/apm-csi/pause:local.
	Ref string
	// Files make up the image's one layer. Parent directories are added as needed.
	Files      []File
	Entrypoint []string
	Cmd        []string
	// Env entries (KEY=value). DefaultPath is added when no PATH is given.
	Env        []string
	WorkingDir string
	User       string
	// Labels are added to the default OCI labels (title from Ref, source, created, vendor)
	// and override them.
	Labels map[string]string
	// Created is the image creation time; zero means SOURCE_DATE_EPOCH or the Unix epoch, so
	// that builds are reproducible.
	Created time.Time
}

// Build assembles the image described by spec for linux/GOARCH.
func Build(spec Spec) (v1.Image, error) {
	ref, err := name.ParseReference(spec.Ref)
	if err != nil {
		return nil, fmt.Errorf("image ref %q: %w", spec.Ref, err)
	}
	created := spec.Created
	if created.IsZero() {
		created, err = reproducibleTime()
		if err != nil {
			return nil, err
		}
	}
	created = created.UTC()

	layerTar, err := layerTarball(spec.Files, created)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", spec.Ref, err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}

	labels := map[string]string{
		LabelTitle:   repositoryBase(ref),
		LabelSource:  ProjectSource,
		LabelVendor:  "apm-csi",
		LabelCreated: created.Format(time.RFC3339),
	}
	for k, v := range spec.Labels {
		labels[k] = v
	}
	env := append([]string(nil), spec.Env...)
	if !hasEnv(env, "PATH") {
		env = append([]string{DefaultPath}, env...)
	}

	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{
		Architecture: runtime.GOARCH,
		OS:           "linux",
		Created:      v1.Time{Time: created},
		Config: v1.Config{
			Entrypoint: spec.Entrypoint,
			Cmd:        spec.Cmd,
			Env:        env,
			WorkingDir: spec.WorkingDir,
			User:       spec.User,
			Labels:     labels,
		},
		RootFS: v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return nil, err
	}
	return mutate.Append(img, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History: v1.History{
			Created:   v1.Time{Time: created},
			CreatedBy: "apm-csi test/images",
			Comment:   fmt.Sprintf("%d files", len(spec.Files)),
		},
	})
}

// Tarball is an image written to disk.
type Tarball struct {
	Ref    string
	Path   string
	Digest v1.Hash
}

// Write saves img, tagged ref, as an image tarball at path (the layout `ctr images import`,
// `docker load` and go-containerregistry's tarball.ImageFromPath read), atomically.
func Write(path, ref string, img v1.Image) (Tarball, error) {
	tag, err := name.ParseReference(ref)
	if err != nil {
		return Tarball{}, fmt.Errorf("image ref %q: %w", ref, err)
	}
	digest, err := img.Digest()
	if err != nil {
		return Tarball{}, err
	}
	tmp := path + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, img); err != nil {
		os.Remove(tmp)
		return Tarball{}, fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return Tarball{}, err
	}
	return Tarball{Ref: ref, Path: path, Digest: digest}, nil
}

// BuildAndWrite is Build followed by Write.
func BuildAndWrite(spec Spec, path string) (Tarball, error) {
	img, err := Build(spec)
	if err != nil {
		return Tarball{}, err
	}
	return Write(path, spec.Ref, img)
}

// reproducibleTime is SOURCE_DATE_EPOCH (reproducible-builds.org) or the Unix epoch.
func reproducibleTime() (time.Time, error) {
	v := os.Getenv("SOURCE_DATE_EPOCH")
	if v == "" {
		return time.Unix(0, 0), nil
	}
	secs, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q: %w", v, err)
	}
	return time.Unix(secs, 0), nil
}

func repositoryBase(ref name.Reference) string {
	repo := ref.Context().RepositoryStr()
	return path.Base(repo)
}

func hasEnv(env []string, key string) bool {
	for _, e := range env {
		if strings.HasPrefix(e, key+"=") {
			return true
		}
	}
	return false
}

// layerTarball writes files (plus their missing parent directories) as an uncompressed tar,
// owned by root, with fixed timestamps, in path order so the digest only depends on content.
func layerTarball(files []File, mtime time.Time) ([]byte, error) {
	entries := map[string]File{}
	for _, f := range files {
		p := path.Clean(f.Path)
		if !path.IsAbs(p) || p == "/" {
			return nil, fmt.Errorf("file path %q must be absolute and not /", f.Path)
		}
		if _, dup := entries[p]; dup {
			return nil, fmt.Errorf("file %s listed twice", p)
		}
		f.Path = p
		entries[p] = f
		for dir := path.Dir(p); dir != "/"; dir = path.Dir(dir) {
			if _, ok := entries[dir]; !ok {
				entries[dir] = File{Path: dir, Dir: true}
			}
		}
	}
	for p, f := range entries {
		if !f.Dir {
			if parent, ok := entries[path.Dir(p)]; ok && !parent.Dir {
				return nil, fmt.Errorf("%s is inside %s, which is not a directory", p, parent.Path)
			}
		}
	}
	paths := make([]string, 0, len(entries))
	for p := range entries {
		paths = append(paths, p)
	}
	sort.Strings(paths)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		f := entries[p]
		hdr := &tar.Header{
			Name:    strings.TrimPrefix(p, "/"),
			ModTime: mtime,
			Format:  tar.FormatPAX,
		}
		var content []byte
		switch {
		case f.Dir:
			hdr.Typeflag = tar.TypeDir
			hdr.Name += "/"
			hdr.Mode = modeOr(f.Mode, 0o755)
		case f.Symlink != "":
			hdr.Typeflag = tar.TypeSymlink
			hdr.Linkname = f.Symlink
			hdr.Mode = 0o777
		case f.Source != "":
			st, err := os.Stat(f.Source)
			if err != nil {
				return nil, err
			}
			if !st.Mode().IsRegular() {
				return nil, fmt.Errorf("%s is not a regular file", f.Source)
			}
			if content, err = os.ReadFile(f.Source); err != nil {
				return nil, err
			}
			hdr.Typeflag = tar.TypeReg
			hdr.Mode = modeOr(f.Mode, st.Mode())
		default:
			content = f.Data
			hdr.Typeflag = tar.TypeReg
			hdr.Mode = modeOr(f.Mode, 0o644)
		}
		hdr.Size = int64(len(content))
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(content); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// modeOr returns the tar mode bits of m, or of fallback when m is zero.
func modeOr(m, fallback fs.FileMode) int64 {
	if m == 0 {
		m = fallback
	}
	bits := int64(m.Perm())
	if m&fs.ModeSetuid != 0 {
		bits |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		bits |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		bits |= 0o1000
	}
	return bits
}
