package annotations

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestParseVolume(t *testing.T) {
	digest := "sha256:" + strings.Repeat("0", 64)
	tests := []struct {
		key, value string
		want       *Volume
		err        []string // fragments; nil means valid
	}{
		{key: "apm-csi.io/volume.tracer", value: "libraries=java; mountPath=/datadog-lib",
			want: &Volume{Name: "tracer", Libraries: []VolumeLibrary{{Language: "java"}}, MountPath: "/datadog-lib"}},
		{key: "apm-csi.io/volume.t", value: " libraries = java:v1.45.0 , python:" + digest + " ;mountPath=/dd; containers=app, worker ;readOnly=true; ",
			want: &Volume{Name: "t", Libraries: []VolumeLibrary{{Language: "java", Version: "v1.45.0"}, {Language: "python", Version: digest}},
				MountPath: "/dd", Containers: []string{"app", "worker"}, ReadOnly: true}},
		{key: "apm-csi.io/volume.otel", value: "libraries=ghcr.io/open-telemetry/autoinstrumentation-java:2.10.0; source=/; mountPath=/otel",
			want: &Volume{Name: "otel", Libraries: []VolumeLibrary{{Image: "ghcr.io/open-telemetry/autoinstrumentation-java:2.10.0"}}, Source: "/", MountPath: "/otel"}},
		{key: "apm-csi.io/volume.sock", value: "hostdir=datadog-apm-socket; mountPath=/var/run/datadog; readOnly=false",
			want: &Volume{Name: "sock", HostDir: "datadog-apm-socket", MountPath: "/var/run/datadog"}},
		{key: "apm-csi.io/volume.sock", value: "hostdir=dsd", want: &Volume{Name: "sock", HostDir: "dsd"}},

		{key: "apm-csi.io/volume", value: "hostdir=x", err: []string{"manual volumes are declared as apm-csi.io/volume.<name>"}},
		{key: "apm-csi.io/volume.Bad_Name", value: "hostdir=x", err: []string{`volume name "Bad_Name" is not a DNS label`}},
		{key: "apm-csi.io/volume." + strings.Repeat("a", 57), value: "hostdir=x", err: []string{"at most 56 characters"}},
		{key: "apm-csi.io/volume.v", value: "", err: []string{"either libraries or a host directory"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; hostdir=x", err: []string{"either libraries or a host directory"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java mountPath=/x", err: []string{`bad value "java mountPath=/x"`, "a library entry contains a space", "separate fields with ';'"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; mountpath=/x", err: []string{`unknown field "mountpath"`, "fix: use the fields libraries, hostdir"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; libraries=js", err: []string{"field libraries is given twice"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java,java; mountPath=/x", err: []string{"library listed twice"}},
		{key: "apm-csi.io/volume.v", value: "libraries=; mountPath=/x", err: []string{"no library listed"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java:v1+2", err: []string{`invalid version "v1+2"`}},
		{key: "apm-csi.io/volume.v", value: "libraries=registry.example.com/lib", err: []string{"names no tag or digest"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; source=/a", err: []string{"source applies to image entries"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; mountPath=relative", err: []string{"mount path must be absolute"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; mountPath=/", err: []string{"must not be the container's root"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; mountPath=/a/../etc", err: []string{"must be clean"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; mountPath=/a:b", err: []string{"must not contain ':'"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; containers=app", err: []string{"containers without mountPath mounts nothing"}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; mountPath=/x; containers=App", err: []string{`"App" is not a container name`}},
		{key: "apm-csi.io/volume.v", value: "libraries=java; mountPath=/x; readOnly=yes", err: []string{"readOnly must be true or false"}},
		{key: "apm-csi.io/volume.v", value: "hostdir=/var/run/datadog", err: []string{"it names an entry, not a path"}},
		{key: "apm-csi.io/volume.v", value: "hostdir=../x", err: []string{"names an entry, not a path"}},
		{key: "apm-csi.io/volume.v", value: "libraries=" + strings.Repeat("java:v1,", 1) + strings.Repeat("registry.example.com/a:1,", 1), want: &Volume{Name: "v",
			Libraries: []VolumeLibrary{{Language: "java", Version: "v1"}, {Image: "registry.example.com/a:1"}}}},
	}
	for _, tt := range tests {
		t.Run(tt.key+"="+tt.value, func(t *testing.T) {
			got, err := ParseVolume(tt.key, tt.value)
			if tt.err != nil {
				if err == nil {
					t.Fatalf("want an error, got %+v", got)
				}
				var e *Error
				if !errors.As(err, &e) || e.Annotation != tt.key {
					t.Errorf("the error must name the annotation %s: %v", tt.key, err)
				}
				for _, frag := range tt.err {
					if !strings.Contains(err.Error(), frag) {
						t.Errorf("error %q lacks %q", err, frag)
					}
				}
				if !strings.Contains(err.Error(), "; fix: ") {
					t.Errorf("error %q says no fix", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got  %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestTooManyVolumes(t *testing.T) {
	a := map[string]string{}
	for i := range MaxVolumes + 1 {
		a[VolumePrefix+"v"+strings.Repeat("x", i)] = "hostdir=x"
	}
	if _, err := ParseVolumes(a); err == nil || !strings.Contains(err.Error(), "the limit is 16") {
		t.Fatalf("err = %v", err)
	}
}

func TestParseVolumesIsSortedAndIgnoresOtherKeys(t *testing.T) {
	vols, err := ParseVolumes(map[string]string{
		VolumePrefix + "b": "hostdir=b", VolumePrefix + "a": "hostdir=a", Libraries: "java", "app": "x",
	})
	if err != nil || len(vols) != 2 || vols[0].Name != "a" || vols[1].Name != "b" {
		t.Fatalf("got %+v, %v", vols, err)
	}
}

func TestParseLibraries(t *testing.T) {
	tests := []struct {
		value string
		want  []LibraryChoice
		err   string
	}{
		{value: "java", want: []LibraryChoice{{Language: "java"}}},
		{value: "java:v1.45.0, python ,js=registry.example.com/js:5", want: []LibraryChoice{
			{Language: "java", Version: "v1.45.0"}, {Language: "python"}, {Language: "js", Image: "registry.example.com/js:5"}}},
		{value: "", err: "no library listed"},
		{value: " , ", err: "no library listed"},
		{value: "go", err: `unknown language "go"`},
		{value: "java,java:v1", err: "language java is listed twice"},
		{value: "java=registry.example.com/x", err: "names no tag or digest"},
		{value: "java:", err: "empty version"},
	}
	for _, tt := range tests {
		got, err := ParseLibraries(Libraries, tt.value)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%q: err = %v, want %q", tt.value, err, tt.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%q = %+v, %v; want %+v", tt.value, got, err, tt.want)
		}
	}
}

func TestParseContainerLanguages(t *testing.T) {
	tests := []struct {
		value string
		want  map[string][]string
		err   string
	}{
		{value: "app=java,python; worker=js", want: map[string][]string{"app": {"java", "python"}, "worker": {"js"}}},
		{value: "app=java,java;sidecar=", want: map[string][]string{"app": {"java"}, "sidecar": {}}},
		{value: "app", err: "missing '='"},
		{value: "app=java;app=js", err: "container app is listed twice"},
		{value: "app=cobol", err: `unknown language "cobol"`},
		{value: "App=java", err: "is not a container name"},
		{value: ";", err: "no container listed"},
	}
	for _, tt := range tests {
		got, err := ParseContainerLanguages(tt.value)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%q: err = %v, want %q", tt.value, err, tt.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%q = %v, %v; want %v", tt.value, got, err, tt.want)
		}
	}
}

func TestVolumeFormatRoundTrip(t *testing.T) {
	v := &Volume{Name: "t", Libraries: []VolumeLibrary{{Language: "java", Version: "v1"}, {Image: "r.example.com/a:1"}},
		Source: "/src", MountPath: "/m", Containers: []string{"a", "b"}, ReadOnly: true}
	key, value := v.Format()
	if key != "apm-csi.io/volume.t" || value != "libraries=java:v1,r.example.com/a:1; source=/src; mountPath=/m; containers=a,b; readOnly=true" {
		t.Fatalf("Format = %q %q", key, value)
	}
	got, err := ParseVolume(key, value)
	if err != nil || !reflect.DeepEqual(got, v) {
		t.Fatalf("round trip = %+v, %v", got, err)
	}
}
