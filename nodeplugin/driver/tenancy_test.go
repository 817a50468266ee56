package driver

import (
	"log/slog"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
)

// podAttrs are the attributes kubelet sends for a pod in namespace ns running as sa; "" leaves
// a key out, as kubelet does when the CSIDriver has podInfoOnMount: false.
func podAttrs(typ, entry, ns, sa string) map[string]string {
	a := map[string]string{"type": typ, "csi.storage.k8s.io/pod.name": "app", "csi.storage.k8s.io/ephemeral": "true"}
	if entry != "" {
		a["name"] = entry
	}
	if ns != "" {
		a["csi.storage.k8s.io/pod.namespace"] = ns
	}
	if sa != "" {
		a["csi.storage.k8s.io/serviceAccount.name"] = sa
	}
	return a
}

func TestPublishHostDirEnforcesTenancy(t *testing.T) {
	tests := []struct {
		name     string
		attrs    map[string]string
		code     codes.Code
		contains []string
	}{
		{name: "allowed namespace", attrs: podAttrs("hostdir", "team-a", "team-a", "default"), code: codes.OK},
		{name: "other namespace", attrs: podAttrs("hostdir", "team-a", "team-b", "default"), code: codes.PermissionDenied,
			contains: []string{`hostdir entry "team-a" may not be used by pod team-b/app: namespace team-b`, "namespace team-b is not allowed; the entry allows namespaces team-a",
				"--hostdir NAME=PATH,namespaces=", "Helm value node.hostDirs[].namespaces"}},
		{name: "no pod info", attrs: podAttrs("hostdir", "team-a", "", ""), code: codes.PermissionDenied,
			contains: []string{"may not be used by this pod: the pod's namespace is unknown", "podInfoOnMount: true"}},
		{name: "allowed service account", attrs: podAttrs("hostdir", "team-a-writer", "team-a", "writer"), code: codes.OK},
		{name: "other service account", attrs: podAttrs("hostdir", "team-a-writer", "team-a", "default"), code: codes.PermissionDenied,
			contains: []string{"service account team-a/default is not allowed", "service accounts team-a/writer"}},
		{name: "service account unknown", attrs: podAttrs("hostdir", "team-a-writer", "team-a", ""), code: codes.PermissionDenied,
			contains: []string{"service account is unknown"}},
		{name: "same service account name in another namespace", attrs: podAttrs("hostdir", "team-a-writer", "team-b", "writer"), code: codes.PermissionDenied,
			contains: []string{"namespace team-b is not allowed"}},
		// A Datadog socket type maps to an entry, whose tenancy applies.
		{name: "socket type from other namespace", attrs: podAttrs("APMSocketDirectory", "", "team-b", "default"), code: codes.PermissionDenied,
			contains: []string{`volume type APMSocketDirectory (mapped to its hostdir entry by --datadog-socket-entry): hostdir entry "team-a-socket" may not be used`, "namespace team-b is not allowed"}},
		{name: "socket type from allowed namespace", attrs: podAttrs("APMSocketDirectory", "", "team-a", "default"), code: codes.OK},
		// An entry for every namespace needs no pod info.
		{name: "unrestricted entry without pod info", attrs: podAttrs("hostdir", "data", "", ""), code: codes.OK},
		{name: "unrestricted entry from any namespace", attrs: podAttrs("hostdir", "data", "anything", "x"), code: codes.OK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newRecorder()
			f := newFixture(t, withLogger(slog.New(h)))
			target := f.target("pod-" + strings.ReplaceAll(tt.name, " ", "-"))
			logged, err := callLogged(t, h, "/csi.v1.Node/NodePublishVolume", f.d.NodePublishVolume, f.publishReq("vol", target, tt.attrs))
			wantCode(t, err, tt.code, tt.contains...)
			if tt.code == codes.OK {
				if f.m.Len() != 1 {
					t.Fatalf("allowed publish made %d mounts", f.m.Len())
				}
				return
			}
			if m := f.m.Len(); m != 0 {
				t.Fatalf("refused publish left %d mounts", m)
			}
			if f.d.record(target) != nil {
				t.Fatal("refused publish left a record")
			}
			// The refusal is the call's one record, with the volume, the entry and who it allows.
			if len(logged) != 1 || logged[0].attrs["volumeID"] != "vol" || logged[0].attrs["entry"] == nil || logged[0].attrs["allowed"] == nil {
				t.Fatalf("want one record of the refused call with volumeID, entry and allowed; got %+v", logged)
			}
		})
	}
}
