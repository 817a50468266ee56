package library

import (
	"encoding/json"
	"testing"
)

// TestLayerJSONIsTheJournalFormat: the node plugin's state journal stores layers as JSON; the
// field names are its on-disk format.
func TestLayerJSONIsTheJournalFormat(t *testing.T) {
	for _, tt := range []struct {
		layer Layer
		want  string
	}{
		{Layer{Dir: "/s/images/a/rootfs", Digest: "sha256:aa"}, `{"dir":"/s/images/a/rootfs","digest":"sha256:aa"}`},
		{Layer{Dir: "/s/generated/g/root"}, `{"dir":"/s/generated/g/root"}`},
	} {
		b, err := json.Marshal(tt.layer)
		if err != nil || string(b) != tt.want {
			t.Errorf("json.Marshal(%+v) = %s, %v; want %s", tt.layer, b, err, tt.want)
		}
	}
}

// TestInUseIgnoresTheEmptyPath: an empty element (as between the "::" of an overlay's lower
// dirs) is not a dir; added as one, it would name nothing, or worse, a relative path.
func TestInUseIgnoresTheEmptyPath(t *testing.T) {
	s := NewInUse("/a", "", "sha256:x")
	s.Add("/b")
	s.Add("")
	if len(s) != 3 || !s.Has("/a") || !s.Has("/b") || !s.Has("sha256:x") || s.Has("") {
		t.Fatalf("set = %v, want /a, /b and sha256:x", s)
	}
}
