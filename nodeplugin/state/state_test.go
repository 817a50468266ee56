package state

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestStoreRoundTrip(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := &Record{
		VolumeID:   "csi-abc",
		TargetPath: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/v/mount",
		Kind:       "library",
		Type:       "library",
		Attributes: map[string]string{"type": "library"},
		Layers:     []Layer{{Dir: "/cache/a", Digest: "sha256:aa"}},
		OverlayDir: "/state/overlays/k",
		UpperDir:   "/state/overlays/k/upper",
		WorkDir:    "/state/overlays/k/work",
		Pod:        Pod{Namespace: "ns", Name: "p", UID: "u"},
		Ephemeral:  true,
		Created:    time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC),
	}
	if err := s.Put(r); err != nil {
		t.Fatal(err)
	}
	got, ok, err := s.Get(r.VolumeID, r.TargetPath)
	if err != nil || !ok {
		t.Fatalf("Get: %v %v", ok, err)
	}
	if !reflect.DeepEqual(got, r) {
		t.Fatalf("Get = %+v, want %+v", got, r)
	}
	if _, ok, _ := s.Get(r.VolumeID, "/other"); ok {
		t.Fatal("a record of another target was found")
	}

	// Overwrite: still one record.
	r.ReadOnly = true
	if err := s.Put(r); err != nil {
		t.Fatal(err)
	}
	list, err := s.List()
	if err != nil || len(list) != 1 || !list[0].ReadOnly {
		t.Fatalf("List = %+v, %v", list, err)
	}
	if err := s.Delete(r.Key()); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(r.Key()); err != nil {
		t.Fatalf("deleting a missing record: %v", err)
	}
	if list, _ := s.List(); len(list) != 0 {
		t.Fatalf("List after Delete = %+v", list)
	}
}

func TestStoreKeepsNoTemporaryFiles(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if err := s.Put(&Record{VolumeID: "v", TargetPath: "/t", Created: time.Unix(int64(i), 0)}); err != nil {
			t.Fatal(err)
		}
	}
	entries, _ := os.ReadDir(s.Dir())
	if len(entries) != 1 {
		t.Fatalf("want exactly one file after repeated writes, got %d", len(entries))
	}
	// A crash between CreateTemp and Rename leaves a temporary file: Open removes it.
	if err := os.WriteFile(filepath.Join(s.Dir(), tempPrefix+"123"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.Dir(), tempPrefix+"123")); !os.IsNotExist(err) {
		t.Fatalf("interrupted write not cleaned up: %v", err)
	}
}

func TestStoreListReportsCorruptRecords(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Put(&Record{VolumeID: "good", TargetPath: "/t"}); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(s.Dir(), "deadbeef.json")
	if err := os.WriteFile(bad, []byte("not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	moved := filepath.Join(s.Dir(), "cafe.json")
	if err := os.WriteFile(moved, []byte(`{"volumeID":"x","targetPath":"/y"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	// Records are read when the store is opened.
	s, err = Open(filepath.Dir(s.Dir()))
	if err != nil {
		t.Fatal(err)
	}
	list, err := s.List()
	if len(list) != 1 || list[0].VolumeID != "good" {
		t.Fatalf("List = %+v, want the good record", list)
	}
	if err == nil || !strings.Contains(err.Error(), "corrupt") || !strings.Contains(err.Error(), "another file") {
		t.Fatalf("List error = %v, want both bad files reported", err)
	}
	if _, statErr := os.Stat(bad); statErr != nil {
		t.Fatal("a corrupt record must be left for inspection")
	}
}

func TestKeyDistinguishesTargets(t *testing.T) {
	if Key("v", "/a") == Key("v", "/b") || Key("v", "/a") == Key("w", "/a") {
		t.Fatal("keys collide")
	}
}

// TestOpenTakesInRecordsOfEarlierVersions: one JSON file per record, as earlier versions
// wrote them, is read into the journal and then removed; a damaged one is reported and left.
func TestOpenTakesInRecordsOfEarlierVersions(t *testing.T) {
	stateDir := t.TempDir()
	dir := filepath.Join(stateDir, "volumes")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	old := &Record{VolumeID: "old", TargetPath: "/t", Kind: "hostdir", Created: time.Unix(5, 0).UTC()}
	data, _ := json.Marshal(old)
	if err := os.WriteFile(filepath.Join(dir, old.Key()+recordSuffix), data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "deadbeef.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.List(); err == nil || !strings.Contains(err.Error(), "deadbeef.json") {
		t.Fatalf("List error = %v, want the damaged file reported", err)
	}
	back, err := Read(stateDir)
	if err != nil || len(back) != 1 || !reflect.DeepEqual(back[0], old) {
		t.Fatalf("journal holds %+v, %v; want the old record", back, err)
	}
	if _, err := os.Stat(filepath.Join(dir, old.Key()+recordSuffix)); !os.IsNotExist(err) {
		t.Fatalf("the old record file is still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "deadbeef.json")); err != nil {
		t.Fatalf("the damaged file was not left for inspection: %v", err)
	}
}

// TestHasKeyAgreesWithKey: HasKey accepts a record's own key only, for ids and targets of
// any length (longer ones than its buffer too).
func TestHasKeyAgreesWithKey(t *testing.T) {
	long := "/var/lib/kubelet/pods/" + strings.Repeat("u", 300) + "/volumes/kubernetes.io~csi/v/mount"
	for _, r := range []*Record{{VolumeID: "v", TargetPath: "/t"}, {VolumeID: "v", TargetPath: long}, {}} {
		if !r.HasKey(r.Key()) {
			t.Fatalf("HasKey(Key()) is false for %+v", r)
		}
		other := *r
		other.TargetPath += "x"
		if r.HasKey(other.Key()) || r.HasKey("") || r.HasKey(r.Key()[:63]) {
			t.Fatalf("HasKey accepts a key that is not the record's: %+v", r)
		}
	}
}
