package state

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fullRecord sets every field, with the characters the compact encoding escapes.
func fullRecord() *Record {
	return &Record{
		VolumeID:      "csi-a\tb",
		TargetPath:    "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/v/mount",
		Kind:          "library",
		Type:          "library",
		Attributes:    map[string]string{"type": "library", "odd\\key": "line\none\ttab\\", "empty": ""},
		HostDir:       "sockets",
		Source:        "/host/src",
		Layers:        []Layer{{Dir: "/cache/a", Digest: "sha256:aa"}, {Dir: "/cache/generated"}},
		OverlayDir:    "/state/overlays/k",
		UpperDir:      "/state/overlays/k/upper",
		WorkDir:       "/state/overlays/k/work",
		WritableLimit: 256 << 20,
		WritableLayer: "project-quota",
		TargetIsFile:  true,
		Pod:           Pod{Namespace: "ns", Name: "p", UID: "u"},
		Ephemeral:     true,
		ReadOnly:      true,
		Created:       time.Date(2025, 1, 2, 3, 4, 5, 678, time.FixedZone("", 3600)),
	}
}

// TestCompactEncodingKeepsEveryField: a record written and read back in the compact
// encoding equals the original, escapes and empty fields included.
func TestCompactEncodingKeepsEveryField(t *testing.T) {
	c := newCodec("/state")
	own := &Record{VolumeID: "w", TargetPath: "/t/w", Layers: []Layer{{Dir: "/state/store/views/x/root", Digest: "sha256:x"}}}
	own.OverlayDir = "/state/overlays/" + own.Key()
	own.UpperDir, own.WorkDir = own.OverlayDir+"/upper", own.OverlayDir+"/work"
	odd := &Record{VolumeID: "o", TargetPath: "/t/o", Source: "=not/a/path", Layers: []Layer{{Dir: "==x"}, {Dir: "/state"}, {Dir: "/statefoo/x"}}}
	for _, r := range []*Record{fullRecord(), {VolumeID: "v", TargetPath: "/t"}, own, odd} {
		body := c.encodeCompact(r)
		if bytes.IndexByte(body, '\n') >= 0 {
			t.Fatalf("compact body holds a raw newline: %q", body)
		}
		if bytes.Contains(body, []byte("/state/")) {
			t.Errorf("compact body %q spells out a path below the state dir", body)
		}
		got, current, err := c.decodeRecord(r.Key(), body, map[string]string{})
		if err != nil || !current {
			t.Fatalf("decode %q: %v (current %t)", body, err, current)
		}
		if !got.Created.Equal(r.Created) {
			t.Fatalf("created %v, want %v", got.Created, r.Created)
		}
		got.Created = r.Created
		if !reflect.DeepEqual(got, r) {
			t.Fatalf("decoded %+v\nwant    %+v", got, r)
		}
	}
}

// TestJournalOfFullPathRecordsIsRewrittenRelative: a journal the version before wrote (c1,
// every path in full) is read as it was and rewritten with paths relative to the state dir.
func TestJournalOfFullPathRecordsIsRewrittenRelative(t *testing.T) {
	stateDir := t.TempDir()
	dir := filepath.Join(stateDir, "volumes")
	r := scaleRecord(stateDir, 1)
	// The body as the version before wrote it: c2 without the state dir's base.
	v1 := bytes.Replace(codec{}.encodeCompact(r), []byte(compactMagic), []byte(compactMagicV1), 1)
	old := encodeLine(opPut, r.Key(), v1)
	s := openWithJournal(t, stateDir, old)
	list, err := s.List()
	if err != nil || len(list) != 1 {
		t.Fatalf("List = %+v, %v", list, err)
	}
	list[0].Created = r.Created
	if !reflect.DeepEqual(list[0], r) {
		t.Fatalf("record read from the c1 journal %+v\nwant %+v", list[0], r)
	}
	data, err := os.ReadFile(filepath.Join(dir, journalName))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(data, []byte(" "+compactMagic+"\t")) || len(data) >= len(old)*3/4 {
		t.Fatalf("journal after Open (%d bytes, was %d):\n%s\nwant one shorter c2 line", len(data), len(old), data)
	}
	readOnlyRecord(t, stateDir, r)
}

// TestCompactEncodingRefusesDamage: a body that is cut short, carries an unknown escape, an
// unknown flag or a count larger than what follows is an error, never a crash or a huge
// allocation.
func TestCompactEncodingRefusesDamage(t *testing.T) {
	c := newCodec("/state")
	good := string(c.encodeCompact(fullRecord()))
	for name, body := range map[string]string{
		"cut short":       good[:len(good)/2],
		"trailing field":  good + "x\t",
		"unknown escape":  strings.Replace(good, "csi-a\\tb", "csi-a\\qb", 1),
		"unknown flag":    strings.Replace(good, "\tfer\t", "\tfez\t", 1),
		"huge count":      strings.Replace(good, "\t3\t", "\t999999999\t", 1),
		"negative count":  strings.Replace(good, "\t3\t", "\t-1\t", 1),
		"unknown version": "c9" + good[2:],
	} {
		if body == good {
			t.Fatalf("%s: the damage did not apply", name)
		}
		if _, _, err := c.decodeRecord(fullRecord().Key(), []byte(body), nil); err == nil {
			t.Errorf("%s: decoded without an error", name)
		}
	}
}

// readOnlyRecord checks that Read of stateDir finds want (its creation time aside) and nothing
// else.
func readOnlyRecord(t *testing.T, stateDir string, want *Record) {
	t.Helper()
	back, err := Read(stateDir)
	if err != nil || len(back) != 1 {
		t.Fatalf("Read = %+v, %v", back, err)
	}
	back[0].Created = want.Created
	if !reflect.DeepEqual(back[0], want) {
		t.Fatalf("record after the rewrite %+v\nwant %+v", back[0], want)
	}
}

// openWithJournal opens the store in stateDir with journal as the journal an earlier run left.
// The store is closed when the test ends.
func openWithJournal(t *testing.T, stateDir string, journal []byte) *Store {
	t.Helper()
	dir := filepath.Join(stateDir, "volumes")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, journalName), journal, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestJournalOfJSONRecordsIsRewrittenCompact: a journal whose records an earlier version
// wrote as JSON is read, and rewritten by Open in the compact encoding with the same records.
func TestJournalOfJSONRecordsIsRewrittenCompact(t *testing.T) {
	stateDir := t.TempDir()
	dir := filepath.Join(stateDir, "volumes")
	a, b := fullRecord(), &Record{VolumeID: "b", TargetPath: "/t/b", Kind: "hostdir", Created: time.Unix(7, 0).UTC()}
	var journal []byte
	for _, r := range []*Record{a, b} {
		body, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		journal = append(journal, encodeLine(opPut, r.Key(), body)...)
	}
	journal = append(journal, encodeLine(opDelete, b.Key(), nil)...)
	s := openWithJournal(t, stateDir, journal)
	list, err := s.List()
	if err != nil || len(list) != 1 || list[0].VolumeID != a.VolumeID {
		t.Fatalf("List = %+v, %v; want record a", list, err)
	}
	data, err := os.ReadFile(filepath.Join(dir, journalName))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(data, []byte(" {")) || bytes.Count(data, []byte("\n")) != 1 {
		t.Fatalf("journal after Open:\n%s\nwant one compact line", data)
	}
	readOnlyRecord(t, stateDir, a)
}
