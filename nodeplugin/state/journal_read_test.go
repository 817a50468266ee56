package state

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// bigRecord is crashRecord(i) with an attribute of size bytes.
func bigRecord(i, size int) *Record {
	r := crashRecord(i)
	r.Attributes["big"] = strings.Repeat(string(rune('a'+i%26)), size)
	return r
}

// byKey indexes records by key, failing on a duplicate.
func byKey(t *testing.T, list []*Record) map[string]*Record {
	t.Helper()
	out := map[string]*Record{}
	for _, r := range list {
		if _, dup := out[r.Key()]; dup {
			t.Fatalf("record %s twice", r.Key())
		}
		out[r.Key()] = r
	}
	return out
}

// sameRecords fails unless got holds exactly want's records, whole (attributes) or not.
func sameRecords(t *testing.T, what string, got []*Record, want map[string]*Record, attributes bool) {
	t.Helper()
	m := byKey(t, got)
	if len(m) != len(want) {
		t.Fatalf("%s: %d records, want %d", what, len(m), len(want))
	}
	for k, w := range want {
		g, ok := m[k]
		if !ok {
			t.Fatalf("%s: record %s (volume %s) missing", what, k, w.VolumeID)
		}
		w := *w
		if !attributes {
			w.Attributes = nil
		}
		if !reflect.DeepEqual(*g, w) {
			t.Fatalf("%s: record %s = %+v\nwant %+v", what, k, *g, w)
		}
	}
}

// TestOpenReadsAJournalLargerThanItsBuffer: Open reads the journal through a buffer of
// readBuffer bytes. A journal several times that size, whose lines fall across the buffer's
// boundaries, with Deletes and overwrites, and one line longer than the buffer, reads back
// exactly: every record Index gives, then List and Get, and Read from outside.
func TestOpenReadsAJournalLargerThanItsBuffer(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]*Record{}
	for i := range 300 {
		// Sizes that do not divide the buffer, so lines start at every kind of offset.
		r := bigRecord(i, 97*i%1500)
		if i == 150 {
			r = bigRecord(i, 3*readBuffer) // longer than the buffer
		}
		if err := s.Put(r); err != nil {
			t.Fatal(err)
		}
		want[r.Key()] = r
		if i%5 == 4 {
			gone := crashRecord(i - 2)
			if err := s.Delete(gone.Key()); err != nil {
				t.Fatal(err)
			}
			delete(want, gone.Key())
		}
		if i%7 == 6 {
			again := bigRecord(i-3, 211)
			if _, live := want[again.Key()]; live {
				if err := s.Put(again); err != nil {
					t.Fatal(err)
				}
				want[again.Key()] = again
			}
		}
	}
	s.Close()
	fi, err := os.Stat(filepath.Join(dir, "volumes", journalName))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() < 5*readBuffer {
		t.Fatalf("the journal is %d bytes: the test needs several buffers' worth", fi.Size())
	}

	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	index, keys, err := s.Index()
	if err != nil {
		t.Fatal(err)
	}
	sameRecords(t, "Index", index, want, false)
	for i, r := range index {
		if keys[i] != r.Key() {
			t.Fatalf("Index gives key %s for the record of key %s", keys[i], r.Key())
		}
	}
	list, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	sameRecords(t, "List", list, want, true)
	for _, w := range want {
		got, ok, err := s.Get(w.VolumeID, w.TargetPath)
		if err != nil || !ok || !reflect.DeepEqual(got, w) {
			t.Fatalf("Get(%s) = %+v, %t, %v; want %+v", w.VolumeID, got, ok, err, w)
		}
	}
	read, err := Read(dir)
	if err != nil {
		t.Fatal(err)
	}
	sameRecords(t, "Read", read, want, true)
}

// TestOpenDropsATornTailAcrossTheBuffer: the last line, longer than the buffer and so read in
// several parts, cut by a crash before, at and after a buffer boundary: Open keeps every whole
// line before it without reporting damage, and the next Put lands on a clean line.
func TestOpenDropsATornTailAcrossTheBuffer(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 40 {
		if err := s.Put(bigRecord(i, 1000+i)); err != nil {
			t.Fatal(err)
		}
	}
	last := bigRecord(40, 2*readBuffer)
	if err := s.Put(last); err != nil {
		t.Fatal(err)
	}
	s.Close()
	journal := filepath.Join(dir, "volumes", journalName)
	full, err := os.ReadFile(journal)
	if err != nil {
		t.Fatal(err)
	}
	lastStart := strings.LastIndexByte(strings.TrimSuffix(string(full), "\n"), '\n') + 1
	boundary := (lastStart/readBuffer + 1) * readBuffer
	for _, cut := range []int{lastStart + 1, boundary - 1, boundary, boundary + 1, boundary + readBuffer, len(full) - 1} {
		if err := os.WriteFile(journal, full[:cut], 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		got, err := s.List()
		if err != nil || len(got) != 40 {
			t.Fatalf("cut at %d (the last line spans %d to %d): %d records, %v; want the 40 whole ones and no error", cut, lastStart, len(full), len(got), err)
		}
		if err := s.Put(crashRecord(99)); err != nil {
			t.Fatal(err)
		}
		s.Close()
		back, err := Read(dir)
		if err != nil || len(back) != 41 {
			t.Fatalf("cut at %d: after a new Put, %d records, %v", cut, len(back), err)
		}
	}
}

// TestStoreReadsLinesBackAfterARewrite: after the journal is rewritten (compaction), the
// records are read back from where the rewrite put them.
func TestStoreReadsLinesBackAfterARewrite(t *testing.T) {
	old := compactMin
	compactMin = 8
	t.Cleanup(func() { compactMin = old })
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	want := map[string]*Record{}
	for i := range 200 {
		r := bigRecord(i, 50*(i%13))
		if err := s.Put(r); err != nil {
			t.Fatal(err)
		}
		want[r.Key()] = r
		if i%3 != 0 {
			if err := s.Delete(r.Key()); err != nil {
				t.Fatal(err)
			}
			delete(want, r.Key())
		}
	}
	data, err := os.ReadFile(filepath.Join(s.Dir(), journalName))
	if err != nil {
		t.Fatal(err)
	}
	if lines := strings.Count(string(data), "\n"); lines >= 200+133 {
		t.Fatalf("%d lines in the journal: it was not rewritten", lines)
	}
	list, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	sameRecords(t, "List", list, want, true)
}

// TestStoreNoticesAJournalChangedUnderIt: the Store reads live lines back from the journal;
// a line that another process changed meanwhile is not taken for the record (its checksum
// and key are checked again): Get reports it, and a rewrite refuses to carry it over and
// leaves the Store refusing changes until a restart.
func TestStoreNoticesAJournalChangedUnderIt(t *testing.T) {
	old := compactMin
	compactMin = 4
	t.Cleanup(func() { compactMin = old })
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := range 3 {
		if err := s.Put(crashRecord(i)); err != nil {
			t.Fatal(err)
		}
	}
	journal := filepath.Join(dir, "volumes", journalName)
	data, err := os.ReadFile(journal)
	if err != nil {
		t.Fatal(err)
	}
	data[strings.IndexByte(string(data), '\n')-5] ^= 0x01 // in the first record's line
	if err := os.WriteFile(journal, data, 0o600); err != nil {
		t.Fatal(err)
	}
	first := crashRecord(0)
	if _, _, err := s.Get(first.VolumeID, first.TargetPath); !errors.Is(err, errJournalChanged) {
		t.Fatalf("Get of a record whose line changed on disk: %v; want %v", err, errJournalChanged)
	}
	// Enough dead lines for a rewrite, which must not carry the changed line over.
	for i := range 10 {
		r := crashRecord(10 + i)
		if err := s.Put(r); err != nil {
			break
		}
		_ = s.Delete(r.Key())
	}
	if err := s.Put(crashRecord(50)); !errors.Is(err, errJournalChanged) {
		t.Fatalf("Put after a rewrite met the changed line: %v; want %v", err, errJournalChanged)
	}
	if _, err := Read(dir); err == nil || !strings.Contains(err.Error(), "checksum mismatch") {
		t.Fatalf("the journal on disk: %v; want the changed line still there, reported", err)
	}
}
