package flagdocs

import (
	"flag"
	"strings"
	"testing"
	"time"
)

func TestTable(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.Duration("gc-interval", time.Hour, "how often | garbage is collected")
	fs.String("endpoint", "", "CSI socket at <dir>/csi.sock (default unix://<dir>/csi.sock)")
	fs.String("config", "", "YAML `FILE` with *everything*")
	fs.String("node-id", "", "node id (default the host name)")
	fs.Bool("keep", false, "keep layers")
	fs.Int("per-registry", 0, "downloads per registry (default and at most: the total minus one)")
	got := Table(fs)
	want := "| flag | default | meaning |\n| --- | --- | --- |\n" +
		"| `--config FILE` | none | YAML FILE with \\*everything\\* |\n" +
		"| `--endpoint` | `unix://<dir>/csi.sock` | CSI socket at \\<dir\\>/csi.sock |\n" +
		"| `--gc-interval` | `1h` | how often \\| garbage is collected |\n" +
		"| `--keep` | `false` | keep layers |\n" +
		"| `--node-id` | the host name | node id |\n" +
		"| `--per-registry` | `0` | downloads per registry (default and at most: the total minus one) |\n"
	if got != want {
		t.Fatalf("Table:\n%s\nwant:\n%s", got, want)
	}
}

func TestReplace(t *testing.T) {
	doc := "intro\n<!-- flags:x begin -->\nold\n<!-- flags:x end -->\nafter\n"
	got, err := Replace(doc, "x", "new\n")
	if err != nil || got != "intro\n<!-- flags:x begin -->\nnew\n<!-- flags:x end -->\nafter\n" {
		t.Fatalf("Replace = %q, %v", got, err)
	}
	if _, err := Replace(doc, "y", "new\n"); err == nil || !strings.Contains(err.Error(), "flags:y begin") {
		t.Fatalf("Replace of a missing table = %v, want an error naming its marker", err)
	}
}

func TestShortDuration(t *testing.T) {
	for in, want := range map[string]string{"1h0m0s": "1h", "1m0s": "1m", "25s": "25s", "1m30s": "1m30s", "2h30m0s": "2h30m", "10m0s": "10m"} {
		if got := shortDuration(in); got != want {
			t.Errorf("shortDuration(%q) = %q, want %q", in, got, want)
		}
	}
}
