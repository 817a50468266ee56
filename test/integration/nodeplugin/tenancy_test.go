package nodeplugin

import (
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// kubeletAttrs is what kubelet sends for a pod of namespace ns running as service account sa:
// the podInfoOnMount keys, which kubelet writes itself over anything the pod put there.
func kubeletAttrs(attrs map[string]string, pod, ns, sa string) map[string]string {
	out := maps.Clone(attrs)
	out["csi.storage.k8s.io/ephemeral"] = "true"
	out["csi.storage.k8s.io/pod.name"] = pod
	out["csi.storage.k8s.io/pod.namespace"] = ns
	out["csi.storage.k8s.io/pod.uid"] = pod + "-uid"
	out["csi.storage.k8s.io/serviceAccount.name"] = sa
	return out
}

// TestHostDirOfAnotherTeamIsRefused is the attack a hostdir allowlist without tenancy allows: a
// pod of namespace team-b writes an inline volume naming team A's entry (no webhook involved)
// and gets team A's host directory mounted. The plugin must refuse it with PermissionDenied,
// mount nothing and leave no target, while team A's own pod still gets its directory.
func TestHostDirOfAnotherTeamIsRefused(t *testing.T) {
	p := startPlugin(t)
	writeFile(t, filepath.Join(p.host, "team-a", "secret"), "team A's data")
	teamA := map[string]string{"type": "hostdir", "name": "team-a"}

	attacks := []struct {
		name     string
		attrs    map[string]string
		contains string
	}{
		{"pod of another namespace", kubeletAttrs(teamA, "thief", "team-b", "app"), "namespace team-b is not allowed"},
		{"other service account of the same namespace", kubeletAttrs(teamA, "thief", "team-a", "default"), "service account team-a/default is not allowed"},
		{"publish without pod info", teamA, "the pod's namespace is unknown"},
	}
	for i, a := range attacks {
		t.Run(a.name, func(t *testing.T) {
			target := p.Target("thief-"+string(rune('a'+i)), "loot")
			err := p.Publish("csi-thief", target, a.attrs, false)
			if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), a.contains) {
				t.Fatalf("publish of team A's entry (%s) = %v, want PermissionDenied containing %q", a.name, err, a.contains)
			}
			if n := nodeplugintest.CountMounts(t, target); n != 0 {
				t.Fatalf("refused publish left %d mounts at %s", n, target)
			}
			if _, err := os.ReadFile(filepath.Join(target, "secret")); err == nil {
				t.Fatal("the other team's pod can read team A's file")
			}
			if _, err := os.Lstat(target); !os.IsNotExist(err) {
				t.Fatalf("refused publish left its target: %v", err)
			}
		})
	}

	own := p.Target("team-a-app", "data")
	p.MustPublish("csi-own", own, kubeletAttrs(teamA, "app", "team-a", "app"), false)
	if got := readFile(t, filepath.Join(own, "secret")); got != "team A's data" {
		t.Fatalf("team A's pod reads %q", got)
	}
	p.MustUnpublish("csi-own", own)
}
