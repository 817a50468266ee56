package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/shared/libref"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name  string
		yaml  string
		check func(t *testing.T, c *Config)
		err   []string
	}{
		{name: "empty file is the defaults", yaml: "", check: func(t *testing.T, c *Config) {
			if !slices.Equal(c.LanguageNames(), libref.Languages) {
				t.Errorf("languages = %v", c.LanguageNames())
			}
			if c.Mode != ModeCSI || c.EffectiveLayout() != LayoutInjector || c.InjectorImage() != "gcr.io/datadoghq/apm-inject:0" {
				t.Errorf("mode %s layout %s injector %s", c.Mode, c.EffectiveLayout(), c.InjectorImage())
			}
			if c.DefaultImage("java") != "gcr.io/datadoghq/dd-lib-java-init:v1" || c.DefaultImage("js") != "gcr.io/datadoghq/dd-lib-js-init:v5" {
				t.Errorf("java %s js %s", c.DefaultImage("java"), c.DefaultImage("js"))
			}
			if !slices.Equal(c.ExcludedContainers, []string{"istio-proxy"}) || c.SSINamespaceLabel != "apm-csi.io/ssi" || c.DriverName != "csi.apm-csi.io" {
				t.Errorf("%+v", c)
			}
		}},
		{name: "a list replaces the default list", yaml: `
registry: registry.example.com/datadog
allowedRepositories: [registry.example.com/js-tracer]
languages:
  - name: python
  - name: java
    version: v1.45.0
  - name: js
    image: registry.example.com/js-tracer@sha256:` + strings.Repeat("b", 64) + `
excludedContainers: [istio-proxy, linkerd-proxy]
excludedNamespaces: [monitoring]
mode: init-container
`, check: func(t *testing.T, c *Config) {
			if !slices.Equal(c.LanguageNames(), []string{"java", "js", "python"}) {
				t.Errorf("languages = %v", c.LanguageNames())
			}
			if got := c.DefaultImage("python"); got != "registry.example.com/datadog/dd-lib-python-init:v3" {
				t.Errorf("python = %s (a listed language without version gets its default)", got)
			}
			if got := c.DefaultImage("java"); got != "registry.example.com/datadog/dd-lib-java-init:v1.45.0" {
				t.Errorf("java = %s", got)
			}
			if got := c.DefaultImage("js"); !strings.HasPrefix(got, "registry.example.com/js-tracer@sha256:") {
				t.Errorf("js = %s", got)
			}
			if c.InjectorImage() != "registry.example.com/datadog/apm-inject:0" || c.Mode != ModeInitContainer {
				t.Errorf("injector %s mode %s", c.InjectorImage(), c.Mode)
			}
		}},
		{name: "no injector means the direct layout", yaml: "injector: {}", check: func(t *testing.T, c *Config) {
			if c.InjectorImage() != "" || c.EffectiveLayout() != LayoutDirect {
				t.Errorf("injector %q layout %s", c.InjectorImage(), c.EffectiveLayout())
			}
		}},
		{name: "injector image", yaml: "allowedRepositories: [registry.example.com]\ninjector: {image: registry.example.com/inject:1.2}", check: func(t *testing.T, c *Config) {
			if c.InjectorImage() != "registry.example.com/inject:1.2" {
				t.Errorf("injector %q", c.InjectorImage())
			}
		}},
		{name: "direct layout forced", yaml: "layout: direct", check: func(t *testing.T, c *Config) {
			if c.EffectiveLayout() != LayoutDirect {
				t.Error(c.EffectiveLayout())
			}
		}},
		{name: "hostdir tenancy", yaml: `
hostdirs:
- name: team-a
  namespaces: [team-a]
  serviceAccounts: [team-a/writer]
  namespaceSelector: "apm-csi.io/hostdir=team-a"
- name: apm-socket
  namespaces: ["*"]
`, check: func(t *testing.T, c *Config) {
			h, ok := c.HostDir("team-a")
			if !ok || !slices.Equal(h.Namespaces, []string{"team-a"}) || !slices.Equal(h.ServiceAccounts, []string{"team-a/writer"}) || h.NamespaceSelector != "apm-csi.io/hostdir=team-a" {
				t.Errorf("team-a = %+v, %v", h, ok)
			}
			if h, ok := c.HostDir("apm-socket"); !ok || !h.AllowsAllNamespaces() {
				t.Errorf("apm-socket = %+v", h)
			}
			if _, ok := c.HostDir("other"); ok {
				t.Error("an undeclared entry was found")
			}
		}},
		{name: "hostdir without tenancy", yaml: "hostdirs: [{name: data}]", err: []string{`hostdirs[0]: entry "data": declare who may use it`, "namespaces=* for every namespace"}},
		{name: "hostdir problems", yaml: `
hostdirs:
- {name: ../x, namespaces: [a]}
- {name: a, namespaces: [a], serviceAccounts: [b/x]}
- {name: a, namespaces: ["*"]}
`, err: []string{`hostdirs[0].name`, `"b/x" can never be allowed`, `hostdirs[2].name: entry "a" is listed twice`}},
		{name: "hostdir takes no path", yaml: "hostdirs: [{name: b, namespaces: [a], path: /srv}]", err: []string{`unknown field "path"`}},
		{name: "typo in a field", yaml: "language: []", err: []string{`unknown field "language"`}},
		{name: "every problem at once", yaml: `
registry: "gcr.io//datadoghq"
languages: [{name: cobol}, {name: java, version: "v 1"}, {name: js}, {name: js}]
mode: sidecar
layout: merged
excludedNamespaces: [Kube_System]
excludedContainers: ["istio proxy"]
ssiNamespaceLabel: "apm csi"
driverName: "CSI!"
`, err: []string{
			`languages[0].name: unknown language "cobol"`, "languages[1]:", `languages[3].name: language "js" is listed twice`,
			`mode: unknown injection mode "sidecar"`, `layout: unknown layout "merged"`, `excludedNamespaces: "Kube_System"`,
			`excludedContainers: "istio proxy"`, `ssiNamespaceLabel: "apm csi"`, `driverName: "CSI!"`}},
		{name: "image volume support defaults", yaml: "mode: auto", check: func(t *testing.T, c *Config) {
			if c.Mode != ModeAuto || c.ImageVolumes.MinKubernetesVersion != "1.35" || c.ImageVolumes.Runtimes["containerd"] != "2.2" || c.ImageVolumes.Runtimes["cri-o"] != "1.33" {
				t.Errorf("mode %s, imageVolumes %+v", c.Mode, c.ImageVolumes)
			}
		}},
		{name: "image volume support configured", yaml: "mode: image_volume\nimageVolumes: {minKubernetesVersion: \"1.34\", runtimes: {containerd: \"2.3\"}}", check: func(t *testing.T, c *Config) {
			if c.Mode != ModeImageVolume || c.ImageVolumes.MinKubernetesVersion != "1.34" || len(c.ImageVolumes.Runtimes) != 1 || c.ImageVolumes.Runtimes["containerd"] != "2.3" {
				t.Errorf("mode %s, imageVolumes %+v (a runtimes map replaces the default one)", c.Mode, c.ImageVolumes)
			}
		}},
		{name: "image volumes turned off", yaml: "imageVolumes: {runtimes: {}}", check: func(t *testing.T, c *Config) {
			if c.ImageVolumes.Runtimes == nil || len(c.ImageVolumes.Runtimes) != 0 || c.ImageVolumes.MinKubernetesVersion != "1.35" {
				t.Errorf("imageVolumes %+v", c.ImageVolumes)
			}
		}},
		{name: "bad image volume versions", yaml: "imageVolumes: {minKubernetesVersion: latest, runtimes: {containerd: two}}",
			err: []string{`imageVolumes.minKubernetesVersion: "latest" is not a version such as 1.35`, `imageVolumes.runtimes.containerd: "two" is not a version such as 2.2`}},
		{name: "injector layout without injector", yaml: "injector: {}\nlayout: injector", err: []string{"the injector layout needs injector.image or injector.version"}},
		{name: "configured images outside the allowed repositories", yaml: "allowedRepositories: [registry.example.com/team]\ninjector: {image: registry.example.com/team-evil/inject:1.2}\nlanguages: [{name: js, image: evil.example.com/js:1}]",
			err: []string{"injector: image registry.example.com/team-evil/inject:1.2 is outside the allowed repositories", "languages[0]: image evil.example.com/js:1 is outside", "allowedRepositories"}},
		{name: "bad allowed repository", yaml: "allowedRepositories: [datadoghq]", err: []string{"allowedRepositories:", "not a registry host"}},
		{name: "bad injector", yaml: "injector: {image: registry.example.com/inject}", err: []string{"injector: image reference", "names no tag or digest"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.yaml))
			if tt.err != nil {
				if err == nil {
					t.Fatal("want an error")
				}
				for _, frag := range tt.err {
					if !strings.Contains(err.Error(), frag) {
						t.Errorf("error lacks %q:\n%v", frag, err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, c)
		})
	}
}

func TestLoad(t *testing.T) {
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte("mode: init-container\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(p)
	if err != nil || c.Mode != ModeInitContainer {
		t.Fatalf("%+v %v", c, err)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml")); err == nil || !strings.Contains(err.Error(), "read webhook configuration") {
		t.Fatalf("err = %v", err)
	}
}

func TestDefaultIsValid(t *testing.T) {
	if err := Default().Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{
		"csi": ModeCSI, "image-volume": ModeImageVolume, "init-container": ModeInitContainer, "auto": ModeAuto,
		// The Datadog Cluster Agent's spellings.
		"image_volume": ModeImageVolume, "init_container": ModeInitContainer,
	} {
		if got, err := ParseMode(in); err != nil || got != want {
			t.Errorf("ParseMode(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "CSI", "imagevolume", "sidecar"} {
		if _, err := ParseMode(bad); err == nil || !strings.Contains(err.Error(), "use csi, image-volume, init-container or auto") {
			t.Errorf("ParseMode(%q) = %v", bad, err)
		}
	}
}

func TestDriftSettings(t *testing.T) {
	c, err := Parse([]byte("drift: {restartOwners: true, restartInterval: 90s}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !c.Drift.RestartOwners || c.Drift.RestartInterval.Duration != 90*time.Second {
		t.Errorf("drift = %+v", c.Drift)
	}
	if d, err := Parse(nil); err != nil || d.Drift.RestartOwners || d.Drift.RestartInterval.Duration != DefaultRestartInterval {
		t.Errorf("defaults: %+v, %v", d.Drift, err)
	}
	if _, err := Parse([]byte("drift: {restartInterval: -1m}\n")); err == nil || !strings.Contains(err.Error(), "drift.restartInterval") {
		t.Errorf("a negative interval must name the field: %v", err)
	}
	if _, err := Parse([]byte("drift: {restartInterval: soon}\n")); err == nil {
		t.Error("a malformed interval must be refused")
	}
}
