package hostdir

import (
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// FuzzParseEntry checks that whatever the --hostdir parser accepts is a safe allowlist entry:
// a name that is not a path, an absolute clean path that is not the host root, a declared
// tenancy, and a value that round-trips through the flag syntax unchanged.
func FuzzParseEntry(f *testing.F) {
	for _, s := range []string{
		"data=/srv/data,namespaces=*", "apm-socket=/var/run/datadog/apm.socket,ro,namespaces=*", "d=/x,create,ro,namespaces=a|b",
		"t=/t,namespaces=a,service-accounts=a/w|a/r", "s=/s,namespaces=*,namespace-selector=team=a&env in (x|y)&!legacy",
		"data=/srv/data", "=/", "a=/..", "a=/x,,ro", "a=b=c", "a=/x,namespaces=*|a", "a=/x,namespaces=a,service-accounts=b/c",
	} {
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
		if len(e.Namespaces) == 0 {
			t.Fatalf("entry %+v accepted without declaring its namespaces", e)
		}
		for _, ns := range e.Namespaces {
			if ns == "" || strings.ContainsAny(ns, ",|&=/ ") {
				t.Fatalf("namespace %q of %+v is not a name", ns, e)
			}
		}
		again, err := ParseEntry(e.String())
		if err != nil || !reflect.DeepEqual(again, e) {
			t.Fatalf("round trip of %q: %+v, %v", e.String(), again, err)
		}
	})
}

// FuzzParseConfig checks that the config file parser never accepts an entry that the flag
// parser would refuse, and that both read the same entry the same way.
func FuzzParseConfig(f *testing.F) {
	f.Add("hostdirs:\n- name: data\n  path: /srv/data\n  namespaces: [a]\n")
	f.Add("hostdirs:\n- name: data\n  path: /srv/data\n")
	f.Add("hostdirs:\n- name: d\n  path: /d\n  namespaces: [\"*\"]\n  namespaceSelector: \"b in (y,x),a\"\n  serviceAccounts: [a/b]\n")
	f.Add(`{"hostdirs":[{"name":"a","path":"/a","readOnly":true,"namespaces":["x"]}],"datadogSockets":{"APMSocket":"a"}}`)
	f.Fuzz(func(t *testing.T, data string) {
		c, err := ParseConfig([]byte(data))
		if err != nil {
			return
		}
		for _, e := range c.HostDirs {
			again, err := ParseEntry(e.String())
			if err != nil {
				t.Fatalf("config accepted %+v that the flag parser refuses: %v", e, err)
			}
			if !reflect.DeepEqual(again, e) {
				t.Fatalf("config entry %+v reads as %+v through the flag syntax %q", e, again, e.String())
			}
		}
	})
}
