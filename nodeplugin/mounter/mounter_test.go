package mounter

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
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
			// What a caller passes for a ':' in a path and a data-only layer; the empty
			// element between "::" is not a dir.
			name:  "legacy form with escaped colon and data-only layer",
			entry: Entry{FsType: "overlay", SuperOptions: []string{`lowerdir=/a\:x:/b::/c`}},
			want:  []string{"/a:x", "/b", "/c"},
		},
		{
			// The same mount as the kernel prints it in /proc/self/mountinfo: the value as
			// given, its backslash escaped in octal.
			name:  "legacy form as mountinfo shows it",
			entry: Entry{FsType: "overlay", SuperOptions: []string{`lowerdir=/a\134:x:/b::/c`, "redirect_dir=on"}},
			want:  []string{"/a:x", "/b", "/c"},
		},
		{
			// lowerdir=/tmp/d\,e:/h i:/f\\g as mount(2) was given it.
			name:  "legacy form with escaped comma, space and backslash",
			entry: Entry{FsType: "overlay", SuperOptions: []string{`lowerdir=/d\134\054e:/h\040i:/f\134\134g`}},
			want:  []string{"/d,e", "/h i", `/f\g`},
		},
		{
			// One path per option: a ':' is part of the path, a backslash is printed in octal.
			name:  "new mount API form with colon and backslash",
			entry: Entry{FsType: "overlay", SuperOptions: []string{"lowerdir+=/a:x", `lowerdir+=/f\134g`, "datadir+=/d\054e"}},
			want:  []string{"/a:x", `/f\g`, "/d,e"},
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

func TestReferencedPaths(t *testing.T) {
	table := []Entry{
		// The node's root filesystem, and a second filesystem holding the store at /var/lib.
		{MountPoint: "/", Root: "/", FsType: "ext4", Major: 8, Minor: 1},
		{MountPoint: "/var/lib", Root: "/", FsType: "ext4", Major: 8, Minor: 2},
		// The store as a mount of its own (mounter.OwnMount): a bind of /apm-csi/store of
		// that filesystem onto itself.
		{MountPoint: "/var/lib/apm-csi/store", Root: "/apm-csi/store", FsType: "ext4", Major: 8, Minor: 2},
		// A preload volume: a generated file of the store bind-mounted into a pod.
		{MountPoint: "/k/pods/p/volumes/v/mount", Root: "/apm-csi/store/generated/g/root/etc/ld.so.preload", FsType: "ext4", Major: 8, Minor: 2},
		// A library volume.
		{MountPoint: "/k/pods/q/volumes/v/mount", Root: "/", FsType: "overlay", Major: 0, Minor: 60,
			SuperOptions: []string{"rw", "lowerdir+=/var/lib/apm-csi/store/images/i/rootfs", "datadir+=/var/lib/apm-csi/store/views/v/root", "upperdir=/u", "workdir=/w"}},
	}
	got := ReferencedPaths(table)
	for _, want := range []string{
		"/var/lib/apm-csi/store/generated/g/root/etc/ld.so.preload",
		"/var/lib/apm-csi/store/images/i/rootfs",
		"/var/lib/apm-csi/store/views/v/root",
	} {
		if !slices.Contains(got, want) {
			t.Errorf("ReferencedPaths lacks %s: %q", want, got)
		}
	}
	for _, p := range got {
		// The bind's path inside its filesystem is not a path of the node: the store's
		// filesystem is not mounted at /.
		if strings.HasPrefix(p, "/apm-csi/") || p == "/u" || p == "/w" {
			t.Errorf("ReferencedPaths lists %s: %q", p, got)
		}
	}
}

func TestMountTableReadsMountinfo(t *testing.T) {
	info := filepath.Join(t.TempDir(), "mountinfo")
	const table = `22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
47 26 0:39 / /tmp/ovt/m\040one rw,relatime - overlay overlay ro,lowerdir=/tmp/ovt/a\134:x:/tmp/ovt/b::/tmp/ovt/c,redirect_dir=on
48 22 8:1 /srv/a\040b /mnt/bind ro,relatime - ext4 /dev/vda rw
`
	if err := os.WriteFile(info, []byte(table), 0o644); err != nil {
		t.Fatal(err)
	}
	entries, err := (&Linux{mountInfo: info}).MountTable()
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 3 {
		t.Fatalf("%d entries: %+v", len(entries), entries)
	}
	if e := entries[1]; e.MountPoint != "/tmp/ovt/m one" || !reflect.DeepEqual(e.LowerDirs(), []string{"/tmp/ovt/a:x", "/tmp/ovt/b", "/tmp/ovt/c"}) {
		t.Errorf("overlay: %q, lower %q", e.MountPoint, e.LowerDirs())
	}
	if e := entries[2]; e.Root != "/srv/a b" || e.Major != 8 || e.Minor != 1 {
		t.Errorf("bind: %+v", e)
	}
	if got := ReferencedPaths(entries); !slices.Contains(got, "/srv/a b") {
		t.Errorf("ReferencedPaths lacks the bind mount's source: %q", got)
	}
}
