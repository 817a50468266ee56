package hostdir

import (
	"reflect"
	"strings"
	"testing"
)

func TestParseEntry(t *testing.T) {
	tests := []struct {
		in      string
		want    Entry
		wantErr string
	}{
		{in: "data=/var/lib/data", want: Entry{Name: "data", Path: "/var/lib/data"}},
		{in: "apm-socket=/var/run/datadog/apm.socket,ro", want: Entry{Name: "apm-socket", Path: "/var/run/datadog/apm.socket", ReadOnly: true}},
		{in: "demo=/srv/demo,create,ro", want: Entry{Name: "demo", Path: "/srv/demo", ReadOnly: true, Create: true}},
		{in: "a.b_c=/x=y", want: Entry{Name: "a.b_c", Path: "/x=y"}},
		{in: "data", wantErr: "NAME=PATH"},
		{in: "=/x", wantErr: "empty"},
		{in: "Data=/x", wantErr: "lower-case"},
		{in: "a/b=/x", wantErr: "not a path"},
		{in: "..=/x", wantErr: "not a path"},
		{in: "data=", wantErr: "empty path"},
		{in: "data=relative/dir", wantErr: "absolute and clean"},
		{in: "data=/a/../etc", wantErr: "absolute and clean"},
		{in: "data=/a/", wantErr: "absolute and clean"},
		{in: "data=/", wantErr: "host root"},
		{in: "data=/x,rw", wantErr: `unknown option "rw"`},
		{in: "data=/x,", wantErr: `unknown option ""`},
		{in: "data=/x\x00y", wantErr: "NUL"},
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
			if got != tt.want {
				t.Fatalf("ParseEntry(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			if again, err := ParseEntry(got.String()); err != nil || again != got {
				t.Fatalf("round trip of %q: %+v, %v", got.String(), again, err)
			}
		})
	}
}

func TestSetLookup(t *testing.T) {
	s, err := NewSet([]Entry{{Name: "b", Path: "/b"}, {Name: "a", Path: "/a", ReadOnly: true}})
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
	if _, err := NewSet([]Entry{{Name: "a", Path: "/a"}, {Name: "a", Path: "/b"}}); err == nil {
		t.Fatal("duplicate names accepted")
	}
	if _, err := NewSet([]Entry{{Name: "a", Path: "rel"}}); err == nil {
		t.Fatal("invalid entry accepted")
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
			data: "hostdirs:\n- name: data\n  path: /srv/data\n  create: true\n- name: apm-socket\n  path: /var/run/datadog/apm.socket\n  readOnly: true\ndatadogSockets:\n  APMSocket: apm-socket\n",
			want: Config{
				HostDirs:       []Entry{{Name: "data", Path: "/srv/data", Create: true}, {Name: "apm-socket", Path: "/var/run/datadog/apm.socket", ReadOnly: true}},
				DatadogSockets: map[string]string{"APMSocket": "apm-socket"},
			},
		},
		{
			name: "json",
			data: `{"hostdirs":[{"name":"data","path":"/srv/data"}]}`,
			want: Config{HostDirs: []Entry{{Name: "data", Path: "/srv/data"}}},
		},
		{name: "unknown field", data: "hostdirs:\n- name: data\n  path: /srv\n  mode: rw\n", wantErr: "mode"},
		{name: "bad path", data: "hostdirs:\n- name: data\n  path: srv\n", wantErr: "absolute"},
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
