package volumeattrs

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/apm-csi/apm-csi/shared/libref"
)

const digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		attrs   map[string]string
		want    *Spec
		wantErr string // substring; "" means success
	}{
		{
			name:  "hostdir",
			attrs: map[string]string{"type": "hostdir", "name": "apm-socket", "csi.storage.k8s.io/pod.name": "p"},
			want:  &Spec{Kind: KindHostDir, Type: "hostdir", HostDir: "apm-socket"},
		},
		{
			name:  "hostdir read-only",
			attrs: map[string]string{"type": "hostdir", "name": "data", "readOnly": "true"},
			want:  &Spec{Kind: KindHostDir, Type: "hostdir", HostDir: "data", ReadOnly: true},
		},
		{name: "no type", attrs: map[string]string{"name": "x"}, wantErr: `"type" is missing`},
		{name: "unknown type", attrs: map[string]string{"type": "hostPath"}, wantErr: "unknown volume type"},
		{name: "hostdir without name", attrs: map[string]string{"type": "hostdir"}, wantErr: "needs the name"},
		{name: "hostdir path as name", attrs: map[string]string{"type": "hostdir", "name": "/etc"}, wantErr: "not a path"},
		{name: "hostdir dotdot", attrs: map[string]string{"type": "hostdir", "name": ".."}, wantErr: "not a path"},
		{name: "hostdir NUL", attrs: map[string]string{"type": "hostdir", "name": "a\x00b"}, wantErr: "not a path"},
		{name: "hostdir upper case", attrs: map[string]string{"type": "hostdir", "name": "Data"}, wantErr: "lower-case"},
		{name: "bad readOnly", attrs: map[string]string{"type": "hostdir", "name": "d", "readOnly": "yes"}, wantErr: `"true" or "false"`},
		{name: "unknown key", attrs: map[string]string{"type": "hostdir", "name": "d", "path": "/etc"}, wantErr: `"path"`},
		{
			name:  "datadog socket",
			attrs: map[string]string{"type": "APMSocket"},
			want:  &Spec{Kind: KindHostDir, Type: "APMSocket"},
		},
		{
			name: "injector layout",
			attrs: map[string]string{
				"type":             "library",
				"library.0.image":  "registry.local/apm-inject:0.52.0",
				"library.0.source": "/opt/datadog-packages/datadog-apm-inject",
				"library.0.target": "opt/datadog-packages/datadog-apm-inject",
				"library.1.image":  "registry.local/dd-lib-python-init:v3@" + digest,
				"library.1.target": "opt/datadog/apm/library/python/",
				"preload":          libref.LauncherPath,
			},
			want: &Spec{Kind: KindLibrary, Type: "library", Preload: libref.LauncherPath, Libraries: []Library{
				{Image: "registry.local/apm-inject:0.52.0", Source: libref.InjectorSource, Target: libref.InjectorTarget},
				{Image: "registry.local/dd-lib-python-init:v3@" + digest, Source: libref.LibrarySource, Target: "opt/datadog/apm/library/python"},
			}},
		},
		{
			name:  "direct layout",
			attrs: map[string]string{"type": "library", "library.0.image": "registry.local/dd-lib-java-init:v1", "library.0.target": "."},
			want:  &Spec{Kind: KindLibrary, Type: "library", Libraries: []Library{{Image: "registry.local/dd-lib-java-init:v1", Source: libref.LibrarySource}}},
		},
		{
			name:  "library with a writable limit",
			attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "writableLimit": "64Mi"},
			want:  &Spec{Kind: KindLibrary, Type: "library", WritableLimit: 64 << 20, Libraries: []Library{{Image: "r.local/a:v1", Source: libref.LibrarySource}}},
		},
		{
			name:  "datadog library with a writable limit in decimal units",
			attrs: map[string]string{"type": "DatadogLibrary", DDKeyPackage: "dd-lib-python-init", DDKeyVersion: "v3", "writableLimit": "500M"},
			want: &Spec{Kind: KindLibrary, Type: "DatadogLibrary", WritableLimit: 500_000_000, Libraries: []Library{
				{Image: libref.Image(libref.DefaultRegistry, "dd-lib-python-init", "v3"), Source: libref.LibrarySource}}},
		},
		{name: "writable limit not a quantity", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "writableLimit": "lots"}, wantErr: "such as 64Mi"},
		{name: "writable limit fraction of a byte", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "writableLimit": "1500m"}, wantErr: "whole number of bytes"},
		{name: "writable limit too small", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "writableLimit": "4Ki"}, wantErr: "at least 1Mi"},
		{name: "writable limit negative", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "writableLimit": "-1Gi"}, wantErr: "at least 1Mi"},
		{name: "writable limit in exponent notation (a huge power of ten costs minutes to compare)", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "writableLimit": "1e12700019"}, wantErr: "without exponent notation"},
		{name: "writable limit overflows", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "writableLimit": "100Ei"}, wantErr: "at most 1Pi"},
		{name: "writable limit on a hostdir", attrs: map[string]string{"type": "hostdir", "name": "d", "writableLimit": "64Mi"}, wantErr: "unknown attribute"},
		{name: "library none", attrs: map[string]string{"type": "library"}, wantErr: "at least one library"},
		{name: "library gap", attrs: map[string]string{"type": "library", "library.1.image": "r.local/a:v1"}, wantErr: "without gaps"},
		{name: "library bad index", attrs: map[string]string{"type": "library", "library.01.image": "r.local/a:v1"}, wantErr: "index"},
		{name: "library too many", attrs: map[string]string{"type": "library", "library.16.image": "r.local/a:v1"}, wantErr: "at most 16"},
		{name: "library bad field", attrs: map[string]string{"type": "library", "library.0.path": "/x"}, wantErr: "library.<index>.image"},
		{name: "library no tag", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a"}, wantErr: "no tag or digest"},
		{name: "library relative source", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "library.0.source": "x"}, wantErr: "absolute"},
		{name: "library source dotdot", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "library.0.source": "/a/../../etc"}, wantErr: ".."},
		{name: "library absolute target", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "library.0.target": "/etc"}, wantErr: "relative"},
		{name: "library target dotdot", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "library.0.target": "a/../../b"}, wantErr: ".."},
		{name: "library target colon", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "library.0.target": "a:b"}, wantErr: "':'"},
		{name: "library target comma", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "library.0.target": "a,upperdir=/x"}, wantErr: "','"},
		{
			name:  "libraries merged at the root (direct layout, several languages)",
			attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "library.1.image": "r.local/b:v1"},
			want: &Spec{Kind: KindLibrary, Type: "library", Libraries: []Library{
				{Image: "r.local/a:v1", Source: libref.LibrarySource}, {Image: "r.local/b:v1", Source: libref.LibrarySource}}},
		},
		{name: "library bad preload", attrs: map[string]string{"type": "library", "library.0.image": "r.local/a:v1", "preload": "lib.so"}, wantErr: "absolute"},
		{
			name:  "preload default",
			attrs: map[string]string{"type": "preload"},
			want:  &Spec{Kind: KindPreload, Type: "preload", Preload: libref.LauncherPath},
		},
		{name: "preload multi-line", attrs: map[string]string{"type": "preload", "preload": "/a.so\n/b.so"}, wantErr: "control character"},
		{
			name:  "datadog injector preload",
			attrs: map[string]string{"type": "DatadogInjectorPreload", "dd.csi.datadog.com/future": "x"},
			want:  &Spec{Kind: KindPreload, Type: "DatadogInjectorPreload", Preload: libref.LauncherPath, ReadOnly: true},
		},
		{
			name: "datadog library package",
			attrs: map[string]string{"type": "DatadogLibrary", DDKeyPackage: "dd-lib-python-init",
				DDKeyRegistry: "registry.local/datadog", DDKeyVersion: "v3.1.0"},
			want: &Spec{Kind: KindLibrary, Type: "DatadogLibrary", Libraries: []Library{
				{Image: "registry.local/datadog/dd-lib-python-init:v3.1.0", Source: libref.LibrarySource}}},
		},
		{
			name:  "datadog injector by digest, default registry",
			attrs: map[string]string{"type": "DatadogLibrary", DDKeyPackage: "apm-inject", DDKeyVersion: digest},
			want: &Spec{Kind: KindLibrary, Type: "DatadogLibrary", Libraries: []Library{
				{Image: "gcr.io/datadoghq/apm-inject@" + digest, Source: libref.InjectorSource}}},
		},
		{
			name:  "datadog image form",
			attrs: map[string]string{"type": "DatadogLibrary", DDKeyImage: "registry.local/apm-inject:1", DDKeySource: "/opt/datadog-packages/datadog-apm-inject"},
			want: &Spec{Kind: KindLibrary, Type: "DatadogLibrary", Libraries: []Library{
				{Image: "registry.local/apm-inject:1", Source: libref.InjectorSource}}},
		},
		{name: "datadog unknown package", attrs: map[string]string{"type": "DatadogLibrary", DDKeyPackage: "dd-lib-cobol-init", DDKeyVersion: "v1"}, wantErr: "unknown package"},
		{name: "datadog no version", attrs: map[string]string{"type": "DatadogLibrary", DDKeyPackage: "apm-inject"}, wantErr: "needs a version"},
		{name: "datadog foreign key", attrs: map[string]string{"type": "DatadogLibrary", DDKeyPackage: "apm-inject", DDKeyVersion: "1", "name": "x"}, wantErr: "unknown attribute"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.attrs)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("Parse() = %+v, want error containing %q", got, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse() error = %q, want it to contain %q", err, tt.wantErr)
				}
				var ve *Error
				if !errors.As(err, &ve) {
					t.Fatalf("Parse() error is %T, want *Error", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse() error = %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Parse() = %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestAttributesRoundTrip(t *testing.T) {
	specs := []*Spec{
		{Kind: KindHostDir, Type: TypeHostDir, HostDir: "data", ReadOnly: true},
		{Kind: KindPreload, Type: TypePreload, Preload: libref.LauncherPath},
		{Kind: KindPreload, Type: TypePreload, Preload: "/usr/lib/other.so"},
		{Kind: KindLibrary, Type: TypeLibrary, Preload: libref.LauncherPath, Libraries: []Library{
			{Image: "r.local/apm-inject:1", Source: libref.InjectorSource, Target: libref.InjectorTarget},
			{Image: "r.local/dd-lib-js-init:v5", Source: libref.LibrarySource, Target: libref.LanguageTarget("js")},
		}},
	}
	for _, s := range specs {
		got, err := Parse(s.Attributes())
		if err != nil {
			t.Fatalf("Parse(%v): %v", s.Attributes(), err)
		}
		if !reflect.DeepEqual(got, s) {
			t.Fatalf("round trip changed the spec:\n got %+v\nwant %+v", got, s)
		}
	}
}

func TestRedact(t *testing.T) {
	in := map[string]string{"csi.storage.k8s.io/serviceAccount.tokens": `{"aud":{"token":"x"}}`, "type": "hostdir"}
	out := Redact(in)
	if out["csi.storage.k8s.io/serviceAccount.tokens"] != "<redacted>" || out["type"] != "hostdir" {
		t.Fatalf("Redact() = %v", out)
	}
	if in["csi.storage.k8s.io/serviceAccount.tokens"] == "<redacted>" {
		t.Fatal("Redact() modified its input")
	}
}
