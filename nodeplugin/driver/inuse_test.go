package driver

import (
	"errors"
	"strings"
	"testing"

	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
)

// TestLibrariesInUseIncludesTheMountTable: mounts the records lost track of still keep their
// layers: an overlay's lower dirs (the legacy form with a data-only layer as the kernel prints
// it) and a bind-mounted generated file.
func TestLibrariesInUseIncludesTheMountTable(t *testing.T) {
	f := newFixture(t)
	f.m.Add(mounter.Entry{MountPoint: "/", Root: "/", FsType: "ext4", Major: 8, Minor: 1})
	f.m.Add(mounter.Entry{MountPoint: "/k/pods/a/volumes/v/mount", Root: "/", FsType: "overlay",
		SuperOptions: []string{"ro", `lowerdir=/cache/views/v/root:/cache/images/i/rootfs::/cache/data`}})
	f.m.Add(mounter.Entry{MountPoint: "/k/pods/b/volumes/v/mount", Root: "/cache/generated/g/root/etc/ld.so.preload", FsType: "ext4", Major: 8, Minor: 1})
	inUse, err := f.d.LibrariesInUse()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"/cache/views/v/root", "/cache/images/i/rootfs", "/cache/data", "/cache/generated/g/root/etc/ld.so.preload"} {
		if !inUse.Has(want) {
			t.Errorf("LibrariesInUse lacks %s: %v", want, inUse)
		}
	}
	if inUse.Has("") {
		t.Errorf("LibrariesInUse holds the empty element between \"::\": %v", inUse)
	}
}

func TestLibrariesInUseFailsWithoutTheMountTable(t *testing.T) {
	f := newFixture(t)
	f.m.Errors["mounttable"] = errors.New("no /proc")
	if _, err := f.d.LibrariesInUse(); err == nil || !strings.Contains(err.Error(), "mount table") {
		t.Fatalf("LibrariesInUse with an unreadable mount table = %v, want an error naming it", err)
	}
}
