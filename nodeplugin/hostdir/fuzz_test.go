package hostdir

import (
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParseEntry checks that whatever the --hostdir parser accepts is a safe allowlist entry:
// a name that is not a path, an absolute clean path that is not the host root, and a value
// that round-trips through the flag syntax unchanged.
func FuzzParseEntry(f *testing.F) {
	for _, s := range []string{"data=/srv/data", "apm-socket=/var/run/datadog/apm.socket,ro", "d=/x,create,ro", "=/", "a=/..", "a=/x,,ro", "a=b=c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e, err := ParseEntry(s)
		if err != nil {
			return
		}
		if strings.ContainsAny(e.Name, "/\x00") || strings.Contains(e.Name, "..") {
			t.Fatalf("name %q looks like a path", e.Name)
		}
		if !filepath.IsAbs(e.Path) || filepath.Clean(e.Path) != e.Path || e.Path == "/" {
			t.Fatalf("path %q is not absolute and clean, or is the root", e.Path)
		}
		if strings.ContainsAny(e.Path, ",\x00") {
			t.Fatalf("path %q holds a reserved character", e.Path)
		}
		again, err := ParseEntry(e.String())
		if err != nil || again != e {
			t.Fatalf("round trip of %q: %+v, %v", e.String(), again, err)
		}
	})
}

// FuzzParseConfig checks that the config file parser never accepts an entry that the flag
// parser would refuse.
func FuzzParseConfig(f *testing.F) {
	f.Add("hostdirs:\n- name: data\n  path: /srv/data\n")
	f.Add(`{"hostdirs":[{"name":"a","path":"/a","readOnly":true}],"datadogSockets":{"APMSocket":"a"}}`)
	f.Fuzz(func(t *testing.T, data string) {
		c, err := ParseConfig([]byte(data))
		if err != nil {
			return
		}
		for _, e := range c.HostDirs {
			if _, err := ParseEntry(e.String()); err != nil {
				t.Fatalf("config accepted %+v that the flag parser refuses: %v", e, err)
			}
		}
	})
}
