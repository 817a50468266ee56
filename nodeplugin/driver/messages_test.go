package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// The message of a failed publish or unpublish is what kubelet shows in the pod's events, after
// "MountVolume.SetUp failed for volume "<name>"". It says each fact once: the entry, the size,
// the target, the retry hint; and not the volume, which kubelet's event names.
func TestFailedCallMessagesSayEachFactOnce(t *testing.T) {
	const volumeID = "csi-0123abcd"
	publish := func(attrs map[string]string, podReadOnly bool) func(*fixture) error {
		return func(f *fixture) error {
			req := f.publishReq(volumeID, f.target("pod-a"), attrs)
			req.Readonly = podReadOnly
			_, err := f.d.NodePublishVolume(context.Background(), req)
			return err
		}
	}
	tests := []struct {
		name string
		opts []fixtureOption
		call func(*fixture) error
		code codes.Code
		// once are facts the message says exactly once; absent, facts it leaves to kubelet's
		// event or does not know.
		once, absent []string
	}{
		{
			name: "a socket type mapped to an undeclared entry names the entry once",
			call: publish(map[string]string{"type": volumeattrs.TypeDSDSocket}, false),
			code: codes.InvalidArgument, once: []string{"dsd-undeclared", "DSDSocket", "--datadog-socket-entry"},
		},
		{
			name: "a socket type mapped to a read-only entry names the entry once",
			opts: []fixtureOption{withSocketEntry("ro-data")},
			call: publish(map[string]string{"type": volumeattrs.TypeDSDSocket}, false),
			code: codes.FailedPrecondition, once: []string{`"ro-data"`, "--datadog-socket-entry", "read-only on this node"},
			absent: []string{"volume vol", volumeID},
		},
		{
			name: "a socket type refused to the pod's namespace names the entry once",
			call: publish(podAttrs(volumeattrs.TypeAPMSocketDirectory, "", "team-b", "default"), false),
			code: codes.PermissionDenied, once: []string{"team-a-socket", "--datadog-socket-entry"},
		},
		{
			name: "a refused service account is said once",
			call: publish(podAttrs("hostdir", "team-a-writer", "team-a", "default"), false),
			code: codes.PermissionDenied, once: []string{"team-a-writer", "default"},
		},
		{
			name: "a publish without pod identity says once that kubelet did not send it",
			call: publish(podAttrs("hostdir", "team-a", "", ""), false),
			code: codes.PermissionDenied, once: []string{"kubelet", `"team-a"`},
		},
		{
			name: "a read-only entry asked writable names the entry once",
			call: publish(map[string]string{"type": "hostdir", "name": "ro-data", "readOnly": "false"}, false),
			code: codes.InvalidArgument, once: []string{"ro-data", "read-only"},
		},
		{
			name: "a read-only entry without the pod's readOnly leaves the volume to kubelet's event",
			call: publish(hostdirAttrs("ro-data"), false),
			code: codes.FailedPrecondition, once: []string{"ro-data", "read-only on this node"},
			absent: []string{"volume vol", volumeID},
		},
		{
			name: "a writable limit above the maximum says each size once",
			opts: []fixtureOption{withWritableLimits(0, 512<<20)},
			call: publish(map[string]string{"type": "library", volumeattrs.LibraryKey(0, "image"): "r.local/a:v1", volumeattrs.KeyWritableLimit: "2Gi"}, false),
			code: codes.InvalidArgument, once: []string{"2Gi", "2147483648", "512Mi", "536870912", "--max-writable-layer"},
		},
		{
			name: "a failed writable layer leaves the volume to kubelet's event and says the target once",
			call: func(f *fixture) error {
				f.wl.PrepareErr = errors.New("ENOSPC")
				return publish(libraryAttrs("r.local/a:v1"), false)(f)
			},
			code: codes.Internal, once: []string{f0target, "writable layer", "ENOSPC"},
			absent: []string{volumeID, "256Mi"},
		},
		{
			name: "a target that is a non-empty directory says once that it is not empty",
			call: func(f *fixture) error {
				if err := os.MkdirAll(filepath.Join(f.target("pod-a"), "data"), 0o755); err != nil {
					return err
				}
				return publish(hostdirAttrs("apm-socket"), false)(f)
			},
			code: codes.FailedPrecondition, once: []string{f0target, "not empty"},
		},
		{
			name: "an unpublish that finds data in the target says the target once",
			call: func(f *fixture) error {
				if err := os.MkdirAll(filepath.Join(f.target("pod-a"), "data"), 0o755); err != nil {
					return err
				}
				return unpublish(f, volumeID, f.target("pod-a"))
			},
			code: codes.Internal, once: []string{f0target, "non-empty"},
		},
		{
			name: "an unpublish whose unmount fails says the target once",
			call: func(f *fixture) error {
				if err := publish(hostdirAttrs("data"), false)(f); err != nil {
					return err
				}
				f.m.Errors["unmount"] = errors.New("EBUSY")
				_, err := f.d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: f.target("pod-a")})
				return err
			},
			// The fake mounter's error names the target itself, as "unmount <target>".
			code: codes.Internal, once: []string{"unmounting " + f0target, "EBUSY"},
			absent: []string{volumeID},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, tt.opts...)
			err := tt.call(f)
			if status.Code(err) != tt.code {
				t.Fatalf("code = %v (%v), want %v", status.Code(err), err, tt.code)
			}
			msg := status.Convert(err).Message()
			for _, fact := range tt.once {
				fact = strings.ReplaceAll(fact, f0target, f.target("pod-a"))
				if n := strings.Count(msg, fact); n != 1 {
					t.Errorf("the message says %q %d times, want once: %s", fact, n, msg)
				}
			}
			for _, fact := range tt.absent {
				if strings.Contains(msg, fact) {
					t.Errorf("the message says %q: %s", fact, msg)
				}
			}
		})
	}
}

// f0target stands for the fixture's target of pod-a in the facts of a case.
const f0target = "<target>"
