package libref

import (
	"strings"
	"testing"
)

const hex64 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestParse(t *testing.T) {
	tests := []struct {
		in      string
		want    string // canonical String(); "" means an error is expected
		pinned  bool
		wantErr string
	}{
		{in: "gcr.io/datadoghq/dd-lib-java-init:v1", want: "gcr.io/datadoghq/dd-lib-java-init:v1"},
		{in: "127.0.0.1:5000/dd-lib-js-init:v5", want: "127.0.0.1:5000/dd-lib-js-init:v5"},
		{in: "datadog/dd-lib-java-init:v1", want: "index.docker.io/datadog/dd-lib-java-init:v1"},
		{in: "r.local/apm-inject@sha256:" + hex64, want: "r.local/apm-inject@sha256:" + hex64, pinned: true},
		{in: "r.local/apm-inject:0.52@sha256:" + hex64, want: "r.local/apm-inject:0.52@sha256:" + hex64, pinned: true},
		{in: "", wantErr: "empty"},
		{in: "r.local/x", wantErr: "no tag or digest"},
		{in: "localhost:5000/x", wantErr: "no tag or digest"},
		{in: "r.local/x:", wantErr: "empty tag"},
		{in: "r.local/x@sha256:abc", wantErr: "invalid digest"},
		{in: "r.local/X:v1", wantErr: "invalid repository"},
		{in: "r.local/x:" + strings.Repeat("a", 600), wantErr: "limit is 512"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := Parse(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse(%q) = %v, %v; want error containing %q", tt.in, got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.in, err)
			}
			if got.String() != tt.want || got.Pinned() != tt.pinned {
				t.Fatalf("Parse(%q) = %q pinned=%v, want %q pinned=%v", tt.in, got, got.Pinned(), tt.want, tt.pinned)
			}
		})
	}
}

func TestImageAndPackages(t *testing.T) {
	if got := Image("gcr.io/datadoghq/", PackageName("python"), "v3"); got != "gcr.io/datadoghq/dd-lib-python-init:v3" {
		t.Errorf("Image tag = %q", got)
	}
	if got := Image("r.local", InjectorPackage, "sha256:"+hex64); got != "r.local/apm-inject@sha256:"+hex64 {
		t.Errorf("Image digest = %q", got)
	}
	if got := Image("r.local", InjectorPackage, "0.52@sha256:"+hex64); got != "r.local/apm-inject:0.52@sha256:"+hex64 {
		t.Errorf("Image tag@digest = %q", got)
	}
	for _, lang := range Languages {
		got, ok := LanguageOfPackage(PackageName(lang))
		if !ok || got != lang {
			t.Errorf("LanguageOfPackage(PackageName(%q)) = %q, %v", lang, got, ok)
		}
	}
	for _, bad := range []string{"apm-inject", "dd-lib-cobol-init", "dd-lib-java", "lib-java-init"} {
		if _, ok := LanguageOfPackage(bad); ok {
			t.Errorf("LanguageOfPackage(%q) accepted", bad)
		}
	}
	if SourceForPackage(InjectorPackage) != InjectorSource || SourceForPackage("dd-lib-js-init") != LibrarySource {
		t.Error("SourceForPackage maps packages to the wrong image directory")
	}
	if LanguageTarget("js") != "opt/datadog/apm/library/js" {
		t.Errorf("LanguageTarget = %q", LanguageTarget("js"))
	}
}
