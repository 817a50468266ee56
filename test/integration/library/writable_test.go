package library

import (
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// fillLimit is the writableLimit of the volume the tests fill: small, so that filling is quick.
const fillLimit = 8 << 20

// TestWritableLayerStopsAPodAtItsLimit publishes two writable library volumes through the real
// driver, with the state dir on a filesystem of its own, fills one from an unprivileged
// process (as a pod's process would) and checks that the writer gets ENOSPC or EDQUOT at about
// its volume's writableLimit, that the other volume still takes writes, that the node's
// filesystem did not grow beyond the limit, and that unpublish frees everything (no mount left
// in the state dir, project quota cleared).
func TestWritableLayerStopsAPodAtItsLimit(t *testing.T) {
	for _, tc := range []struct {
		name string
		// features and options of the state dir's ext4
		features, options string
		want              writablelayer.Mechanism
	}{
		{name: "project quota", features: "quota,project", options: "prjquota", want: writablelayer.ProjectQuota},
		{name: "tmpfs on a filesystem without project quotas", want: writablelayer.Tmpfs},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := libimages.Start(t)
			stateFS := nodeplugintest.Ext4(t, 256, tc.features, tc.options)
			state := filepath.Join(stateFS, "state")
			p := startPlugin(t, options{registry: reg, stateDir: state})
			if m := p.Writable.Mechanism(); m != tc.want {
				t.Fatalf("writable layers by %s (%s), want %s", m, p.Writable.Reason(), tc.want)
			}
			vol := pushInjectorVolume(t, reg, "1.0.0")
			limited := vol.attrs()
			limited["writableLimit"] = "8Mi"
			full, other := p.Target("pod-full", "apm"), p.Target("pod-other", "apm")
			p.MustPublish("csi-full", full, nodeplugintest.Ephemeral(limited, "pod-full"), false)
			p.MustPublish("csi-other", other, nodeplugintest.Ephemeral(vol.attrs(), "pod-other"), false)
			var fullRec string
			for _, r := range p.Driver.Records() {
				if r.VolumeID == "csi-full" {
					fullRec = r.OverlayDir
					if r.WritableLimit != fillLimit || r.WritableLayer != string(tc.want) {
						t.Errorf("record: limit %d by %q", r.WritableLimit, r.WritableLayer)
					}
				}
			}
			var projectID uint32
			if tc.want == writablelayer.ProjectQuota {
				id, limit, _, err := writablelayer.ProjectLimits(fullRec)
				if err != nil || limit != fillLimit {
					t.Fatalf("project of %s: id %d, limit %d, %v", fullRec, id, limit, err)
				}
				projectID = id
			}

			// The pod sees its limit as the size of its volume (df).
			var st unix.Statfs_t
			if err := unix.Statfs(full, &st); err != nil {
				t.Fatal(err)
			}
			if size := int64(st.Blocks) * st.Bsize; size != fillLimit {
				t.Errorf("statfs of the volume says %d bytes, want the limit %d", size, fillLimit)
			}

			before := statfsUsed(t, stateFS)
			res := nodeplugintest.Fill(t, filepath.Join(full, "tracer.log"), 4*fillLimit)
			t.Logf("writer stopped after %d bytes of a %d limit: %s", res.Written, fillLimit, res.Err)
			if !res.IsOutOfSpace() {
				t.Fatalf("writer was not stopped by ENOSPC/EDQUOT: wrote %d bytes of a %d limit, error %q", res.Written, fillLimit, res.Err)
			}
			if res.Written > fillLimit || res.Written < fillLimit-fillLimit/8 {
				t.Errorf("writer stopped after %d bytes, want about the limit of %d", res.Written, fillLimit)
			}
			grew := statfsUsed(t, stateFS) - before
			if budget := int64(1 << 20); tc.want == writablelayer.ProjectQuota && grew > fillLimit+budget || tc.want == writablelayer.Tmpfs && grew > budget {
				t.Errorf("the state dir's filesystem grew by %d bytes for a %d limit (%s)", grew, fillLimit, tc.want)
			}
			// The library files are still readable in the full volume, and the other volume
			// (default limit) takes writes.
			if d := nodeplugintest.DiffTrees(nodeplugintest.ReadTree(t, other), vol.files()); d != "" {
				t.Fatalf("the other volume: %s", d)
			}
			if res := nodeplugintest.Fill(t, filepath.Join(other, "tracer.log"), 2<<20); res.Err != "" || res.Written != 2<<20 {
				t.Errorf("the other volume could not take 2 MiB: %+v", res)
			}

			p.MustUnpublish("csi-full", full)
			p.MustUnpublish("csi-other", other)
			p.assertNothingAllocated(t)
			// Only the library store's and the empty dir's own mounts (mounter.OwnMount) stay
			// while the plugin runs.
			var left []string
			for _, m := range nodeplugintest.MountsUnder(t, state) {
				if !strings.HasPrefix(m, p.store+" ") && !strings.HasPrefix(m, p.EmptyDir()+" ") {
					left = append(left, m)
				}
			}
			if len(left) != 0 {
				t.Errorf("mounts left in the state dir: %q", left)
			}
			if tc.want == writablelayer.ProjectQuota {
				if limit, used, err := writablelayer.ProjectQuotaOf(stateFS, projectID); err != nil || limit != 0 || used != 0 {
					t.Errorf("project %d after unpublish: limit %d, used %d, %v; want both 0", projectID, limit, used, err)
				}
			}
			if grew := statfsUsed(t, stateFS) - before; grew > 256<<10 {
				t.Errorf("the state dir's filesystem holds %d bytes more after unpublish", grew)
			}
		})
	}
}

// TestWritableLimitAboveTheNodeMaximumIsRefused: a volume asking for more than
// --max-writable-layer fails with InvalidArgument naming both sizes and the flag, and nothing
// is left allocated.
func TestWritableLimitAboveTheNodeMaximumIsRefused(t *testing.T) {
	reg := libimages.Start(t)
	p := startPlugin(t, options{registry: reg, defaultWritable: 16 << 20, maxWritable: 64 << 20})
	vol := pushInjectorVolume(t, reg, "1.0.0")
	attrs := vol.attrs()
	attrs["writableLimit"] = "100Mi"
	reg.ResetCounts()
	target := p.Target("pod-big", "apm")
	err := p.Publish("csi-big", target, nodeplugintest.Ephemeral(attrs, "pod-big"), false)
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("publish = %v, want InvalidArgument", err)
	}
	for _, want := range []string{"100Mi (104857600 bytes)", "64Mi (67108864 bytes)", "--max-writable-layer"} {
		if !strings.Contains(status.Convert(err).Message(), want) {
			t.Errorf("message %q does not say %q", status.Convert(err).Message(), want)
		}
	}
	p.assertNothingAllocated(t)
	if n := len(reg.Requests()); n != 0 {
		t.Errorf("a refused volume made %d registry requests", n)
	}
	// At the maximum it is served.
	attrs["writableLimit"] = "64Mi"
	p.MustPublish("csi-big", target, nodeplugintest.Ephemeral(attrs, "pod-big"), false)
	p.MustUnpublish("csi-big", target)
	p.assertNothingAllocated(t)
}
