package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
	"unsafe"
)

// A Put line's body is the record in one of two encodings:
//
//   - compact (written by this version): "c1" and then the fields below, each followed by a
//     tab; a backslash, tab or newline inside a field is written as "\\", "\t" or "\n".
//     Decoding slices every field out of the line as read (no copy), so a start-up with
//     thousands of records spends a few allocations per record, not hundreds.
//   - JSON (written by earlier versions): an object starting with '{'. Open decodes it and
//     rewrites the journal in the compact encoding.
//
// Compact fields, in order: VolumeID, TargetPath, Kind, Type, HostDir, Source, OverlayDir,
// UpperDir, WorkDir, WritableLimit (decimal), WritableLayer, flags (letters: f TargetIsFile,
// e Ephemeral, r ReadOnly), Created (RFC 3339 with nanoseconds), Pod namespace, name and uid,
// the number of attributes and then each key and value (by key), the number of layers and
// then each dir and digest.
const compactMagic = "c1"

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

// encodeCompact returns the compact body of r.
func encodeCompact(r *Record) []byte {
	b := make([]byte, 0, 1024)
	b = append(b, compactMagic...)
	b = append(b, '\t')
	for _, s := range []string{r.VolumeID, r.TargetPath, r.Kind, r.Type, r.HostDir, r.Source, r.OverlayDir, r.UpperDir, r.WorkDir} {
		b = appendField(b, s)
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
		b = appendField(b, l.Dir)
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

// decodeRecord decodes a Put body in either encoding.
func decodeRecord(body []byte) (*Record, error) {
	var r Record
	if len(body) > 0 && body[0] == '{' {
		if err := json.Unmarshal(body, &r); err != nil {
			return nil, err
		}
		return &r, nil
	}
	// The fields are slices of the line itself, not a copy: a journal line is never changed
	// once written or read (Store keeps it as it is for rewrites).
	s := unsafe.String(unsafe.SliceData(body), len(body))
	f := fields{s: s, escaped: strings.IndexByte(s, '\\') >= 0}
	if f.next() != compactMagic {
		return nil, errors.New("unknown record encoding")
	}
	r.VolumeID, r.TargetPath, r.Kind, r.Type = f.next(), f.next(), f.next(), f.next()
	r.HostDir, r.Source = f.next(), f.next()
	r.OverlayDir, r.UpperDir, r.WorkDir = f.next(), f.next(), f.next()
	limit, err := strconv.ParseInt(f.next(), 10, 64)
	if err != nil {
		return nil, errCompact
	}
	r.WritableLimit = limit
	r.WritableLayer = f.next()
	for _, c := range f.next() {
		switch c {
		case 'f':
			r.TargetIsFile = true
		case 'e':
			r.Ephemeral = true
		case 'r':
			r.ReadOnly = true
		default:
			return nil, errCompact
		}
	}
	created := f.next()
	r.Pod.Namespace, r.Pod.Name, r.Pod.UID = f.next(), f.next(), f.next()
	if n := f.count(); n > 0 {
		r.Attributes = make(map[string]string, n)
		for range n {
			k := f.next()
			r.Attributes[k] = f.next()
		}
	}
	if n := f.count(); n > 0 {
		r.Layers = make([]Layer, n)
		for i := range r.Layers {
			r.Layers[i].Dir, r.Layers[i].Digest = f.next(), f.next()
		}
	}
	if f.err != nil || f.s != "" {
		return nil, errCompact
	}
	if r.Created, err = time.Parse(time.RFC3339Nano, created); err != nil {
		return nil, fmt.Errorf("%w: created: %v", errCompact, err)
	}
	return &r, nil
}
