package bench

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/test/images"

	"github.com/apm-csi/apm-csi/test/testenv"
)

func TestPercentile(t *testing.T) {
	xs := []float64{5, 1, 4, 2, 3}
	for p, want := range map[float64]float64{0: 1, 50: 3, 100: 5, 90: 4.6} {
		if got := Percentile(xs, p); math.Abs(got-want) > 1e-9 {
			t.Errorf("Percentile(%v) = %v, want %v", p, got, want)
		}
	}
	if got := HistQuantile(0.5, []float64{0.001, 0.01, math.Inf(1)}, []float64{0, 10, 10}); math.Abs(got-0.0055) > 1e-9 {
		t.Errorf("HistQuantile = %v", got)
	}
}

func TestWriteChart(t *testing.T) {
	f := filepath.Join(t.TempDir(), "c.png")
	err := WriteChart(f, "apm-csi benchmark 2026-01-01, 2 CPUs", []Panel{
		{Title: "pod start: median, p90", Bars: []Bar{
			{Label: "uninstrumented", Value: 1.2, Whisker: 1.4, Color: ColorFloor, Text: "1200 ms (p90 1400 ms)"},
			{Label: "init-container mode", Value: 4.2, Whisker: 5, Color: ColorInit, Text: "4.2 s"},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(f); err != nil || fi.Size() == 0 {
		t.Fatalf("chart not written: %v", err)
	}
}

func TestBuildLibrarySet(t *testing.T) {
	if _, err := os.Stat(images.DebianBusybox); err != nil {
		testenv.Missing(t, "%s not found: run `make deps` (Debian's busybox-static)", images.DebianBusybox)
	}
	start := time.Now()
	libs, err := BuildLibrarySet(context.Background(), "127.0.0.1:5000/datadoghq", "bench")
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, l := range libs {
		t.Logf("%s: %d files, %d bytes, %d compressed", l.Name, l.Files, l.Bytes, l.Compressed)
		total += l.Bytes
	}
	t.Logf("total %d MB in %s", total>>20, time.Since(start))
	if total < 130<<20 || total > 170<<20 {
		t.Errorf("library set is %d MB, want about 150", total>>20)
	}
	v, err := Variant(libs[0].Image, "x")
	if err != nil {
		t.Fatal(err)
	}
	d0, _ := libs[0].Image.Digest()
	d1, _ := v.Digest()
	if d0 == d1 {
		t.Error("variant has the same digest")
	}
}

func TestParseStamp(t *testing.T) {
	log := "    mode:         0\n-o  offset:       0 us\n    time.tv_sec:  1796506226\n    time.tv_usec: 416155\n    return value: 5 (clock not synchronized)\nmounts 23\n"
	st, err := ParseStamp(log)
	if err != nil {
		t.Fatal(err)
	}
	if want := time.Unix(1796506226, 416155000); !st.Time.Equal(want) || st.Mounts != 23 {
		t.Errorf("ParseStamp = %v, %d mounts; want %v, 23", st.Time, st.Mounts, want)
	}
	if _, err := ParseStamp("sh: adjtimex: not found\nmounts 20\n"); err == nil {
		t.Error("a log without adjtimex output parsed")
	}
}

func TestRoundOrder(t *testing.T) {
	firsts := map[string]bool{}
	for i := range 8 {
		order := RoundOrder(i)
		if len(order) != len(Arms) {
			t.Fatalf("round %d: %v", i, order)
		}
		seen := map[string]int{}
		for k, a := range order {
			seen[a] = k
		}
		for _, a := range Arms {
			if _, ok := seen[a]; !ok {
				t.Errorf("round %d lacks %s: %v", i, a, order)
			}
		}
		if seen[ArmIVCold] > seen[ArmInit] || seen[ArmIVCold] > seen[ArmIVWarm] {
			t.Errorf("round %d: the cold image-volume pod is not the first to use the images: %v", i, order)
		}
		firsts[order[0]] = true
	}
	if len(firsts) != 4 {
		t.Errorf("the first arm of a round does not rotate over the four slots: %v", firsts)
	}
}
