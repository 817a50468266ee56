package deploy

import (
	"testing"
)

// keptLayerFlags are the node plugin flags of the chart values node.writableLayer.keep,
// .keptGrace and .maxKeptBytes.
var keptLayerFlags = []string{"keep-writable-layers", "kept-writable-layer-grace", "max-kept-writable-bytes"}

// TestKeptWritableLayerValuesRenderFlags: the chart renders the kept writable layer flags only
// when the values are set (the ci/keep-writable-layers values), with their values as given,
// and no install variant without them gets any (a kept layer is opt-in).
// TestFlagsMatchBinaries and TestNodePluginStartsWithRenderedFlags check the same command
// lines against the binary.
func TestKeptWritableLayerValuesRenderFlags(t *testing.T) {
	want := map[string]string{
		"keep-writable-layers":      "true",
		"kept-writable-layer-grace": "30m",
		"max-kept-writable-bytes":   "10Gi",
		"writable-layer-mechanism":  "project-quota",
	}
	seen := false
	forEachVariant(t, func(t *testing.T, v Variant, s Set) {
		c := install(t, s).NodeContainer
		if v.Name != "helm-keep-writable-layers" {
			for _, f := range keptLayerFlags {
				if vs := FlagValues(t, c, f); len(vs) > 0 {
					t.Errorf("--%s=%v rendered without the keep values", f, vs)
				}
			}
			return
		}
		seen = true
		for f, w := range want {
			if got := FlagValue(t, c, f, ""); got != w {
				t.Errorf("--%s=%q, want %q", f, got, w)
			}
		}
	})
	if !seen {
		t.Error("no helm-keep-writable-layers variant (deploy/helm/apm-csi/ci/keep-writable-layers-values.yaml)")
	}
}
