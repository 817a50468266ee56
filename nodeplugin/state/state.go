// Package state keeps what the node plugin must know after a restart: one record per
// published volume target. The driver writes a record before it mounts and deletes it after it
// unmounts, so a crash at any point leaves either nothing or a record that the startup
// reconcile can act on.
//
// The records live in one append-only journal, <state-dir>/volumes/journal: a Put appends
// the record and returns once the journal is synced to disk (one fdatasync; concurrent Puts
// share one), so a record is durable before the mount it describes exists. A Delete appends a
// tombstone without waiting for the disk: the next Put's sync carries it, and a Delete lost to
// a crash only brings back the record of a target that was already unmounted, which the
// startup reconcile drops (that is what it does for every record whose target is not
// mounted). Each line carries a CRC-32C, so a line torn by a crash is recognised and dropped;
// it was never acknowledged. The journal is rewritten with only the live records when it holds
// more dead lines than live ones (and at least compactMin), and at Open when it ends in a torn
// or damaged line.
//
// A record is written in a compact tab-separated encoding (encoding.go), with the paths below
// the state dir written relative to it. Open reads the journal once, through one small
// buffer, and decodes its records without allocating per record, and without their
// attributes, which only diagnostics read (Index hands these records out; List and Get decode
// records whole). The journal is not kept in memory: the Store knows where each live record's
// line lies in it, and reads the line back (checking its CRC and key again) when it rewrites
// the journal or decodes a record whole. Journals whose records
// earlier versions wrote in full (the first compact encoding) or as JSON are read and
// rewritten by Open (those versions cannot read what this one writes). Records of still
// earlier versions, one JSON file per record in the same directory, are taken into the
// journal by Open and then removed.
package state

import (
	"bufio"
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
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

// Layer is one lower dir of a library volume: the library package's type, whose JSON field
// names ("dir", "digest") are this journal's.
type Layer = library.Layer

// Pod identifies the pod a volume was published for (from kubelet's podInfoOnMount attributes).
type Pod struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	UID       string `json:"uid,omitempty"`
}

// Key names a record: one volume id may be published at several targets (a static
// PersistentVolume used by several pods on the node), and each needs its own overlay dirs.
func Key(volumeID, targetPath string) string {
	var buf [256]byte // what is hashed, on the stack unless longer
	sum := sha256.Sum256(append(append(append(buf[:0], volumeID...), 0), targetPath...))
	return hex.EncodeToString(sum[:])
}

// Key returns the record's key.
func (r *Record) Key() string { return Key(r.VolumeID, r.TargetPath) }

// HasKey reports whether key is the record's key, without allocating.
func (r *Record) HasKey(key string) bool {
	var buf [256]byte
	sum := sha256.Sum256(append(append(append(buf[:0], r.VolumeID...), 0), r.TargetPath...))
	var hexSum [2 * sha256.Size]byte
	hex.Encode(hexSum[:], sum[:])
	return string(hexSum[:]) == key
}

const (
	journalName  = "journal"
	recordSuffix = ".json" // records of earlier versions, one file each
	tempPrefix   = ".tmp-"
)

// compactMin is the fewest dead lines that make the journal worth rewriting (a variable for
// the crash test, which rewrites often).
var compactMin = 1024

const (
	opPut    = 'P'
	opDelete = 'D'
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// The checksums of a line's op alone, which every line's checksum starts from.
var (
	putChecksum    = crc32.Checksum([]byte{opPut}, castagnoli)
	deleteChecksum = crc32.Checksum([]byte{opDelete}, castagnoli)
)

func opChecksum(op byte) uint32 {
	if op == opPut {
		return putChecksum
	}
	return deleteChecksum
}

// Store is the journal of records of one state dir. Its methods are safe for concurrent use.
// One process uses a state dir at a time (the plugin's DaemonSet runs one pod per node).
type Store struct {
	dir string
	c   codec

	// syncMu serialises fdatasync and rewrites, and is taken before mu.
	syncMu sync.Mutex

	mu sync.Mutex
	// f is the journal, open for reading the live lines back and for appending.
	f       *os.File
	size    int64             // bytes in the journal
	synced  int64             // bytes known to be on disk
	live    map[string]*entry // key -> the Put line that holds it
	dead    int               // lines that no longer hold a live record
	broken  error             // set when the journal can no longer be trusted in memory
	loadErr error             // what Open could not read, reported by List
	// converted counts the live records that Open found in an earlier version's encoding
	// (JSON) and re-encoded in memory: the journal is then rewritten.
	converted int
}

// entry is a live record: where its line lies in the journal, and the record decoded from it
// by Open (without its Attributes) until Index hands it out.
type entry struct {
	// off and n locate the line in the journal (n includes the newline).
	off int64
	n   int
	// line is set instead while the line is not yet in the journal: a record Open re-encoded
	// or took in from an earlier version, until the rewrite that Open then makes.
	line []byte
	rec  *Record
	// err is why Open could not decode the line (reported if the record is live at the end).
	err error
}

// Open opens (creating it if needed) the journal under stateDir, reads its records, takes in
// records of earlier versions, and removes temporary files that a crash during a rewrite left
// behind. Lines it cannot read are reported by List (the journal is copied aside first, for a
// person to inspect); the others are kept.
func Open(stateDir string) (*Store, error) {
	dir := filepath.Join(stateDir, "volumes")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	s := &Store{dir: dir, c: newCodec(stateDir), live: map[string]*entry{}}
	var legacy []string
	for _, e := range entries {
		name := e.Name()
		switch {
		case strings.HasPrefix(name, tempPrefix):
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				return nil, fmt.Errorf("state dir: removing interrupted write: %w", err)
			}
		case strings.HasSuffix(name, recordSuffix):
			legacy = append(legacy, name)
		}
	}
	f, err := os.OpenFile(s.journalPath(), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open state journal: %w", err)
	}
	s.f = f
	if err := s.load(legacy); err != nil {
		s.f.Close() // f, or the journal a rewrite replaced it by
		return nil, err
	}
	return s, nil
}

// load is Open once the journal is open (s.f).
func (s *Store) load(legacy []string) error {
	dir := s.dir
	size, good, torn, lineErrs, err := s.replay(s.f, false)
	if err != nil {
		return fmt.Errorf("read state journal: %w", err)
	}
	var errs []error
	if len(lineErrs) > 0 {
		aside := s.journalPath() + ".unreadable-" + strconv.FormatInt(time.Now().Unix(), 10)
		if err := copyFile(aside, s.f, size); err != nil {
			return fmt.Errorf("state journal has unreadable lines and cannot be copied aside: %w", err)
		}
		errs = append(errs, fmt.Errorf("state journal %s has unreadable lines (a copy is kept at %s): %w", s.journalPath(), aside, errors.Join(lineErrs...)))
	}
	var migrated []string
	for _, name := range legacy {
		r, err := readLegacy(filepath.Join(dir, name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if r.Key()+recordSuffix != name {
			errs = append(errs, fmt.Errorf("state record %s holds volume %q at %q, which belongs in another file", name, r.VolumeID, r.TargetPath))
			continue
		}
		migrated = append(migrated, name)
		if _, ok := s.live[r.Key()]; ok {
			continue // already taken into the journal by an earlier start
		}
		s.live[r.Key()] = &entry{line: s.encodePut(r), rec: r}
	}
	s.loadErr = errors.Join(errs...)
	// Rewritten now only when it must be (a torn tail, damage, records taken in): a journal
	// that is merely due for compaction gets it at the next change, not before the plugin
	// is ready.
	if torn || len(lineErrs) > 0 || len(migrated) > 0 || s.converted > 0 {
		if err := s.rewrite(); err != nil {
			return err
		}
		for _, name := range migrated {
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				return fmt.Errorf("state dir: removing a record taken into the journal: %w", err)
			}
		}
		return nil
	}
	s.size, s.synced = good, good
	if size == 0 {
		// A new journal: its directory entry must be durable before a record in it is.
		if err := syncDir(dir); err != nil {
			return err
		}
	}
	return nil
}

// copyFile writes the first size bytes of f to a new file at path.
func copyFile(path string, f *os.File, size int64) error {
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, io.NewSectionReader(f, 0, size))
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

func (s *Store) journalPath() string { return filepath.Join(s.dir, journalName) }

// replay applies the journal's lines in order, read from f's start through one buffer, and
// decodes each Put's record as it goes, copying what the record keeps out of the buffer.
// size is what it read; good is the length of the part made of whole, valid lines up to the
// last one; torn reports that something follows it (an append a crash interrupted). A bad
// line followed by good ones is not a torn append: it is reported.
//
// The surviving records are decoded (entry.rec), with their Attributes only if attributes is
// set.
func (s *Store) replay(f *os.File, attributes bool) (size, good int64, torn bool, errs []error, err error) {
	// The entries and records are carved out of blocks of many, and the map is sized for a
	// journal of records of about 1.5 KB.
	var block []entry
	var records []Record
	if fi, err := f.Stat(); err == nil && len(s.live) == 0 {
		s.live = make(map[string]*entry, fi.Size()/1536)
	}
	d := decoder{c: s.c, paths: map[string]string{}, interned: map[string]string{}, skipAttributes: !attributes, detach: true}
	buf := make([]byte, readBuffer)
	var base int64 // the journal offset of buf[0]
	start, end := 0, 0
	eof := false
	var pending []error
	lineNo := 0
	for {
		i := bytes.IndexByte(buf[start:end], '\n')
		if i < 0 {
			if eof {
				break
			}
			// Keep the start of a line the buffer cut, and read on (into a larger buffer if
			// that line fills this one).
			if start > 0 {
				copy(buf, buf[start:end])
				base += int64(start)
				end -= start
				start = 0
			}
			if end == len(buf) {
				larger := make([]byte, 2*len(buf))
				copy(larger, buf[:end])
				buf = larger
			}
			n, rerr := f.Read(buf[end:])
			end += n
			if errors.Is(rerr, io.EOF) {
				eof = true
			} else if rerr != nil {
				return 0, 0, false, nil, rerr
			}
			continue
		}
		lineNo++
		line := buf[start : start+i+1]
		off := base + int64(start)
		start += i + 1
		op, keyBytes, _, perr := parseLine(line)
		if perr != nil {
			pending = append(pending, fmt.Errorf("line %d: %w", lineNo, perr))
			continue
		}
		// Bad lines followed by a good one are damage, not a torn tail.
		errs = append(errs, pending...)
		pending = nil
		good = off + int64(len(line))
		key := unsafe.String(unsafe.SliceData(keyBytes), len(keyBytes)) // a slice of buf
		e, ok := s.live[key]
		if ok {
			s.dead++
		}
		if op == opDelete {
			delete(s.live, key)
			s.dead++
			continue
		}
		if !ok {
			if len(block) == 0 {
				block = make([]entry, 256)
			}
			e = &block[0]
			block = block[1:]
			s.live[d.join(key)] = e
		}
		if len(records) == 0 {
			records = make([]Record, 256)
		}
		rec := &records[0]
		records = records[1:]
		*e = entry{off: off, n: len(line)}
		current, derr := d.decodeBody(rec, key, line[bodyStart:len(line)-1])
		switch {
		case derr != nil:
			e.err = derr
		case !current:
			// An earlier version's encoding: re-encoded, for Open to rewrite the journal with.
			e.rec, e.line = rec, s.encodePut(rec)
		default:
			e.rec = rec
		}
	}
	size = base + int64(end)
	if end > start || len(pending) > 0 {
		torn = true // no newline, or no whole line after the last good one: an append cut short
	}
	for key, e := range s.live {
		switch {
		case e.err != nil:
			delete(s.live, key)
			errs = append(errs, e.err)
		case e.line != nil:
			s.converted++
		}
	}
	return size, good, torn, errs, nil
}

// readBuffer is the size of the buffer the journal is read through at Open: a line longer
// than it is read into a larger one.
const readBuffer = 64 << 10

// A journal line is "<op> <crc32c of the rest, 8 hex digits> <key> <body>\n": for a Put the
// body is the record (encoding.go; neither encoding holds a raw newline), for a Delete it is
// empty.
func encodeLine(op byte, key string, body []byte) []byte {
	rest := make([]byte, 0, len(key)+1+len(body))
	rest = append(rest, key...)
	rest = append(rest, ' ')
	rest = append(rest, body...)
	line := make([]byte, 0, 11+len(rest)+1)
	line = append(line, op, ' ')
	line = fmt.Appendf(line, "%08x", crc32.Update(crc32.Checksum([]byte{op}, castagnoli), castagnoli, rest))
	line = append(line, ' ')
	line = append(line, rest...)
	return append(line, '\n')
}

func (s *Store) encodePut(r *Record) []byte {
	return encodeLine(opPut, r.Key(), s.c.encodeCompact(r))
}

// newCodec returns the codec of the records of stateDir.
func newCodec(stateDir string) codec {
	base := filepath.Clean(stateDir)
	if !filepath.IsAbs(base) || base == "/" {
		// Paths are then written in full.
		base = ""
	}
	return codec{base: base, overlays: OverlaysDir(base) + "/"}
}

// bodyStart is where a line's body starts: after "<op> <crc> <key> ".
const bodyStart = 11 + 64 + 1

// parseLine checks a journal line and returns its parts; key and body are slices of line.
func parseLine(line []byte) (op byte, key, body []byte, err error) {
	line = bytes.TrimSuffix(line, []byte("\n"))
	if len(line) < bodyStart || line[1] != ' ' || line[10] != ' ' || (line[0] != opPut && line[0] != opDelete) {
		return 0, nil, nil, errors.New("not a journal line")
	}
	op = line[0]
	sum, ok := parseHex32(line[2:10])
	if !ok {
		return 0, nil, nil, errors.New("not a journal line")
	}
	rest := line[11:]
	if crc32.Update(opChecksum(op), castagnoli, rest) != sum {
		return 0, nil, nil, errors.New("checksum mismatch")
	}
	if rest[64] != ' ' {
		return 0, nil, nil, errors.New("not a journal line")
	}
	return op, rest[:64], rest[65:], nil
}

// parseHex32 parses the 8 hex digits of a line's checksum.
func parseHex32(b []byte) (uint32, bool) {
	var v uint32
	for _, ch := range b {
		switch {
		case '0' <= ch && ch <= '9':
			ch -= '0'
		case 'a' <= ch && ch <= 'f':
			ch -= 'a' - 10
		case 'A' <= ch && ch <= 'F':
			ch -= 'A' - 10
		default:
			return 0, false
		}
		v = v<<4 | uint32(ch)
	}
	return v, len(b) == 8
}

// journalChanged reports a line that no longer reads back as what the Store wrote or read.
var errJournalChanged = errors.New("state journal changed on disk under the node plugin (another process wrote it?); restart the node plugin")

// checkStored checks that line, read back from the journal at off, is the Put of key.
func checkStored(line []byte, key string, off int64) error {
	op, k, _, err := parseLine(line)
	if err == nil && (op != opPut || string(k) != key || line[len(line)-1] != '\n') {
		err = errors.New("another line")
	}
	if err != nil {
		return fmt.Errorf("%w: the record %s at offset %d: %v", errJournalChanged, key, off, err)
	}
	return nil
}

// readLine returns e's line (key's), read back from the journal into a buffer of its own if
// it is not held in memory. Called with s.mu held.
func (s *Store) readLine(key string, e *entry) ([]byte, error) {
	if e.line != nil {
		return e.line, nil
	}
	if s.f == nil {
		return nil, errors.New("state journal closed")
	}
	line := make([]byte, e.n)
	if _, err := s.f.ReadAt(line, e.off); err != nil {
		return nil, fmt.Errorf("%w: the record %s at offset %d: %v", errJournalChanged, key, e.off, err)
	}
	if err := checkStored(line, key, e.off); err != nil {
		return nil, err
	}
	return line, nil
}

// lineReader reads the lines of live records back from a journal in the order they lie in
// it, through one buffer (a rewrite).
type lineReader struct {
	f   *os.File
	buf []byte
	at  int64 // the journal offset of buf[0]
	n   int   // bytes read into buf
}

// line returns key's line at off, n bytes long: a slice of the buffer, valid until the next
// call.
func (r *lineReader) line(key string, off int64, n int) ([]byte, error) {
	if off < r.at || off+int64(n) > r.at+int64(r.n) {
		if len(r.buf) < n {
			r.buf = make([]byte, max(n, readBuffer))
		}
		m, err := r.f.ReadAt(r.buf, off)
		if m < n {
			return nil, fmt.Errorf("%w: the record %s at offset %d: %v", errJournalChanged, key, off, err)
		}
		r.at, r.n = off, m
	}
	line := r.buf[off-r.at : off-r.at+int64(n)]
	if err := checkStored(line, key, off); err != nil {
		return nil, err
	}
	return line, nil
}

func (c codec) decodePut(key string, line []byte) (*Record, error) {
	_, _, body, err := parseLine(line)
	if err != nil {
		return nil, err
	}
	d := decoder{c: c}
	r := new(Record)
	if _, err := d.decodeBody(r, key, body); err != nil {
		return nil, err
	}
	return r, nil
}

// decodeBody decodes the body of a checked Put line whose key is key into r; current is false
// when it is in an earlier version's encoding.
func (d *decoder) decodeBody(r *Record, key string, body []byte) (current bool, _ error) {
	current, err := d.decode(r, key, body)
	if err != nil {
		return false, fmt.Errorf("state record %s is corrupt: %w", key, err)
	}
	if !d.keyMatches(key, r.VolumeID, r.TargetPath) {
		return false, fmt.Errorf("state record %s holds volume %q at %q, which has another key", key, r.VolumeID, r.TargetPath)
	}
	if d.detach {
		d.detachFrom(r, body)
	}
	return current, nil
}

func readLegacy(path string) (*Record, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read state record: %w", err)
	}
	var r Record
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("state record %s is corrupt: %w", path, err)
	}
	return &r, nil
}

// rewrite replaces the journal by one holding the live records only, in the order they had:
// their lines read back from the journal (or from memory, for those not in it yet), written
// to a temporary file, synced, renamed over the journal, and the directory synced. Called with
// s.mu held (or before s is shared). A line that no longer reads back as it was written
// leaves the Store broken (see errJournalChanged) and the journal as it was.
func (s *Store) rewrite() error {
	type live struct {
		key string
		e   *entry
	}
	lines := make([]live, 0, len(s.live))
	for k, e := range s.live {
		lines = append(lines, live{k, e})
	}
	slices.SortFunc(lines, func(a, b live) int {
		// Those in memory last, in no particular order.
		if (a.e.line == nil) != (b.e.line == nil) {
			if a.e.line == nil {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.e.off, b.e.off)
	})
	f, err := os.CreateTemp(s.dir, tempPrefix)
	if err != nil {
		return fmt.Errorf("rewrite state journal: %w", err)
	}
	tmp := f.Name()
	w := bufio.NewWriterSize(f, 1<<16)
	r := lineReader{f: s.f}
	offs := make([]int64, len(lines))
	var size int64
	for i, l := range lines {
		line := l.e.line
		if line == nil {
			if line, err = r.line(l.key, l.e.off, l.e.n); err != nil {
				s.broken = err
				break
			}
		}
		offs[i] = size
		n, _ := w.Write(line)
		size += int64(n)
	}
	if err == nil {
		err = w.Flush()
	}
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = os.Rename(tmp, s.journalPath())
	}
	if err == nil {
		err = syncDir(s.dir)
	}
	if err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("rewrite state journal: %w", err)
	}
	// The descriptor stays valid across the rename; appends need O_APPEND.
	f.Close()
	nf, err := os.OpenFile(s.journalPath(), os.O_RDWR|os.O_APPEND, 0o600)
	if err != nil {
		// The lines are in the new journal, which this Store can no longer reach.
		s.broken = fmt.Errorf("state journal unusable after a rewrite (%v); restart the node plugin", err)
		return fmt.Errorf("reopen state journal: %w", err)
	}
	for i, l := range lines {
		l.e.off = offs[i]
		if l.e.line != nil {
			l.e.n, l.e.line = len(l.e.line), nil
		}
	}
	if s.f != nil {
		s.f.Close()
	}
	s.f, s.size, s.synced, s.dead = nf, size, size, 0
	return nil
}

// Dir returns the record directory.
func (s *Store) Dir() string { return s.dir }

// append adds a line to the journal and applies it to the live set, and returns the journal
// length that must be on disk for the line to be.
func (s *Store) append(op byte, key string, line []byte) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken != nil {
		return 0, s.broken
	}
	if op == opDelete {
		if _, ok := s.live[key]; !ok {
			return 0, nil
		}
	}
	off := s.size
	if _, err := s.f.Write(line); err != nil {
		// Take back a partial line so that the next one starts clean.
		if terr := s.f.Truncate(s.size); terr != nil {
			s.broken = fmt.Errorf("state journal unusable after a failed write (%v); restart the node plugin", err)
		}
		return 0, fmt.Errorf("write state journal: %w", err)
	}
	s.size += int64(len(line))
	if _, ok := s.live[key]; ok {
		s.dead++
	}
	if op == opPut {
		s.live[key] = &entry{off: off, n: len(line)}
	} else {
		delete(s.live, key)
		s.dead++
	}
	return s.size, nil
}

// compact rewrites the journal when it holds more dead lines than live ones (and at least
// compactMin). A failed rewrite leaves the journal as it was, to be tried again later.
func (s *Store) compact() {
	s.mu.Lock()
	due := s.broken == nil && s.dead >= compactMin && s.dead > len(s.live)
	s.mu.Unlock()
	if !due {
		return // without waiting for a sync in progress: a Delete never waits for the disk
	}
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken == nil && s.dead >= compactMin && s.dead > len(s.live) {
		_ = s.rewrite()
	}
}

// syncTo returns once the journal's first end bytes are on disk. Concurrent callers share one
// fdatasync: whoever syncs covers everything appended before it started.
func (s *Store) syncTo(end int64) error {
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	s.mu.Lock()
	f, size, synced, broken := s.f, s.size, s.synced, s.broken
	s.mu.Unlock()
	if synced >= end {
		return nil
	}
	if broken != nil {
		return broken
	}
	// The rewrite that could replace f waits for syncMu, so f stays open meanwhile.
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		// After a failed sync the page cache cannot be trusted to reach the disk.
		s.mu.Lock()
		s.broken = fmt.Errorf("state journal unusable after a failed sync (%v); restart the node plugin", err)
		s.mu.Unlock()
		return fmt.Errorf("sync state journal: %w", err)
	}
	s.mu.Lock()
	s.synced = max(s.synced, size)
	s.mu.Unlock()
	return nil
}

// Put records r durably: it returns once the record is on disk.
func (s *Store) Put(r *Record) error {
	end, err := s.append(opPut, r.Key(), s.encodePut(r))
	if err != nil {
		return fmt.Errorf("write state record for volume %q: %w", r.VolumeID, err)
	}
	if err := s.syncTo(end); err != nil {
		return fmt.Errorf("write state record for volume %q: %w", r.VolumeID, err)
	}
	s.compact()
	return nil
}

// Get reads the record of a volume id and target; ok is false when there is none.
func (s *Store) Get(volumeID, targetPath string) (rec *Record, ok bool, err error) {
	key := Key(volumeID, targetPath)
	s.mu.Lock()
	e, ok := s.live[key]
	var line []byte
	if ok {
		line, err = s.readLine(key, e)
	}
	s.mu.Unlock()
	if !ok {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	r, err := s.c.decodePut(key, line)
	if err != nil {
		return nil, false, err
	}
	return r, true, nil
}

// Delete removes a record; a missing one is not an error. It does not wait for the disk (see
// the package documentation): the target it describes is unmounted already.
func (s *Store) Delete(key string) error {
	if _, err := s.append(opDelete, key, encodeLine(opDelete, key, nil)); err != nil {
		return fmt.Errorf("delete state record: %w", err)
	}
	s.compact()
	return nil
}

// Sync returns once every Delete so far is on disk.
func (s *Store) Sync() error {
	s.mu.Lock()
	end := s.size
	s.mu.Unlock()
	return s.syncTo(end)
}

// List returns every record. What Open could not read is reported in the error (and kept in a
// copy of the journal for a person to inspect); the other records are still returned.
func (s *Store) List() ([]*Record, error) {
	records, _, err := s.list(true)
	return records, err
}

// Index returns every record as List does, but without its Attributes (nil), which only
// diagnostics read (Get returns them): what start-up needs, the first time without decoding
// anything (Open decoded it). keys[i] is the key of records[i], checked against its volume
// id and target when it was read (what Record.HasKey would compute again).
func (s *Store) Index() (records []*Record, keys []string, err error) {
	return s.list(false)
}

func (s *Store) list(attributes bool) ([]*Record, []string, error) {
	s.mu.Lock()
	out := make([]*Record, 0, len(s.live))
	keys := make([]string, 0, len(s.live))
	var errs []error
	d := decoder{c: s.c, skipAttributes: !attributes}
	for key, e := range s.live {
		r := e.rec
		e.rec = nil // handed out (or not wanted): the next call decodes afresh
		if r == nil || attributes {
			line, err := s.readLine(key, e)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			r = new(Record)
			if _, err := d.decodeBody(r, key, line[bodyStart:len(line)-1]); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		out = append(out, r)
		keys = append(keys, key)
	}
	loadErr := s.loadErr
	s.mu.Unlock()
	return out, keys, errors.Join(append([]error{loadErr}, errs...)...)
}

// Close closes the journal.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		return nil
	}
	err := s.f.Close()
	s.f = nil
	if s.broken == nil {
		s.broken = errors.New("state journal closed")
	}
	return err
}

// Read returns the records of the journal under stateDir without changing anything on disk,
// for diagnostics and tests while a Store may have it open.
func Read(stateDir string) ([]*Record, error) {
	f, err := os.Open(filepath.Join(stateDir, "volumes", journalName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	s := &Store{c: newCodec(stateDir), live: map[string]*entry{}}
	_, _, _, errs, err := s.replay(f, true)
	if err != nil {
		return nil, err
	}
	out := make([]*Record, 0, len(s.live))
	for _, e := range s.live {
		out = append(out, e.rec)
	}
	return out, errors.Join(errs...)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync state dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync state dir: %w", err)
	}
	return nil
}

var _ io.Closer = (*Store)(nil)
