package state

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unsafe"
)

// A Put line's body is the record in one of three encodings:
//
//   - compact c2 (written by this version): "c2" and then the fields below, each followed
//     by a tab; a backslash, tab or newline inside a field is written as "\\", "\t" or
//     "\n". Decoding slices every field out of the line as read (no copy), and the
//     rest of a record out of blocks shared by many (decoder), so a start-up with thousands
//     of records spends no allocation per record, and skips the attributes. The paths
//     below the state dir are written relative to it, and the overlay dirs of a writable
//     volume (always <state-dir>/overlays/<key>/{upper,work}) not at all, so a record is
//     a third shorter and a start-up reads a third less.
//   - compact c1 (the version before): the same fields with every path written in full.
//     Open reads it and rewrites the journal in c2.
//   - JSON (earlier versions): an object starting with '{'. Open decodes it and rewrites
//     the journal in c2.
//
// Compact fields, in order: VolumeID, TargetPath, Kind, Type, HostDir, Source, OverlayDir,
// UpperDir, WorkDir, WritableLimit (decimal), WritableLayer, flags (letters: f TargetIsFile,
// e Ephemeral, r ReadOnly; in c2 also o: the overlay dirs are the state dir's for this
// record's key, and OverlayDir, UpperDir and WorkDir are empty), Created (RFC 3339 with
// nanoseconds), Pod namespace, name and uid, the number of attributes and then each key and
// value (by key), the number of layers and then each dir and digest.
//
// In c2 a path field (Source, OverlayDir, UpperDir, WorkDir, a layer's dir) that starts with
// "=" is relative to the state dir ("=store/views/x" is <state-dir>/store/views/x); a value
// that starts with "=" itself is written with one more "=".
const (
	compactMagic   = "c2"
	compactMagicV1 = "c1"
)

// OverlaysDir is the dir below the state dir that holds the writable volumes' overlay dirs,
// one per record key, each with an upper and a work dir.
func OverlaysDir(stateDir string) string { return filepath.Join(stateDir, "overlays") }

// codec encodes and decodes the compact bodies of the records of one state dir.
type codec struct {
	// base is the state dir, clean and absolute, without a trailing slash.
	base string
	// overlays is OverlaysDir(base) and a slash (set by newCodec).
	overlays string
}

// overlaysPrefix returns the overlays dir and a slash.
func (c codec) overlaysPrefix() string {
	if c.overlays != "" {
		return c.overlays
	}
	return OverlaysDir(c.base) + "/"
}

// ownOverlay reports whether r's overlay dirs are the state dir's for r's key.
func (c codec) ownOverlay(r *Record) bool {
	if r.OverlayDir == "" {
		return false
	}
	want := c.overlaysPrefix() + r.Key()
	return r.OverlayDir == want && r.UpperDir == want+"/upper" && r.WorkDir == want+"/work"
}

// appendPath appends a path field, relative to the state dir where it lies below it.
func (c codec) appendPath(b []byte, p string) []byte {
	if rel, ok := strings.CutPrefix(p, c.base+"/"); ok && c.base != "" && rel != "" {
		b = append(b, '=')
		return appendField(b, rel)
	}
	if strings.HasPrefix(p, "=") {
		b = append(b, '=')
	}
	return appendField(b, p)
}

// path decodes a path field. Paths below the state dir that repeat from record to record
// (the layers every pod of a workload shares) are made once per paths.
func (c codec) path(v string, paths map[string]string) string {
	switch {
	case strings.HasPrefix(v, "=="):
		return v[1:]
	case strings.HasPrefix(v, "="):
		if p, ok := paths[v]; ok {
			return p
		}
		p := c.base + "/" + v[1:]
		if paths != nil {
			paths[strings.Clone(v)] = p
		}
		return p
	}
	return v
}

// appendField appends s escaped and a tab.
func appendField(b []byte, s string) []byte {
	if !strings.ContainsAny(s, "\\\t\n") {
		b = append(b, s...)
		return append(b, '\t')
	}
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			b = append(b, '\\', '\\')
		case '\t':
			b = append(b, '\\', 't')
		case '\n':
			b = append(b, '\\', 'n')
		default:
			b = append(b, s[i])
		}
	}
	return append(b, '\t')
}

// encodeCompact returns the c2 body of r.
func (c codec) encodeCompact(r *Record) []byte {
	b := make([]byte, 0, 1024)
	b = append(b, compactMagic...)
	b = append(b, '\t')
	own := c.ownOverlay(r)
	for _, s := range []string{r.VolumeID, r.TargetPath, r.Kind, r.Type, r.HostDir} {
		b = appendField(b, s)
	}
	b = c.appendPath(b, r.Source)
	if own {
		b = append(b, "\t\t\t"...)
	} else {
		for _, s := range []string{r.OverlayDir, r.UpperDir, r.WorkDir} {
			b = c.appendPath(b, s)
		}
	}
	b = strconv.AppendInt(b, r.WritableLimit, 10)
	b = append(b, '\t')
	b = appendField(b, r.WritableLayer)
	if r.TargetIsFile {
		b = append(b, 'f')
	}
	if r.Ephemeral {
		b = append(b, 'e')
	}
	if r.ReadOnly {
		b = append(b, 'r')
	}
	if own {
		b = append(b, 'o')
	}
	b = append(b, '\t')
	b = r.Created.AppendFormat(b, time.RFC3339Nano)
	b = append(b, '\t')
	b = appendField(b, r.Pod.Namespace)
	b = appendField(b, r.Pod.Name)
	b = appendField(b, r.Pod.UID)
	keys := make([]string, 0, len(r.Attributes))
	for k := range r.Attributes {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	b = strconv.AppendInt(b, int64(len(keys)), 10)
	b = append(b, '\t')
	for _, k := range keys {
		b = appendField(b, k)
		b = appendField(b, r.Attributes[k])
	}
	b = strconv.AppendInt(b, int64(len(r.Layers)), 10)
	b = append(b, '\t')
	for _, l := range r.Layers {
		b = c.appendPath(b, l.Dir)
		b = appendField(b, l.Digest)
	}
	return b
}

var errCompact = errors.New("malformed compact record")

// fields walks the tab-terminated fields of a compact body.
type fields struct {
	s       string
	escaped bool // some field holds an escape: unescape each one
	err     error
}

func (f *fields) next() string {
	if f.err != nil {
		return ""
	}
	i := strings.IndexByte(f.s, '\t')
	if i < 0 {
		f.err = errCompact
		return ""
	}
	v := f.s[:i]
	f.s = f.s[i+1:]
	if f.escaped && strings.IndexByte(v, '\\') >= 0 {
		var b strings.Builder
		for j := 0; j < len(v); j++ {
			if v[j] != '\\' {
				b.WriteByte(v[j])
				continue
			}
			if j++; j == len(v) {
				f.err = errCompact
				return ""
			}
			switch v[j] {
			case '\\':
				b.WriteByte('\\')
			case 't':
				b.WriteByte('\t')
			case 'n':
				b.WriteByte('\n')
			default:
				f.err = errCompact
				return ""
			}
		}
		v = b.String()
	}
	return v
}

// skip passes over a field, checking its escapes as next does.
func (f *fields) skip() {
	if f.err != nil {
		return
	}
	i := strings.IndexByte(f.s, '\t')
	if i < 0 {
		f.err = errCompact
		return
	}
	v := f.s[:i]
	f.s = f.s[i+1:]
	for f.escaped {
		j := strings.IndexByte(v, '\\')
		if j < 0 {
			break
		}
		if j+1 == len(v) || (v[j+1] != '\\' && v[j+1] != 't' && v[j+1] != 'n') {
			f.err = errCompact
			return
		}
		v = v[j+2:]
	}
}

// skipN passes over n fields, checking their escapes as next does.
func (f *fields) skipN(n int) {
	if f.escaped {
		for range n {
			f.skip()
		}
		return
	}
	if f.err != nil || n <= 0 {
		return
	}
	// No escape anywhere: the n-th tab ends them (a byte loop: the fields are short, too
	// short for IndexByte's start-up cost to pay).
	s := f.s
	for i := 0; i < len(s); i++ {
		if s[i] == '\t' {
			if n--; n == 0 {
				f.s = s[i+1:]
				return
			}
		}
	}
	f.err = errCompact
}

func (f *fields) count() int {
	n, err := strconv.Atoi(f.next())
	if f.err == nil && (err != nil || n < 0 || n > len(f.s)) {
		// Every entry takes at least two bytes of what follows: a larger count is damage.
		f.err = errCompact
	}
	if f.err != nil {
		return 0
	}
	return n
}

// decodeRecord decodes a Put body in any of the encodings; current is false for one that
// Open rewrites (c1, JSON).
// key is the line's (checked against the record by the caller); paths, when not nil, keeps
// the paths decoded so far for the next records.
func (c codec) decodeRecord(key string, body []byte, paths map[string]string) (_ *Record, current bool, _ error) {
	d := decoder{c: c, paths: paths}
	r := new(Record)
	current, err := d.decode(r, key, body)
	if err != nil {
		return nil, false, err
	}
	return r, current, nil
}

// decoder decodes the records of one journal, one after the other, into records the caller
// provides. What a record holds beyond slices of its line (its layers, the string of its own
// overlay dirs) is carved out of blocks the decoder allocates for many records at once, so a
// start-up with thousands of records makes a few allocations per block, not several per
// record: a part of a block once handed out is never written again.
type decoder struct {
	c codec
	// paths, when not nil, keeps the paths below the state dir decoded so far.
	paths map[string]string
	// layers and text are the unused rest of the current blocks.
	layers []Layer
	text   []byte
	// skipAttributes leaves Attributes nil in a record of the current encoding (start-up
	// needs none; Store.Get reads them). A record in an earlier encoding is decoded whole,
	// to be written again in the current one.
	skipAttributes bool
	// keyBuf holds what a record's key is the hash of, while checking it.
	keyBuf []byte
	// detach is set when the body decoded is a buffer that is used again (Open reads the
	// journal through one): what the record keeps of it is copied into the text blocks, the
	// values that repeat from record to record (kind, type, namespace, digests) once per
	// interned.
	detach   bool
	interned map[string]string
}

// Block sizes: a block serves about 64 records of the usual shape.
const (
	layerBlock = 256
	textBlock  = 16 << 10
)

// takeLayers returns a slice of n layers that no other record shares (its capacity is n, so
// an append copies it).
func (d *decoder) takeLayers(n int) []Layer {
	if d.paths == nil || n > layerBlock/4 {
		return make([]Layer, n)
	}
	if cap(d.layers)-len(d.layers) < n {
		d.layers = make([]Layer, 0, layerBlock)
	}
	i := len(d.layers)
	d.layers = d.layers[:i+n]
	return d.layers[i : i+n : i+n]
}

// join returns the parts joined, as a string carved out of the current text block.
func (d *decoder) join(parts ...string) string {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if d.paths == nil || n > textBlock/4 {
		if len(parts) == 1 {
			return strings.Clone(parts[0]) // a copy (Join returns a single part as it is)
		}
		return strings.Join(parts, "")
	}
	if cap(d.text)-len(d.text) < n {
		d.text = make([]byte, 0, textBlock)
	}
	i := len(d.text)
	for _, p := range parts {
		d.text = append(d.text, p...)
	}
	return unsafe.String(&d.text[i], n)
}

// keyMatches reports whether key is the key of the record of volumeID at targetPath, without
// allocating.
func (d *decoder) keyMatches(key, volumeID, targetPath string) bool {
	d.keyBuf = append(append(append(d.keyBuf[:0], volumeID...), 0), targetPath...)
	sum := sha256.Sum256(d.keyBuf)
	var want [2 * sha256.Size]byte
	hex.Encode(want[:], sum[:])
	return string(want[:]) == key
}

// decode decodes a Put body in any of the encodings into r (zero on entry); current is false
// for one that Open rewrites (c1, JSON). key is the line's (checked against the record by the
// caller).
func (d *decoder) decode(r *Record, key string, body []byte) (current bool, _ error) {
	c := d.c
	if len(body) > 0 && body[0] == '{' {
		if err := json.Unmarshal(body, r); err != nil {
			return false, err
		}
		return false, nil
	}
	// The fields are slices of the line itself, not a copy: a journal line is never changed
	// once written or read (Store keeps it as it is for rewrites).
	s := unsafe.String(unsafe.SliceData(body), len(body))
	f := fields{s: s, escaped: strings.IndexByte(s, '\\') >= 0}
	relative := false
	switch f.next() {
	case compactMagic:
		current, relative = true, true
	case compactMagicV1:
	default:
		return false, errors.New("unknown record encoding")
	}
	path := func(v string) string {
		if !relative {
			return v
		}
		return c.path(v, d.paths)
	}
	r.VolumeID, r.TargetPath, r.Kind, r.Type = f.next(), f.next(), f.next(), f.next()
	r.HostDir, r.Source = f.next(), path(f.next())
	r.OverlayDir, r.UpperDir, r.WorkDir = path(f.next()), path(f.next()), path(f.next())
	limit, err := strconv.ParseInt(f.next(), 10, 64)
	if err != nil {
		return false, errCompact
	}
	r.WritableLimit = limit
	r.WritableLayer = f.next()
	own := false
	for _, ch := range f.next() {
		switch {
		case ch == 'f':
			r.TargetIsFile = true
		case ch == 'e':
			r.Ephemeral = true
		case ch == 'r':
			r.ReadOnly = true
		case ch == 'o' && current:
			own = true
		default:
			return false, errCompact
		}
	}
	created := f.next()
	r.Pod.Namespace, r.Pod.Name, r.Pod.UID = f.next(), f.next(), f.next()
	if n := f.count(); n > 0 && d.skipAttributes && current {
		f.skipN(2 * n)
	} else if n > 0 {
		r.Attributes = make(map[string]string, n)
		for range n {
			k := f.next()
			r.Attributes[k] = f.next()
		}
	}
	if n := f.count(); n > 0 {
		r.Layers = d.takeLayers(n)
		for i := range r.Layers {
			r.Layers[i].Dir, r.Layers[i].Digest = path(f.next()), f.next()
		}
	}
	if f.err != nil || f.s != "" {
		return false, errCompact
	}
	if own {
		if r.OverlayDir != "" || r.UpperDir != "" || r.WorkDir != "" {
			return false, errCompact
		}
		// One string holds all three: <dir>/upper<dir>/work.
		prefix := c.overlaysPrefix()
		both := d.join(prefix, key, "/upper", prefix, key, "/work")
		dir := len(prefix) + len(key)
		r.OverlayDir, r.UpperDir, r.WorkDir = both[:dir], both[:dir+len("/upper")], both[dir+len("/upper"):]
	}
	if r.Created, err = time.Parse(time.RFC3339Nano, created); err != nil {
		return false, fmt.Errorf("%w: created: %v", errCompact, err)
	}
	return current, nil
}

// detachFrom copies every string of r that is a slice of body (see decoder.detach): the
// fields before the attributes, which lie in the body's first few hundred bytes, are copied
// in one piece, the layers' digests and dirs are interned, and attributes copied one by one.
func (d *decoder) detachFrom(r *Record, body []byte) {
	if len(body) == 0 {
		return
	}
	lo := uintptr(unsafe.Pointer(unsafe.SliceData(body)))
	hi := lo + uintptr(len(body))
	offset := func(v string) (uintptr, bool) {
		p := uintptr(unsafe.Pointer(unsafe.StringData(v)))
		return p - lo, v != "" && p >= lo && p < hi
	}
	fields := [...]*string{
		&r.VolumeID, &r.TargetPath, &r.Kind, &r.Type, &r.HostDir, &r.Source,
		&r.OverlayDir, &r.UpperDir, &r.WorkDir, &r.WritableLayer,
		&r.Pod.Namespace, &r.Pod.Name, &r.Pod.UID,
	}
	var span uintptr
	for _, f := range fields {
		if off, ok := offset(*f); ok {
			span = max(span, off+uintptr(len(*f)))
		}
	}
	if span > 0 {
		c := d.join(unsafe.String(unsafe.SliceData(body), int(span)))
		for _, f := range fields {
			if off, ok := offset(*f); ok {
				*f = c[off : off+uintptr(len(*f))]
			}
		}
	}
	own := func(v string) string {
		if _, ok := offset(v); !ok {
			return v
		}
		return d.join(v)
	}
	intern := func(v string) string {
		if _, ok := offset(v); !ok {
			return v
		}
		if s, ok := d.interned[v]; ok {
			return s
		}
		s := d.join(v)
		if d.interned != nil {
			d.interned[s] = s
		}
		return s
	}
	for i := range r.Layers {
		r.Layers[i].Dir, r.Layers[i].Digest = intern(r.Layers[i].Dir), intern(r.Layers[i].Digest)
	}
	if len(r.Attributes) > 0 {
		attrs := make(map[string]string, len(r.Attributes))
		for k, v := range r.Attributes {
			attrs[own(k)] = own(v)
		}
		r.Attributes = attrs
	}
}
