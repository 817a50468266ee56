package annotations

import (
	"errors"
	"path"
	"reflect"
	"strings"
	"testing"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// FuzzParseVolume feeds arbitrary annotation keys and values to the manual volume parser.
// Properties: it never panics; every error is an *Error naming the annotation; everything it
// accepts is well-formed (DNS-label name, clean absolute mount path, valid library references,
// valid hostdir entry) and survives a Format/ParseVolume round trip unchanged.
func FuzzParseVolume(f *testing.F) {
	seeds := [][2]string{
		{"tracer", "libraries=java; mountPath=/datadog-lib"},
		{"t", "libraries=java:v1.45.0,python:sha256:" + strings.Repeat("a", 64) + "; mountPath=/dd; containers=app,worker; readOnly=true"},
		{"otel", "libraries=ghcr.io/open-telemetry/autoinstrumentation-java:2.10.0; source=/; mountPath=/otel"},
		{"sock", "hostdir=datadog-apm-socket; mountPath=/var/run/datadog"},
		{"x", "hostdir=../../etc; mountPath=/a/../b"},
		{"x", ";;=;libraries==,;mountPath=/\x00"},
		{"", "libraries=java"},
	}
	for _, s := range seeds {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, name, value string) {
		key := VolumePrefix + name
		v, err := ParseVolume(key, value)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Annotation != key {
				t.Fatalf("error %v does not name annotation %q", err, key)
			}
			return
		}
		if v.Name != name || len(name) == 0 || len(name) > maxVolumeName {
			t.Fatalf("accepted volume name %q from key suffix %q", v.Name, name)
		}
		if (v.HostDir == "") == (len(v.Libraries) == 0) {
			t.Fatalf("accepted a volume that is not exactly one kind: %+v", v)
		}
		if v.HostDir != "" && volumeattrs.ValidateEntryName(v.HostDir) != nil {
			t.Fatalf("accepted hostdir %q", v.HostDir)
		}
		for _, l := range v.Libraries {
			ref := l.Image
			if ref == "" {
				if !libref.IsLanguage(l.Language) {
					t.Fatalf("accepted language %q", l.Language)
				}
				if l.Version == "" {
					continue
				}
				ref = libref.Image(libref.DefaultRegistry, libref.PackageName(l.Language), l.Version)
			}
			if _, err := libref.Parse(ref); err != nil {
				t.Fatalf("accepted library %+v: %v", l, err)
			}
		}
		if v.MountPath != "" && (!path.IsAbs(v.MountPath) || path.Clean(v.MountPath) != v.MountPath || v.MountPath == "/") {
			t.Fatalf("accepted mount path %q", v.MountPath)
		}
		k2, v2 := v.Format()
		again, err := ParseVolume(k2, v2)
		if err != nil {
			t.Fatalf("Format gave %q=%q, which does not parse: %v", k2, v2, err)
		}
		if !reflect.DeepEqual(again, v) {
			t.Fatalf("round trip changed the volume:\n%+v\n%+v", v, again)
		}
	})
}
