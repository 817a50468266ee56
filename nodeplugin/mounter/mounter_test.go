package mounter

import (
	"reflect"
	"strings"
	"testing"
)

func TestEntryLowerDirs(t *testing.T) {
	tests := []struct {
		name  string
		entry Entry
		want  []string
	}{
		{
			name:  "legacy form",
			entry: Entry{FsType: "overlay", SuperOptions: []string{"rw", "lowerdir=/a:/b", "upperdir=/u", "workdir=/w"}},
			want:  []string{"/a", "/b"},
		},
		{
			name:  "legacy form with escaped colon",
			entry: Entry{FsType: "overlay", SuperOptions: []string{"lowerdir=/a\\:x:/b"}},
			want:  []string{"/a:x", "/b"},
		},
		{
			name:  "new mount API form",
			entry: Entry{FsType: "overlay", SuperOptions: []string{"rw", "lowerdir+=/a", "lowerdir+=/b", "datadir+=/d", "upperdir=/u"}},
			want:  []string{"/a", "/b", "/d"},
		},
		{
			name:  "octal escape",
			entry: Entry{FsType: "overlay", SuperOptions: []string{"lowerdir+=/a\\040b"}},
			want:  []string{"/a b"},
		},
		{
			name:  "not an overlay",
			entry: Entry{FsType: "ext4", SuperOptions: []string{"lowerdir=/a"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.entry.LowerDirs(); !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("LowerDirs() = %q, want %q", got, tt.want)
			}
		})
	}
	e := Entry{SuperOptions: []string{"upperdir=/x\\040y"}}
	if v, ok := e.Option("upperdir"); !ok || v != "/x y" {
		t.Fatalf("Option(upperdir) = %q, %t", v, ok)
	}
	if _, ok := e.Option("workdir"); ok {
		t.Fatal("Option(workdir) found a missing option")
	}
}

func TestOverlayValidate(t *testing.T) {
	tests := []struct {
		name    string
		o       Overlay
		wantErr string
	}{
		{name: "writable one lower", o: Overlay{Lower: []string{"/a"}, Upper: "/u", Work: "/w"}},
		{name: "read-only two lowers", o: Overlay{Lower: []string{"/a", "/b"}}},
		{name: "no lower", o: Overlay{Upper: "/u", Work: "/w"}, wantErr: "at least one"},
		{name: "read-only one lower", o: Overlay{Lower: []string{"/a"}}, wantErr: "at least two"},
		{name: "upper without work", o: Overlay{Lower: []string{"/a"}, Upper: "/u"}, wantErr: "both"},
		{name: "comma", o: Overlay{Lower: []string{"/a,upperdir=/etc", "/b"}}, wantErr: "reserved"},
		{name: "colon", o: Overlay{Lower: []string{"/a:/etc"}, Upper: "/u", Work: "/w"}, wantErr: "reserved"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.o.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Validate() = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}
