// Package flagdocs writes the flag tables of README.md and docs/*.md from the binaries' flag
// sets, so that the tables cannot drift from the flags. A table sits between
//
//	<!-- flags:NAME begin -->
//	<!-- flags:NAME end -->
//
// and is rendered from each flag's usage string: the first `quoted` word is the value's
// placeholder (as in --help), and for a flag without a default value of its own (one that is
// computed, or a flag.Func) a trailing "(default X)" in the usage is the default. The tests of each command call Check; `make docs` rewrites the tables.
package flagdocs

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// UpdateEnv set to 1 makes Check rewrite the tables instead of comparing them (`make docs`).
const UpdateEnv = "UPDATE_FLAG_DOCS"

// usageDefault is a trailing "(default X)" in a usage string.
var usageDefault = regexp.MustCompile(`\s*\(defaults? ([^()]*(?:\([^()]*\)[^()]*)*)\)$`)

// Table renders the flags of fs as a Markdown table: flag, default, meaning.
func Table(fs *flag.FlagSet) string {
	var b strings.Builder
	b.WriteString("| flag | default | meaning |\n| --- | --- | --- |\n")
	fs.VisitAll(func(f *flag.Flag) {
		placeholder, usage := flag.UnquoteUsage(f)
		name := "--" + f.Name
		if strings.Contains(f.Usage, "`") {
			name += " " + placeholder
		}
		def := f.DefValue
		if m := usageDefault.FindStringSubmatchIndex(usage); m != nil && def == "" {
			def = usage[m[2]:m[3]]
			usage = usage[:m[0]]
		} else if d, err := time.ParseDuration(def); err == nil && d != 0 {
			def = shortDuration(def)
		}
		switch {
		case def == "":
			def = "none"
		case strings.Contains(def, " "):
			def = text(def) // words ("the host name") or a list
		default:
			def = code(def)
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", code(name), def, text(usage))
	})
	return b.String()
}

// shortDuration drops zero trailing units: 1h0m0s is 1h, 1m30s stays.
func shortDuration(s string) string {
	for _, zero := range []string{"0s", "0m"} {
		if t, ok := strings.CutSuffix(s, zero); ok && t != "" && !strings.HasSuffix(t, ".") && strings.ContainsAny(t[len(t)-1:], "hms") {
			s = t
		}
	}
	return s
}

// code is s as a Markdown code span inside a table cell.
func code(s string) string {
	return "`" + strings.ReplaceAll(s, "|", `\|`) + "`"
}

// text is s as table cell text: pipes, angle brackets and stars are escaped.
func text(s string) string {
	return strings.NewReplacer("|", `\|`, "<", `\<`, ">", `\>`, "*", `\*`).Replace(s)
}

// Markers returns the lines that open and close the table called name.
func Markers(name string) (begin, end string) {
	return "<!-- flags:" + name + " begin -->", "<!-- flags:" + name + " end -->"
}

// Replace returns doc with the table called name replaced by table.
func Replace(doc, name, table string) (string, error) {
	begin, end := Markers(name)
	i := strings.Index(doc, begin+"\n")
	if i < 0 {
		return "", fmt.Errorf("no line %q", begin)
	}
	start := i + len(begin) + 1
	j := strings.Index(doc[start:], end)
	if j < 0 {
		return "", fmt.Errorf("no line %q after %q", end, begin)
	}
	return doc[:start] + table + doc[start+j:], nil
}

// Check fails t unless the table called name in each of files (relative to the module root)
// is what fs renders; with UPDATE_FLAG_DOCS=1 it rewrites them instead.
func Check(t testing.TB, fs *flag.FlagSet, name string, files ...string) {
	t.Helper()
	root := moduleRoot(t)
	table := Table(fs)
	for _, file := range files {
		path := filepath.Join(root, file)
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		want, err := Replace(string(data), name, table)
		if err != nil {
			t.Errorf("%s: %v: put the flag table of %s between these markers", file, err, fs.Name())
			continue
		}
		if want == string(data) {
			continue
		}
		if os.Getenv(UpdateEnv) == "1" {
			if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: flag table %q rewritten", file, name)
			continue
		}
		t.Errorf("%s: the flag table %q differs from the flags of %s; run `make docs` to regenerate it (edit flag usage strings, not the table)", file, name, fs.Name())
	}
}

// moduleRoot is the directory of go.mod above the working directory.
func moduleRoot(t testing.TB) string {
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the working directory")
		}
		dir = parent
	}
}
