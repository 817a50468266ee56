package driver

import "testing"

func TestParseTarget(t *testing.T) {
	const pods = "/var/lib/kubelet/pods"
	tests := []struct {
		name, path, wantParent string
	}{
		{"inline volume", pods + "/0b7c1e2a-1111/volumes/kubernetes.io~csi/apm/mount", "0b7c1e2a-1111/volumes/kubernetes.io~csi/apm"},
		{"persistent volume (PV name)", pods + "/0b7c1e2a-1111/volumes/kubernetes.io~csi/pvc-8f2e/mount", "0b7c1e2a-1111/volumes/kubernetes.io~csi/pvc-8f2e"},
		{"static pod uid", pods + "/6b8e3f1c9d2a4e5f/volumes/kubernetes.io~csi/datadog-apm/mount", "6b8e3f1c9d2a4e5f/volumes/kubernetes.io~csi/datadog-apm"},
		{"empty", "", ""},
		{"relative", "pods/u/volumes/kubernetes.io~csi/v/mount", ""},
		{"pods dir itself", pods, ""},
		{"another kubelet dir", "/var/lib/kubelet/plugins/u/volumes/kubernetes.io~csi/v/mount", ""},
		{"prefix without a separator", pods + "x/u/volumes/kubernetes.io~csi/v/mount", ""},
		{"volume dir, not mount", pods + "/u/volumes/kubernetes.io~csi/v", ""},
		{"below mount", pods + "/u/volumes/kubernetes.io~csi/v/mount/x", ""},
		{"other leaf", pods + "/u/volumes/kubernetes.io~csi/v/target", ""},
		{"other plugin", pods + "/u/volumes/kubernetes.io~empty-dir/v/mount", ""},
		{"not volumes", pods + "/u/volume-subpaths/kubernetes.io~csi/v/mount", ""},
		{"dotdot as volume", pods + "/u/volumes/kubernetes.io~csi/../mount", ""},
		{"dotdot as uid", pods + "/../volumes/kubernetes.io~csi/v/mount", ""},
		{"dot as uid", pods + "/./volumes/kubernetes.io~csi/v/mount", ""},
		{"dotdot after mount", pods + "/u/volumes/kubernetes.io~csi/v/mount/..", ""},
		{"double slash", pods + "/u//volumes/kubernetes.io~csi/v/mount", ""},
		{"trailing slash", pods + "/u/volumes/kubernetes.io~csi/v/mount/", ""},
		{"escape and return", pods + "/u/volumes/kubernetes.io~csi/v/../v/mount", ""},
		{"NUL", pods + "/u\x00/volumes/kubernetes.io~csi/v/mount", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := parseTarget(pods, tt.path)
			if ok != (tt.wantParent != "") || got != tt.wantParent {
				t.Fatalf("parseTarget(%q) = %q, %t; want %q", tt.path, got, ok, tt.wantParent)
			}
		})
	}
}
