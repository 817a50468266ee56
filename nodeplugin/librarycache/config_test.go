package librarycache

import (
	"flag"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/shared/libref"
)

func TestAddFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		check   func(t *testing.T, c Config)
		wantErr string
	}{
		{
			name: "defaults",
			check: func(t *testing.T, c Config) {
				if c.TagTTL != DefaultTagTTL || c.MaxParallelDownloads != DefaultMaxParallelDownloads || c.MaxLibraryBytes != DefaultMaxLibraryBytes ||
					c.MaxLibraryFiles != DefaultMaxLibraryFiles || c.GCGracePeriod != DefaultGCGracePeriod || c.DownloadTimeout != DefaultDownloadTimeout || c.DiskBudget != 0 {
					t.Errorf("defaults = %+v", c)
				}
			},
		},
		{
			name: "everything",
			args: []string{
				"--registry-mirror", "gcr.io/datadoghq=mirror.example:5000/dd",
				"--registry-mirror", "docker.io=mirror.example:5000",
				"--pull-secret-dir", "/etc/apm-csi/pull-secrets",
				"--insecure-registry", "mirror.example:5000",
				"--tag-ttl", "1m", "--max-parallel-downloads", "4",
				"--max-library-bytes", "500Mi", "--max-library-files", "1000",
				"--gc-grace-period", "10m", "--cache-disk-budget", "20Gi",
				"--prefetch", "gcr.io/datadoghq/dd-lib-java-init:v1", "--prefetch", "gcr.io/datadoghq/apm-inject:0",
				"--download-timeout", "5m",
			},
			check: func(t *testing.T, c Config) {
				want := []Mirror{{Source: "gcr.io/datadoghq", Mirror: "mirror.example:5000/dd"}, {Source: "index.docker.io", Mirror: "mirror.example:5000"}}
				if !slices.Equal(c.Mirrors, want) {
					t.Errorf("Mirrors = %v, want %v", c.Mirrors, want)
				}
				if c.PullSecretDir != "/etc/apm-csi/pull-secrets" || !slices.Equal(c.InsecureRegistries, []string{"mirror.example:5000"}) {
					t.Errorf("auth settings = %q, %v", c.PullSecretDir, c.InsecureRegistries)
				}
				if c.TagTTL != time.Minute || c.MaxParallelDownloads != 4 || c.MaxLibraryBytes != 500<<20 || c.MaxLibraryFiles != 1000 ||
					c.GCGracePeriod != 10*time.Minute || c.DiskBudget != 20<<30 || c.DownloadTimeout != 5*time.Minute {
					t.Errorf("limits = %+v", c)
				}
				if len(c.Prefetch) != 2 {
					t.Errorf("Prefetch = %v", c.Prefetch)
				}
			},
		},
		{name: "mirror source without a registry host", args: []string{"--registry-mirror", "datadog=mirror.example:5000"}, wantErr: "invalid source"},
		{name: "mirror without =", args: []string{"--registry-mirror", "gcr.io"}, wantErr: "SOURCE=MIRROR"},
		{name: "bad size", args: []string{"--max-library-bytes", "lots"}, wantErr: "not a size"},
		{name: "negative size", args: []string{"--cache-disk-budget", "-1Gi"}, wantErr: "negative"},
		{name: "zero budget", args: []string{"--cache-disk-budget", "0"}, wantErr: "must be positive"},
		{name: "budget share over 100%", args: []string{"--cache-disk-budget", "150%"}, wantErr: "1% to 100%"},
		{
			name: "resource limits",
			args: []string{"--cache-disk-budget", "35%", "--max-parallel-downloads", "4", "--max-downloads-per-registry", "3",
				"--download-slot-wait", "5s", "--min-download-rate", "0", "--min-download-rate-window", "1m"},
			check: func(t *testing.T, c Config) {
				if c.DiskBudget != 0 || c.DiskBudgetPercent != 35 || c.MaxDownloadsPerRegistry != 3 || c.DownloadSlotWait != 5*time.Second ||
					c.MinDownloadRate != -1 || c.MinDownloadRateWindow != time.Minute {
					t.Errorf("limits = %+v", c)
				}
			},
		},
		{name: "prefetch without version", args: []string{"--prefetch", "gcr.io/datadoghq/dd-lib-java-init"}, wantErr: "no tag or digest"},
		{name: "bad insecure registry", args: []string{"--insecure-registry", "not a host"}, wantErr: "insecure registry"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var c Config
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			c.AddFlags(fs)
			err := fs.Parse(tt.args)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse = %v, want an error saying %q", err, tt.wantErr)
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

func TestMirrorRewrite(t *testing.T) {
	tests := []struct {
		mirror string
		repo   string
		want   string
	}{
		{"gcr.io/datadoghq=mirror:5000/dd", "gcr.io/datadoghq/dd-lib-java-init", "mirror:5000/dd/dd-lib-java-init"},
		{"gcr.io=mirror:5000", "gcr.io/datadoghq/dd-lib-java-init", "mirror:5000/datadoghq/dd-lib-java-init"},
		{"docker.io/datadog=mirror:5000/hub", "index.docker.io/datadog/dd-lib-js-init", "mirror:5000/hub/dd-lib-js-init"},
		{"gcr.io/datadoghq=mirror:5000/dd", "gcr.io/datadoghq-other/x", ""},
		{"gcr.io/datadoghq=mirror:5000/dd", "public.ecr.aws/datadog/x", ""},
	}
	for _, tt := range tests {
		m, err := ParseMirror(tt.mirror)
		if err != nil {
			t.Fatalf("ParseMirror(%q): %v", tt.mirror, err)
		}
		got, ok := m.rewrite(tt.repo)
		if got != tt.want || ok != (tt.want != "") {
			t.Errorf("%s rewrites %s to %q, %v; want %q", tt.mirror, tt.repo, got, ok, tt.want)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	for _, c := range []Config{
		{},
		{StoreDir: "relative/store"},
		{StoreDir: "/s", TagTTL: -time.Second},
		{StoreDir: "/s", DiskBudget: -1},
		{StoreDir: "/s", Prefetch: []string{"no-version"}},
	} {
		if _, err := c.withDefaults(); err == nil {
			t.Errorf("withDefaults(%+v) accepted an invalid config", c)
		}
	}
	got, err := Config{StoreDir: "/var/lib/apm-csi/store/"}.withDefaults()
	if err != nil || got.StoreDir != "/var/lib/apm-csi/store" || got.GCGracePeriod != DefaultGCGracePeriod || got.Logger == nil {
		t.Errorf("withDefaults = %+v, %v", got, err)
	}
}

// TestDefaultSlotsFitTheLargestWebhookVolume: with the default download slots, every library
// of the largest volume the webhook writes (one image per language and the injector, all
// from one registry) downloads at once, and one slot still stays free for another registry.
func TestDefaultSlotsFitTheLargestWebhookVolume(t *testing.T) {
	c, err := Config{StoreDir: "/var/lib/apm-csi/store"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	largest := len(libref.Languages) + 1
	if c.MaxDownloadsPerRegistry < largest {
		t.Errorf("default downloads per registry = %d, fewer than the %d images of the webhook's largest volume", c.MaxDownloadsPerRegistry, largest)
	}
	if c.MaxDownloadsPerRegistry >= c.MaxParallelDownloads {
		t.Errorf("one registry may take all %d download slots", c.MaxParallelDownloads)
	}
}
