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

// previousVersionLine is the journal line the version before this one wrote for
// scaleRecord(<state dir>, 7): the same bytes are written and read now.
const previousVersionLine = "P e7a36a0a 6ebe12a66149df9776ecd8776a448333d21543172cee71e3396498b35f4fb1c9 c2\tcsi-pod-7\t/var/lib/kubelet/pods/pod-7-0123-4567-89ab-cdef01234567/volumes/kubernetes.io~csi/apm/mount\tlibrary\tlibrary\t\t\t\t\t\t268435456\ttmpfs\teo\t2026-01-02T03:04:05.000000678Z\tdefault\tpod-7\tpod-7-0123-4567-89ab-cdef01234567\t13\tcsi.storage.k8s.io/ephemeral\ttrue\tcsi.storage.k8s.io/pod.name\tpod-7\tcsi.storage.k8s.io/pod.namespace\tdefault\tcsi.storage.k8s.io/pod.uid\tpod-7-0123-4567-89ab-cdef01234567\tlibrary.0.image\tregistry.local:5000/datadog/apm-inject:1.0.0\tlibrary.0.source\t/opt/datadog-packages/datadog-apm-inject\tlibrary.0.target\topt/datadog-packages/datadog-apm-inject\tlibrary.1.image\tregistry.local:5000/datadog/dd-lib-python-init:1.0.0\tlibrary.1.target\topt/datadog/apm/library/python\tlibrary.2.image\tregistry.local:5000/datadog/dd-lib-js-init:1.0.0\tlibrary.2.target\topt/datadog/apm/library/js\tpreload\t/opt/datadog-packages/datadog-apm-inject/stable/inject/launcher.preload.so\ttype\tlibrary\t4\t=store/generated/86ee99a82746b0d1bcd5f879e5f81a11d8ebfa2e3454c21a2d1cf81fbd91a2d7/root\t\t=store/views/c914a152f7024fc971d364a43d7c732592bd7d4d821590cf6e4a517f1cdb506e/root\tsha256:c914a152f7024fc971d364a43d7c732592bd7d4d821590cf6e4a517f1cdb506e\t=store/views/ea994367cb7753e8b2e004710b4fdde04622b3a863686e58ac8b1acaf459d218/root\tsha256:ea994367cb7753e8b2e004710b4fdde04622b3a863686e58ac8b1acaf459d218\t=store/views/ef60d94951a7d1f1b9d1e6bbddf60d01ca838e8bfe15443ba49387c3111a4596/root\tsha256:ef60d94951a7d1f1b9d1e6bbddf60d01ca838e8bfe15443ba49387c3111a4596\t\n"

// TestJournalIsTheOnePreviousVersionsRead: this version writes a record in the very bytes the
// version before wrote, so either version reads the other's journal (an upgrade and a
// downgrade keep every record), and it reads that version's line back whole.
func TestJournalIsTheOnePreviousVersionsRead(t *testing.T) {
	for _, stateDir := range []string{"/var/lib/apm-csi", t.TempDir()} {
		c := newCodec(stateDir)
		r := scaleRecord(stateDir, 7)
		if got := string(encodeLine(opPut, r.Key(), c.encodeCompact(r))); got != previousVersionLine {
			t.Fatalf("state dir %s: this version writes\n%q\nthe version before wrote\n%q", stateDir, got, previousVersionLine)
		}
	}
	stateDir := t.TempDir()
	want := scaleRecord(stateDir, 7)
	s := openWithJournal(t, stateDir, []byte(previousVersionLine))
	got, ok, err := s.Get(want.VolumeID, want.TargetPath)
	if err != nil || !ok {
		t.Fatalf("Get = %v, %v", ok, err)
	}
	got.Created = want.Created
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("record of the version before read as %+v\nwant %+v", got, want)
	}
}

// TestIndexIsListWithoutAttributes: what start-up reads (Index) is every record exactly as
// List reads it, escapes, relative paths and own overlay dirs included, but for the
// attributes; Get and List still read those.
func TestIndexIsListWithoutAttributes(t *testing.T) {
	stateDir := t.TempDir()
	own := scaleRecord(stateDir, 1)
	odd := fullRecord() // escapes, overlay dirs elsewhere, every flag
	bare := &Record{VolumeID: "bare", TargetPath: "/t/bare", Created: time.Unix(9, 0).UTC()}
	want := map[string]*Record{}
	var journal []byte
	s := &Store{c: newCodec(stateDir)}
	for _, r := range []*Record{own, odd, bare} {
		want[r.Key()] = r
		journal = append(journal, s.encodePut(r)...)
	}
	st := openWithJournal(t, stateDir, journal)
	check := func(name string, list []*Record, err error, attributes bool) {
		t.Helper()
		if err != nil || len(list) != len(want) {
			t.Fatalf("%s = %d records, %v; want %d", name, len(list), err, len(want))
		}
		for _, got := range list {
			w := *want[got.Key()]
			if !attributes {
				w.Attributes = nil
			}
			g := *got
			if !g.Created.Equal(w.Created) {
				t.Fatalf("%s: created %v, want %v", name, g.Created, w.Created)
			}
			g.Created = w.Created
			if !reflect.DeepEqual(g, w) {
				t.Fatalf("%s: %+v\nwant %+v", name, g, w)
			}
		}
	}
	// The records Open decoded, then decoded afresh, then whole.
	checkKeys := func(name string, list []*Record, keys []string) {
		t.Helper()
		if len(keys) != len(list) {
			t.Fatalf("%s: %d keys for %d records", name, len(keys), len(list))
		}
		for i, r := range list {
			if keys[i] != r.Key() {
				t.Fatalf("%s: key %s given for the record of key %s", name, keys[i], r.Key())
			}
		}
	}
	list, keys, err := st.Index()
	check("first Index", list, err, false)
	checkKeys("first Index", list, keys)
	list, keys, err = st.Index()
	check("second Index", list, err, false)
	checkKeys("second Index", list, keys)
	list, err = st.List()
	check("List", list, err, true)
	got, ok, err := st.Get(odd.VolumeID, odd.TargetPath)
	if err != nil || !ok || !reflect.DeepEqual(got.Attributes, odd.Attributes) {
		t.Fatalf("Get = %+v, %t, %v; want the attributes %v", got, ok, err, odd.Attributes)
	}
}
