// Package state keeps what the node plugin must know after a restart: one record per
// published volume target, each in its own file, written atomically. The driver writes a record
// before it mounts and deletes it after it unmounts, so a crash at any point leaves either
// nothing or a record that the startup reconcile can act on.
package state

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Record describes one published volume target.
type Record struct {
	VolumeID   string `json:"volumeID"`
	TargetPath string `json:"targetPath"`
	// Kind is hostdir, library or preload; Type the "type" attribute as written.
	Kind string `json:"kind"`
	Type string `json:"type"`
	// Attributes are the volume attributes with tokens and secrets redacted.
	Attributes map[string]string `json:"attributes,omitempty"`
	// HostDir is the hostdir entry name; Source the host path bind-mounted (hostdir, preload,
	// and a library volume served as a single read-only layer).
	HostDir string `json:"hostDir,omitempty"`
	Source  string `json:"source,omitempty"`
	// Layers are the lower dirs of a library volume, top first, with the digests they came from
	// (empty for generated files).
	Layers []Layer `json:"layers,omitempty"`
	// OverlayDir holds UpperDir and WorkDir of a writable library volume; it belongs to this
	// record alone and is removed with it.
	OverlayDir string `json:"overlayDir,omitempty"`
	UpperDir   string `json:"upperDir,omitempty"`
	WorkDir    string `json:"workDir,omitempty"`
	// WritableLimit (bytes) bounds UpperDir and WorkDir together; WritableLayer is what
	// enforces it (project-quota or tmpfs). The dir itself tells what to free.
	WritableLimit int64  `json:"writableLimit,omitempty"`
	WritableLayer string `json:"writableLayer,omitempty"`
	// TargetIsFile is set when the target was created as a file (sockets, ld.so.preload).
	TargetIsFile bool      `json:"targetIsFile,omitempty"`
	Pod          Pod       `json:"pod,omitzero"`
	Ephemeral    bool      `json:"ephemeral,omitempty"`
	ReadOnly     bool      `json:"readOnly"`
	Created      time.Time `json:"created"`
}

// Layer is one lower dir of a library volume.
type Layer struct {
	Dir    string `json:"dir"`
	Digest string `json:"digest,omitempty"`
}

// Pod identifies the pod a volume was published for (from kubelet's podInfoOnMount attributes).
type Pod struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	UID       string `json:"uid,omitempty"`
}

// Key names a record: one volume id may be published at several targets (a static
// PersistentVolume used by several pods on the node), and each needs its own overlay dirs.
func Key(volumeID, targetPath string) string {
	sum := sha256.Sum256([]byte(volumeID + "\x00" + targetPath))
	return hex.EncodeToString(sum[:])
}

// Key returns the record's key.
func (r *Record) Key() string { return Key(r.VolumeID, r.TargetPath) }

const (
	recordSuffix = ".json"
	tempPrefix   = ".tmp-"
)

// Store is the directory of records.
type Store struct {
	dir string
}

// Open opens (creating it if needed) the record directory under stateDir and removes temporary
// files that a crash during a write left behind.
func Open(stateDir string) (*Store, error) {
	dir := filepath.Join(stateDir, "volumes")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tempPrefix) {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				return nil, fmt.Errorf("state dir: removing interrupted write: %w", err)
			}
		}
	}
	return &Store{dir: dir}, nil
}

// Dir returns the record directory.
func (s *Store) Dir() string { return s.dir }

func (s *Store) path(key string) string { return filepath.Join(s.dir, key+recordSuffix) }

// Put writes r atomically: a temporary file is written and synced, then renamed over the
// record, and the directory is synced so that the rename itself survives a power loss.
func (s *Store) Put(r *Record) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state record: %w", err)
	}
	f, err := os.CreateTemp(s.dir, tempPrefix)
	if err != nil {
		return fmt.Errorf("write state record: %w", err)
	}
	tmp := f.Name()
	if _, err := f.Write(data); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.path(r.Key()))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write state record for volume %q: %w", r.VolumeID, err)
	}
	return s.syncDir()
}

// Get reads the record of a volume id and target; ok is false when there is none.
func (s *Store) Get(volumeID, targetPath string) (rec *Record, ok bool, err error) {
	return s.read(s.path(Key(volumeID, targetPath)))
}

func (s *Store) read(path string) (*Record, bool, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read state record: %w", err)
	}
	var r Record
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, false, fmt.Errorf("state record %s is corrupt: %w", path, err)
	}
	return &r, true, nil
}

// Delete removes a record; a missing one is not an error.
func (s *Store) Delete(key string) error {
	err := os.Remove(s.path(key))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete state record: %w", err)
	}
	return s.syncDir()
}

// List returns every record. A record that cannot be read is reported in the error and left
// in place for a person to inspect; the others are still returned.
func (s *Store) List() ([]*Record, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list state records: %w", err)
	}
	var out []*Record
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, recordSuffix) || strings.HasPrefix(name, tempPrefix) {
			continue
		}
		r, ok, err := s.read(filepath.Join(s.dir, name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !ok {
			continue // deleted since ReadDir
		}
		if r.Key()+recordSuffix != name {
			errs = append(errs, fmt.Errorf("state record %s holds volume %q at %q, which belongs in another file", name, r.VolumeID, r.TargetPath))
			continue
		}
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

func (s *Store) syncDir() error {
	d, err := os.Open(s.dir)
	if err != nil {
		return fmt.Errorf("sync state dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync state dir: %w", err)
	}
	return nil
}
