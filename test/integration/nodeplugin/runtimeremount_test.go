package nodeplugin

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// runtimeBind does to a published target what runc 1.2 and newer do for a container mount
// whose volumeMount is not readOnly: bind-mount it into the container's root and remount that
// new bind read-write. It returns the container-side path.
func runtimeBind(t *testing.T, target string, file bool) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "in-container")
	if file {
		if err := os.WriteFile(dst, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	} else if err := os.Mkdir(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(target, dst, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s: %v", target, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dst, unix.MNT_DETACH) })
	// The remount itself succeeds for a bind and for an overlay alike: it only changes the
	// new bind's per-mount flag.
	if err := unix.Mount("", dst, "", unix.MS_REMOUNT|unix.MS_BIND, ""); err != nil {
		t.Fatalf("remount the bind of %s read-write: %v", target, err)
	}
	return dst
}

// A read-only library volume of a single layer is an overlay, whose superblock is read-only:
// a container runtime's read-write remount of its bind leaves it read-only, so a pod cannot
// write into the library layer that every pod on the node shares.
func TestReadOnlySingleLibraryStaysReadOnlyWhenTheRuntimeRemountsItWritable(t *testing.T) {
	p := startPlugin(t)
	target := p.Target("pod-a", "apm")
	p.MustPublish("csi-a", target, nodeplugintest.Ephemeral(map[string]string{"type": "library", "library.0.image": "registry.local/dd-lib-java-init:v1"}, "a"), true)
	t.Cleanup(func() { p.MustUnpublish("csi-a", target) })
	entries, err := os.ReadDir(target)
	if err != nil || len(entries) == 0 {
		t.Fatalf("the library volume is empty: %v %v", entries, err)
	}
	inContainer := runtimeBind(t, target, false)
	err = os.WriteFile(filepath.Join(inContainer, "planted"), []byte("x"), 0o644)
	if !errors.Is(err, unix.EROFS) {
		t.Fatalf("writing through the runtime's read-write bind of a read-only library volume: %v, want EROFS", err)
	}
	existing := filepath.Join(inContainer, entries[0].Name())
	if f, err := os.OpenFile(existing, os.O_WRONLY|os.O_APPEND, 0); !errors.Is(err, unix.EROFS) {
		if err == nil {
			f.Close()
		}
		t.Fatalf("opening a library file for writing through the runtime's bind: %v, want EROFS", err)
	}
}

// A read-only hostdir entry or the preload file is a read-only bind mount, which the runtime's
// remount would make writable; the node plugin serves them only to a pod whose CSI volume is
// readOnly (kubelet then never asks the runtime for a writable mount of it).
func TestReadOnlyBindVolumesNeedThePodsReadOnlyFlag(t *testing.T) {
	p := startPlugin(t)
	for _, tt := range []struct {
		name  string
		attrs map[string]string
	}{
		{"hostdir-ro-entry", map[string]string{"type": "hostdir", "name": "shared"}},
		{"preload", map[string]string{"type": "DatadogInjectorPreload"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			target := p.Target("pod-"+tt.name, tt.name)
			err := p.Publish("csi-"+tt.name, target, nodeplugintest.Ephemeral(tt.attrs, "app"), false)
			if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "readOnly: true") {
				// On a plugin that serves it, show what the runtime's remount does.
				if err == nil {
					inContainer := runtimeBind(t, target, tt.name == "preload")
					werr := os.WriteFile(filepath.Join(inContainer, "planted"), []byte("x"), 0o644)
					if tt.name == "preload" {
						werr = os.WriteFile(inContainer, []byte("/tmp/evil.so\n"), 0o644)
					}
					_ = unix.Unmount(inContainer, unix.MNT_DETACH)
					p.MustUnpublish("csi-"+tt.name, target)
					t.Fatalf("served without the pod's readOnly; after the runtime's read-write remount a write returns %v", werr)
				}
				t.Fatalf("publish without the pod's readOnly: %v, want FailedPrecondition asking for readOnly: true", err)
			}
			if left := p.MountsLeft(); len(left) != 0 {
				t.Fatalf("mounted after a refused publish: %q", left)
			}
			p.MustPublish("csi-"+tt.name, target, nodeplugintest.Ephemeral(tt.attrs, "app"), true)
			p.MustUnpublish("csi-"+tt.name, target)
		})
	}
}
