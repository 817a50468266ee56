package volumeattrs

import (
	"path"
	"strings"
	"testing"
)

// FuzzParse checks the invariants that keep attributes away from host paths: whatever Parse
// accepts has no path that escapes, no mount option separators, and re-encodes to itself.
func FuzzParse(f *testing.F) {
	f.Add("library", "r.local/a:v1", "/datadog-init/package", "opt/x", "")
	f.Add("hostdir", "", "", "", "data")
	f.Add("preload", "", "", "", "")
	f.Add("library", "r.local/a:v1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "/a/../b", "../x", "")
	f.Fuzz(func(t *testing.T, typ, image, source, target, name string) {
		attrs := map[string]string{"type": typ}
		if image != "" {
			attrs["library.0.image"] = image
		}
		if source != "" {
			attrs["library.0.source"] = source
		}
		if target != "" {
			attrs["library.0.target"] = target
		}
		if name != "" {
			attrs["name"] = name
		}
		spec, err := Parse(attrs)
		if err != nil {
			if _, ok := err.(*Error); !ok {
				t.Fatalf("error of type %T", err)
			}
			return
		}
		if spec.HostDir != "" && strings.ContainsAny(spec.HostDir, "/\x00") {
			t.Fatalf("hostdir entry %q looks like a path", spec.HostDir)
		}
		for _, l := range spec.Libraries {
			if !path.IsAbs(l.Source) || path.Clean(l.Source) != l.Source {
				t.Fatalf("source %q is not clean and absolute", l.Source)
			}
			if path.IsAbs(l.Target) || l.Target == ".." || strings.HasPrefix(l.Target, "../") || (l.Target != "" && path.Clean(l.Target) != l.Target) {
				t.Fatalf("target %q escapes the volume", l.Target)
			}
			if strings.ContainsAny(l.Source+l.Target, ",:") {
				t.Fatalf("mount option separator in %q %q", l.Source, l.Target)
			}
		}
		again, err := Parse(spec.Attributes())
		if err != nil {
			t.Fatalf("re-parse of %v: %v", spec.Attributes(), err)
		}
		if spec.Kind != again.Kind || len(spec.Libraries) != len(again.Libraries) {
			t.Fatalf("round trip changed %+v into %+v", spec, again)
		}
	})
}

// FuzzParseWritableLimit checks that whatever writableLimit Parse accepts is a whole number of
// bytes of at least MinWritableLimit, and that Attributes writes it back unchanged.
func FuzzParseWritableLimit(f *testing.F) {
	for _, s := range []string{"64Mi", "1Gi", "500M", "1048576", "1.5Gi", "1e9", "0", "-1Mi", "1500m", "9Ei", "0x10"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, limit string) {
		spec, err := Parse(map[string]string{"type": "library", "library.0.image": "r.local/a:v1", KeyWritableLimit: limit})
		if err != nil {
			if _, ok := err.(*Error); !ok {
				t.Fatalf("error of type %T", err)
			}
			return
		}
		if spec.WritableLimit < MinWritableLimit {
			t.Fatalf("%q parsed to %d bytes, below the minimum", limit, spec.WritableLimit)
		}
		again, err := Parse(spec.Attributes())
		if err != nil {
			t.Fatalf("re-parse of %v: %v", spec.Attributes(), err)
		}
		if again.WritableLimit != spec.WritableLimit {
			t.Fatalf("%q: %d bytes became %d through %q", limit, spec.WritableLimit, again.WritableLimit, spec.Attributes()[KeyWritableLimit])
		}
	})
}
