package hostdir

import (
	"reflect"
	"strings"
	"testing"
)

// all is the explicit "every namespace" declaration.
var all = []string{"*"}

func TestParseEntry(t *testing.T) {
	tests := []struct {
		in      string
		want    Entry
		wantErr string
	}{
		{in: "data=/var/lib/data,namespaces=*", want: Entry{Name: "data", Path: "/var/lib/data", Namespaces: all}},
		{in: "apm-socket=/var/run/datadog/apm.socket,ro,namespaces=*", want: Entry{Name: "apm-socket", Path: "/var/run/datadog/apm.socket", ReadOnly: true, Namespaces: all}},
		{in: "demo=/srv/demo,create,ro,namespaces=demo", want: Entry{Name: "demo", Path: "/srv/demo", ReadOnly: true, Create: true, Namespaces: []string{"demo"}}},
		{in: "a.b_c=/x=y,namespaces=a|b", want: Entry{Name: "a.b_c", Path: "/x=y", Namespaces: []string{"a", "b"}}},
		{in: "team=/srv/team,namespaces=team-a,service-accounts=team-a/writer|team-a/reader",
			want: Entry{Name: "team", Path: "/srv/team", Namespaces: []string{"team-a"}, ServiceAccounts: []string{"team-a/writer", "team-a/reader"}}},
		{in: "sel=/srv/sel,namespaces=*,namespace-selector=team=a",
			want: Entry{Name: "sel", Path: "/srv/sel", Namespaces: all, NamespaceSelector: "team=a"}},
		// Requirements are separated by '&' and in-lists by '|'; the selector is stored in
		// its canonical form (requirements sorted by key).
		{in: "sel=/srv/sel,namespace-selector=tier in (db|web)&env!=prod,namespaces=*",
			want: Entry{Name: "sel", Path: "/srv/sel", Namespaces: all, NamespaceSelector: "env!=prod,tier in (db,web)"}},
		// No tenancy: refused, and the message shows how to write it.
		{in: "data=/var/lib/data", wantErr: "declare who may use it: flag --hostdir NAME=PATH,namespaces=NS1|NS2 (or namespaces=* for every namespace)"},
		{in: "data=/var/lib/data,ro,create", wantErr: "namespaces=* for every namespace"},
		{in: "data=/x,namespaces=", wantErr: "namespaces= is empty"},
		{in: "data=/x,namespaces=*|a", wantErr: `"*" means every namespace`},
		{in: "data=/x,namespaces=Team", wantErr: `"Team" is not a namespace name`},
		{in: "data=/x,namespaces=a||b", wantErr: `"" is not a namespace name`},
		{in: "data=/x,namespaces=a,service-accounts=b/sa", wantErr: "b/sa\" can never be allowed: namespace b is not in namespaces"},
		{in: "data=/x,namespaces=a,service-accounts=sa", wantErr: "want NAMESPACE/NAME"},
		{in: "data=/x,namespaces=a,service-accounts=", wantErr: "service-accounts= is empty"},
		{in: "data=/x,namespaces=a,namespace-selector=", wantErr: "namespace-selector= is empty"},
		{in: "data=/x,namespaces=a,namespace-selector=in in in", wantErr: "namespaceSelector"},
		{in: "data=/x,namespaces=a,namespaces=b", wantErr: `option "namespaces" is given twice`},
		{in: "data=/x,ro=true,namespaces=a", wantErr: `unknown option "ro=true"`},
		{in: "data", wantErr: "NAME=PATH"},
		{in: "=/x,namespaces=*", wantErr: "empty"},
		{in: "Data=/x,namespaces=*", wantErr: "lower-case"},
		{in: "a/b=/x,namespaces=*", wantErr: "not a path"},
		{in: "..=/x,namespaces=*", wantErr: "not a path"},
		{in: "data=,namespaces=*", wantErr: "empty path"},
		{in: "data=relative/dir,namespaces=*", wantErr: "absolute and clean"},
		{in: "data=/a/../etc,namespaces=*", wantErr: "absolute and clean"},
		{in: "data=/a/,namespaces=*", wantErr: "absolute and clean"},
		{in: "data=/,namespaces=*", wantErr: "host root"},
		{in: "data=/x,rw,namespaces=*", wantErr: `unknown option "rw"`},
		{in: "data=/x,,namespaces=*", wantErr: `unknown option ""`},
		{in: "data=/x\x00y,namespaces=*", wantErr: "NUL"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseEntry(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseEntry(%q) error = %v, want one containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseEntry(%q): %v", tt.in, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("ParseEntry(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			if again, err := ParseEntry(got.String()); err != nil || !reflect.DeepEqual(again, got) {
				t.Fatalf("round trip of %q: %+v, %v", got.String(), again, err)
			}
		})
	}
}

func TestSetLookup(t *testing.T) {
	s, err := NewSet([]Entry{{Name: "b", Path: "/b", Namespaces: all}, {Name: "a", Path: "/a", ReadOnly: true, Namespaces: all}})
	if err != nil {
		t.Fatal(err)
	}
	if e, err := s.Lookup("a"); err != nil || e.Path != "/a" || !e.ReadOnly {
		t.Fatalf("Lookup(a) = %+v, %v", e, err)
	}
	_, err = s.Lookup("c")
	if err == nil || !strings.Contains(err.Error(), "declared entries: a, b") {
		t.Fatalf("Lookup(c) error = %v, want the declared entries listed", err)
	}
	empty, _ := NewSet(nil)
	if _, err := empty.Lookup("c"); err == nil || !strings.Contains(err.Error(), "none are declared") {
		t.Fatalf("Lookup on empty set error = %v", err)
	}
	if _, err := NewSet([]Entry{{Name: "a", Path: "/a", Namespaces: all}, {Name: "a", Path: "/b", Namespaces: all}}); err == nil {
		t.Fatal("duplicate names accepted")
	}
	if _, err := NewSet([]Entry{{Name: "a", Path: "rel", Namespaces: all}}); err == nil {
		t.Fatal("invalid entry accepted")
	}
	if _, err := NewSet([]Entry{{Name: "a", Path: "/a"}}); err == nil || !strings.Contains(err.Error(), "declare who may use it") {
		t.Fatalf("entry without tenancy: error = %v, want the tenancy syntax", err)
	}
}

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name    string
		data    string
		want    Config
		wantErr string
	}{
		{
			name: "yaml",
			data: "hostdirs:\n- name: data\n  path: /srv/data\n  create: true\n  namespaces: [team-a]\n  serviceAccounts: [team-a/writer]\n  namespaceSelector: \"tier in (web,db),env\"\n- name: apm-socket\n  path: /var/run/datadog/apm.socket\n  readOnly: true\n  namespaces: [\"*\"]\ndatadogSockets:\n  APMSocket: apm-socket\n",
			want: Config{
				HostDirs: []Entry{
					{Name: "data", Path: "/srv/data", Create: true, Namespaces: []string{"team-a"}, ServiceAccounts: []string{"team-a/writer"}, NamespaceSelector: "env,tier in (db,web)"},
					{Name: "apm-socket", Path: "/var/run/datadog/apm.socket", ReadOnly: true, Namespaces: all},
				},
				DatadogSockets: map[string]string{"APMSocket": "apm-socket"},
			},
		},
		{
			name: "json",
			data: `{"hostdirs":[{"name":"data","path":"/srv/data","namespaces":["a","b"]}]}`,
			want: Config{HostDirs: []Entry{{Name: "data", Path: "/srv/data", Namespaces: []string{"a", "b"}}}},
		},
		{name: "no tenancy", data: "hostdirs:\n- name: data\n  path: /srv/data\n", wantErr: `hostdir "data": declare who may use it`},
		{name: "empty namespaces", data: "hostdirs:\n- name: data\n  path: /srv/data\n  namespaces: []\n", wantErr: `config file: namespaces: [NS1, NS2] (or ["*"])`},
		{name: "empty service accounts", data: "hostdirs:\n- name: data\n  path: /srv/data\n  namespaces: [a]\n  serviceAccounts: []\n", wantErr: `hostdir "data": serviceAccounts is empty`},
		{name: "bad service account", data: "hostdirs:\n- name: data\n  path: /srv/data\n  namespaces: [a]\n  serviceAccounts: [b/x]\n", wantErr: "namespace b is not in namespaces"},
		{name: "unknown field", data: "hostdirs:\n- name: data\n  path: /srv\n  namespaces: [a]\n  mode: rw\n", wantErr: "mode"},
		{name: "bad path", data: "hostdirs:\n- name: data\n  path: srv\n  namespaces: [a]\n", wantErr: "absolute"},
		{name: "bad socket type", data: "datadogSockets:\n  Foo: x\n", wantErr: "use one of"},
		{name: "bad socket entry", data: "datadogSockets:\n  APMSocket: /x\n", wantErr: "not a path"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseConfig([]byte(tt.data))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseSocketMapping(t *testing.T) {
	if typ, e, err := ParseSocketMapping("DSDSocket=my-dsd"); err != nil || typ != "DSDSocket" || e != "my-dsd" {
		t.Fatalf("got %q %q %v", typ, e, err)
	}
	for _, bad := range []string{"DSDSocket", "hostdir=x", "APMSocket=/var/run", "APMSocket="} {
		if _, _, err := ParseSocketMapping(bad); err == nil {
			t.Errorf("ParseSocketMapping(%q) accepted", bad)
		}
	}
	if len(DefaultDatadogSockets()) != 4 {
		t.Fatal("every Datadog socket type needs a default entry")
	}
}
