package repoallow

import (
	"errors"
	"strings"
	"testing"
)

func TestAllowsOnComponentBoundaries(t *testing.T) {
	l, err := New("gcr.io/datadoghq", "docker.io/datadog", "registry.example:5000", "127.0.0.1:5000/team/")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		image string
		allow bool
	}{
		{"gcr.io/datadoghq/dd-lib-java-init:v1", true},
		{"gcr.io/datadoghq/dd-lib-java-init@sha256:" + strings.Repeat("a", 64), true},
		{"gcr.io/datadoghq/sub/dir/image:v1", true},
		{"gcr.io/datadoghq-evil/dd-lib-java-init:v1", false},
		{"gcr.io/datadoghqx:v1", false},
		{"gcr.io/other/dd-lib-java-init:v1", false},
		{"GCR.io/datadoghq/x:v1", false}, // not a valid reference: refused, never matched loosely
		{"datadog/dd-lib-java-init:v1", true},
		{"docker.io/datadog/dd-lib-java-init:v1", true},
		{"index.docker.io/datadog/dd-lib-java-init:v1", true},
		{"docker.io/datadog-evil/x:v1", false},
		{"dd-lib-java-init:v1", false}, // Docker Hub library/, not datadog/
		{"registry.example:5000/anything/x:v1", true},
		{"registry.example:5001/anything/x:v1", false},
		{"registry.example/anything/x:v1", false},
		{"127.0.0.1:5000/team/x:v1", true},
		{"127.0.0.1:5000/teamx/x:v1", false},
	}
	for _, tt := range tests {
		err := l.Check(tt.image)
		if tt.allow && err != nil {
			t.Errorf("%s: %v, want allowed", tt.image, err)
		}
		if !tt.allow && err == nil {
			t.Errorf("%s allowed, want refused", tt.image)
		}
	}
	var nae *NotAllowedError
	if err := l.Check("gcr.io/datadoghq-evil/x:v1"); !errors.As(err, &nae) || !strings.Contains(err.Error(), Flag) || !strings.Contains(err.Error(), "gcr.io/datadoghq-evil/x:v1") {
		t.Errorf("refusal = %v, want a NotAllowedError naming the image and %s", err, Flag)
	}
}

func TestNormalize(t *testing.T) {
	for in, want := range map[string]string{
		"docker.io":           "index.docker.io",
		"docker.io/datadog":   "index.docker.io/datadog",
		"gcr.io/datadoghq/":   "gcr.io/datadoghq",
		"localhost:5000/x/y":  "localhost:5000/x/y",
		"public.ecr.aws/dd":   "public.ecr.aws/dd",
		"127.0.0.1:5000/team": "127.0.0.1:5000/team",
	} {
		got, err := Normalize(in)
		if err != nil || got != want {
			t.Errorf("Normalize(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "datadog", "gcr.io/Datadoghq", "gcr.io/x@sha256:ab", "a b/c"} {
		if got, err := Normalize(bad); err == nil {
			t.Errorf("Normalize(%q) = %q, want an error", bad, got)
		}
	}
	var zero *List
	if zero.AllowsRepository("gcr.io/datadoghq/x") {
		t.Error("a nil list allows a repository")
	}
}
