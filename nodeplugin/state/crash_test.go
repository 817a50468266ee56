package state

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// crashRecord is the record the crash test's writer puts at step i.
func crashRecord(i int) *Record {
	return &Record{
		VolumeID:   fmt.Sprintf("vol-%d", i),
		TargetPath: fmt.Sprintf("/pods/p%d/volumes/kubernetes.io~csi/v/mount", i%23),
		Kind:       "library",
		Attributes: map[string]string{"step": strconv.Itoa(i), "pad": strings.Repeat("x", i%300)},
		Layers:     []Layer{{Dir: "/store/" + strconv.Itoa(i), Digest: "sha256:" + strconv.Itoa(i)}},
		Created:    time.Unix(int64(i), 0).UTC(),
	}
}

// crashStep is what the crash test's writer does at step i: put crashRecord(i), or, every
// third step, delete the record of step i/2.
func crashStep(i int) (put bool, r *Record) {
	if i%3 == 2 {
		return false, crashRecord(i / 2)
	}
	return true, crashRecord(i)
}

// TestCrashWriter is the process the crash test kills: it opens the store in
// $STATE_CRASH_DIR and runs crashStep from step $STATE_CRASH_FROM on, printing each step's
// number once its call has returned.
func TestCrashWriter(t *testing.T) {
	dir := os.Getenv("STATE_CRASH_DIR")
	if dir == "" {
		t.Skip("run by TestStoreSurvivesKillAtAnyPoint")
	}
	compactMin = 8 // rewrite often, so that kills land in rewrites too
	from, _ := strconv.Atoi(os.Getenv("STATE_CRASH_FROM"))
	s, err := Open(dir)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	out := bufio.NewWriter(os.Stdout)
	for i := from; ; i++ {
		put, r := crashStep(i)
		if put {
			err = s.Put(r)
		} else {
			err = s.Delete(r.Key())
		}
		if err != nil {
			fmt.Fprintln(out, "error", err)
			out.Flush()
			os.Exit(1)
		}
		fmt.Fprintln(out, i)
		out.Flush()
	}
}

// TestStoreSurvivesKillAtAnyPoint kills a writing process (SIGKILL) at random moments, in
// appends, syncs and journal rewrites, 40 times over the same state dir, and checks after
// each kill that the records read back are exactly those the acknowledged calls left: none
// lost, none duplicated, none misread, none brought back. The one call in flight at the kill
// may or may not have happened. The next writer continues on the journal the kill left.
func TestStoreSurvivesKillAtAnyPoint(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(1, 2))
	want := map[string]*Record{} // key -> record, as acknowledged
	apply := func(i int) {
		put, r := crashStep(i)
		if put {
			want[r.Key()] = r
		} else {
			delete(want, r.Key())
		}
	}
	next := 0
	for round := range 40 {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestCrashWriter$")
		cmd.Env = append(os.Environ(), "STATE_CRASH_DIR="+dir, "STATE_CRASH_FROM="+strconv.Itoa(next))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := bufio.NewScanner(stdout)
		// Let it run for a while (at least one acknowledged call), then kill it.
		if !lines.Scan() {
			t.Fatalf("round %d: the writer stopped before its first call: %v", round, cmd.Wait())
		}
		acks := []string{lines.Text()}
		time.Sleep(time.Duration(rng.IntN(20_000)) * time.Microsecond)
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for lines.Scan() {
			acks = append(acks, lines.Text())
		}
		_ = cmd.Wait()
		for _, a := range acks {
			i, err := strconv.Atoi(a)
			if err != nil || i != next {
				t.Fatalf("round %d: writer said %q, want step %d", round, a, next)
			}
			apply(i)
			next = i + 1
		}

		s, err := Open(dir)
		if err != nil {
			t.Fatalf("round %d: reopening after the kill: %v", round, err)
		}
		// What start-up reads (the records Open decoded, without their attributes) first,
		// then every record whole.
		index, keys, err := s.Index()
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		for i, r := range index {
			if keys[i] != r.Key() {
				t.Fatalf("round %d: Index gives key %s for the record of key %s", round, keys[i], r.Key())
			}
		}
		got, err := s.List()
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		gotByKey := map[string]*Record{}
		for _, r := range got {
			if _, dup := gotByKey[r.Key()]; dup {
				t.Fatalf("round %d: record %s listed twice", round, r.Key())
			}
			gotByKey[r.Key()] = r
		}
		// The call in flight at the kill (step next) may have happened; the next writer
		// repeats it either way.
		if put, r := crashStep(next); put && reflect.DeepEqual(gotByKey[r.Key()], r) {
			want[r.Key()] = r
		} else if _, ok := gotByKey[r.Key()]; !put && !ok {
			delete(want, r.Key())
		}
		if len(gotByKey) != len(want) {
			t.Fatalf("round %d (killed after %d acknowledged calls): %d records, want %d", round, len(acks), len(gotByKey), len(want))
		}
		for k, w := range want {
			if !reflect.DeepEqual(gotByKey[k], w) {
				t.Fatalf("round %d: record %s = %+v, want %+v", round, k, gotByKey[k], w)
			}
		}
		if len(index) != len(got) {
			t.Fatalf("round %d: Index has %d records, List %d", round, len(index), len(got))
		}
		for _, r := range index {
			w := *gotByKey[r.Key()]
			w.Attributes = nil
			if !reflect.DeepEqual(*r, w) {
				t.Fatalf("round %d: indexed record %s = %+v, want %+v", round, r.Key(), *r, w)
			}
		}
		s.Close()
		if entries, _ := filepath.Glob(filepath.Join(dir, "volumes", "*.unreadable-*")); len(entries) != 0 {
			t.Fatalf("round %d: a kill left unreadable lines: %q", round, entries)
		}
	}
	if next < 100 {
		t.Fatalf("only %d steps in all rounds: the kills did not exercise much", next)
	}
	t.Logf("%d steps over 40 kills", next)
}

// TestStoreDropsATornTail cuts the journal at every byte of its last line, as a power loss
// in the middle of an unsynced append does: Open keeps every whole line before it, drops the
// rest without reporting damage, and the next Put lands on a clean line.
func TestStoreDropsATornTail(t *testing.T) {
	dir := t.TempDir()
	journal := journalOfThreeRecords(t, dir)
	full, err := os.ReadFile(journal)
	if err != nil {
		t.Fatal(err)
	}
	lastStart := strings.LastIndexByte(strings.TrimSuffix(string(full), "\n"), '\n') + 1
	for cut := lastStart; cut < len(full); cut++ {
		tail := append([]byte{}, full[:cut]...)
		if cut%2 == 1 {
			// Or the file grew but its last block never made it: zeros.
			tail = append(tail, make([]byte, len(full)-cut)...)
		}
		if err := os.WriteFile(journal, tail, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		got, err := s.List()
		if err != nil || len(got) != 2 {
			t.Fatalf("cut at %d of %d: %d records, %v; want the 2 whole ones and no error", cut, len(full), len(got), err)
		}
		if err := s.Put(crashRecord(2)); err != nil {
			t.Fatal(err)
		}
		s.Close()
		back, err := Read(dir)
		if err != nil || len(back) != 3 {
			t.Fatalf("cut at %d: after a new Put, %d records, %v", cut, len(back), err)
		}
	}
}

// TestStoreReportsDamageInTheMiddle: a damaged line followed by good ones is not a torn
// append. The damaged record is reported and the journal copied aside for inspection; the
// records around it are kept.
func TestStoreReportsDamageInTheMiddle(t *testing.T) {
	dir := t.TempDir()
	journal := journalOfThreeRecords(t, dir)
	data, _ := os.ReadFile(journal)
	second := strings.IndexByte(string(data), '\n') + 1
	data[second+100] ^= 0x20 // one flipped bit in the second record
	if err := os.WriteFile(journal, data, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.List()
	if len(got) != 2 || err == nil || !strings.Contains(err.Error(), "checksum mismatch") {
		t.Fatalf("List = %d records, %v; want 2 and the damaged line reported", len(got), err)
	}
	aside, _ := filepath.Glob(journal + ".unreadable-*")
	if len(aside) != 1 {
		t.Fatalf("copies aside: %q, want one", aside)
	}
}

// TestStorePutsShareSyncs: many concurrent Puts all return durable records (read back by a
// fresh Open) and none is lost when the journal is rewritten meanwhile.
func TestStorePutsShareSyncs(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 64)
	for w := range 8 {
		go func() {
			for i := w; i < 400; i += 8 {
				r := crashRecord(i)
				r.TargetPath = fmt.Sprintf("/pods/w%d/%d", w, i)
				err := s.Put(r)
				if err == nil && i%2 == 0 {
					err = s.Delete(r.Key())
				}
				if err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	back, err := Read(dir)
	if err != nil || len(back) != 200 {
		t.Fatalf("%d records on disk, %v; want 200", len(back), err)
	}
}

// journalOfThreeRecords writes crashRecord(0..2) into a store in dir, closes it and returns
// the journal's path.
func journalOfThreeRecords(t *testing.T, dir string) string {
	t.Helper()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := s.Put(crashRecord(i)); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	return filepath.Join(dir, "volumes", journalName)
}
