package main

import (
	"flag"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/flagenv"
	"github.com/apm-csi/apm-csi/shared/repoallow"
)

func TestParseFlags(t *testing.T) {
	dir := t.TempDir()
	config := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(config, []byte("hostdirs:\n- name: from-file\n  path: /srv/file\n  namespaces: [\"*\"]\ndatadogSockets:\n  APMSocket: from-file\n  DSDSocket: from-file\nallowedRepositories:\n- registry.example/from-file\npullSecretScopes:\n- secret: team-a\n  repositories: [registry.example/team-a]\n  namespaces: [team-a]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		check   func(t *testing.T, o *options)
		wantErr string
	}{
		{
			name: "defaults",
			args: []string{"--node-id", "n1"},
			check: func(t *testing.T, o *options) {
				if o.Endpoint != "unix:///var/lib/kubelet/plugins/csi.apm-csi.io/csi.sock" || o.StateDir != "/var/lib/apm-csi" ||
					o.KubeletDir != "/var/lib/kubelet" || !o.KubeletRegistration || o.PublishDownloadBudget != time.Minute || o.logLevel != slog.LevelInfo {
					t.Fatalf("defaults: %+v", o)
				}
			},
		},
		{
			name: "endpoint follows kubelet dir and driver name",
			args: []string{"--node-id", "n1", "--kubelet-dir", "/var/snap/microk8s/common/var/lib/kubelet", "--driver-name", "csi.example.io"},
			check: func(t *testing.T, o *options) {
				if o.Endpoint != "unix:///var/snap/microk8s/common/var/lib/kubelet/plugins/csi.example.io/csi.sock" {
					t.Fatalf("endpoint %s", o.Endpoint)
				}
			},
		},
		{
			name: "environment",
			env: map[string]string{
				"APM_CSI_NODE_ID":                 "from-env",
				"APM_CSI_STATE_DIR":               "/state",
				"APM_CSI_HOSTDIR":                 "a=/a,namespaces=*;b=/b,ro,namespaces=x|y\nc=/c,create,namespaces=z,service-accounts=z/w",
				"APM_CSI_PUBLISH_DOWNLOAD_BUDGET": "30s",
				"APM_CSI_KUBELET_REGISTRATION":    "false",
				"APM_CSI_DATADOG_SOCKET_ENTRY":    "APMSocket=a",
				"APM_CSI_ALLOWED_REPOSITORY":      "gcr.io/datadoghq;registry.example:5000/team",
				"APM_CSI_PULL_SECRET_SCOPE":       "team=registry.example:5000/team@ns-a,ns-b",
			},
			check: func(t *testing.T, o *options) {
				want := []hostdir.Entry{{Name: "a", Path: "/a", Namespaces: []string{"*"}}, {Name: "b", Path: "/b", ReadOnly: true, Namespaces: []string{"x", "y"}},
					{Name: "c", Path: "/c", Create: true, Namespaces: []string{"z"}, ServiceAccounts: []string{"z/w"}}}
				if o.NodeID != "from-env" || o.StateDir != "/state" || !reflect.DeepEqual(o.HostDirs, want) ||
					o.PublishDownloadBudget != 30*time.Second || o.KubeletRegistration || o.DatadogSockets["APMSocket"] != "a" {
					t.Fatalf("from env: %+v", o)
				}
				if !reflect.DeepEqual(o.Cache.AllowedRepositories, []string{"gcr.io/datadoghq", "registry.example:5000/team"}) {
					t.Fatalf("allowed repositories from env: %q", o.Cache.AllowedRepositories)
				}
				want2 := []repoallow.SecretScope{{Secret: "team", Repositories: []string{"registry.example:5000/team"}, Namespaces: []string{"ns-a", "ns-b"}}}
				if !reflect.DeepEqual(o.Cache.PullSecretScopes, want2) {
					t.Fatalf("pull secret scopes from env: %+v", o.Cache.PullSecretScopes)
				}
			},
		},
		{
			name: "command line wins over environment",
			args: []string{"--node-id", "from-flag", "--hostdir", "x=/x,namespaces=*"},
			env:  map[string]string{"APM_CSI_NODE_ID": "from-env", "APM_CSI_HOSTDIR": "a=/a,namespaces=*"},
			check: func(t *testing.T, o *options) {
				if o.NodeID != "from-flag" || len(o.HostDirs) != 1 || o.HostDirs[0].Name != "x" {
					t.Fatalf("precedence: %+v", o)
				}
			},
		},
		{
			name: "config file plus flags",
			args: []string{"--node-id", "n", "--config", config, "--hostdir", "flag=/f,namespaces=*", "--datadog-socket-entry", "DSDSocket=flag"},
			check: func(t *testing.T, o *options) {
				if len(o.HostDirs) != 2 || o.HostDirs[0].Name != "from-file" || o.HostDirs[1].Name != "flag" {
					t.Fatalf("hostdirs %+v", o.HostDirs)
				}
				if o.DatadogSockets["APMSocket"] != "from-file" || o.DatadogSockets["DSDSocket"] != "flag" {
					t.Fatalf("flags must override the file's socket mapping: %v", o.DatadogSockets)
				}
				if !reflect.DeepEqual(o.Cache.AllowedRepositories, []string{"registry.example/from-file"}) || len(o.Cache.PullSecretScopes) != 1 || o.Cache.PullSecretScopes[0].Namespaces[0] != "team-a" {
					t.Fatalf("config file trust settings: %q %+v", o.Cache.AllowedRepositories, o.Cache.PullSecretScopes)
				}
			},
		},
		{
			name: "writable layer defaults",
			args: []string{"--node-id", "n"},
			check: func(t *testing.T, o *options) {
				if o.WritableLayer != writablelayer.Auto || o.DefaultWritableLayer != 256<<20 || o.MaxWritableLayer != 1<<30 {
					t.Fatalf("writable layer: %s %d %d", o.WritableLayer, o.DefaultWritableLayer, o.MaxWritableLayer)
				}
			},
		},
		{
			name: "writable layer flags and variables",
			args: []string{"--node-id", "n", "--max-writable-layer", "2Gi", "--writable-layer-mechanism", "tmpfs"},
			env:  map[string]string{"APM_CSI_DEFAULT_WRITABLE_LAYER": "64Mi"},
			check: func(t *testing.T, o *options) {
				if o.WritableLayer != writablelayer.Tmpfs || o.DefaultWritableLayer != 64<<20 || o.MaxWritableLayer != 2<<30 {
					t.Fatalf("writable layer: %s %d %d", o.WritableLayer, o.DefaultWritableLayer, o.MaxWritableLayer)
				}
			},
		},
		{
			name: "kept writable layers",
			args: []string{"--node-id", "n", "--keep-writable-layers", "--kept-writable-layer-grace", "30m", "--max-kept-writable-bytes", "10Gi"},
			check: func(t *testing.T, o *options) {
				if !o.KeepWritableLayers || o.KeptLayerGrace != 30*time.Minute || o.MaxKeptWritable != 10<<30 {
					t.Fatalf("kept writable layers: %t %s %d", o.KeepWritableLayers, o.KeptLayerGrace, o.MaxKeptWritable)
				}
			},
		},
		{name: "writable layer default above max", args: []string{"--node-id", "n", "--default-writable-layer", "2Gi"}, wantErr: "--default-writable-layer=2Gi is above --max-writable-layer=1Gi"},
		{name: "writable layer not a size", args: []string{"--node-id", "n", "--max-writable-layer", "big"}, wantErr: "such as 256Mi"},
		{name: "writable layer too small", args: []string{"--node-id", "n", "--default-writable-layer", "1Ki"}, wantErr: "at least 1Mi"},
		{name: "writable layer mechanism unknown", args: []string{"--node-id", "n", "--writable-layer-mechanism", "loop"}, wantErr: "use one of"},
		{name: "bad hostdir", args: []string{"--node-id", "n", "--hostdir", "x=relative,namespaces=*"}, wantErr: "absolute"},
		{name: "hostdir without tenancy", args: []string{"--node-id", "n", "--hostdir", "x=/x"}, wantErr: "--hostdir: hostdir \"x\": declare who may use it: flag --hostdir NAME=PATH,namespaces=NS1|NS2 (or namespaces=* for every namespace)"},
		{name: "bad env value", args: []string{"--node-id", "n"}, env: map[string]string{"APM_CSI_PUBLISH_DOWNLOAD_BUDGET": "soon"}, wantErr: "APM_CSI_PUBLISH_DOWNLOAD_BUDGET"},
		{name: "bad allowed repository", args: []string{"--node-id", "n", "--allowed-repository", "datadoghq"}, wantErr: "not a registry host"},
		{name: "bad pull secret scope", args: []string{"--node-id", "n", "--pull-secret-scope", "team"}, wantErr: "SECRET="},
		{name: "bad socket mapping", args: []string{"--node-id", "n", "--datadog-socket-entry", "Foo=x"}, wantErr: "use one of"},
		{name: "relative state dir", args: []string{"--node-id", "n", "--state-dir", "state"}, wantErr: "absolute"},
		{name: "zero budget", args: []string{"--node-id", "n", "--publish-download-budget", "0s"}, wantErr: "positive"},
		{name: "missing config", args: []string{"--node-id", "n", "--config", filepath.Join(dir, "nope")}, wantErr: "--config"},
		{name: "bad log level", args: []string{"--node-id", "n", "--log-level", "loud"}, wantErr: "--log-level"},
		{name: "stray argument", args: []string{"--node-id", "n", "extra"}, wantErr: "unexpected"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			getenv := func(k string) string { return tt.env[k] }
			o, err := parseFlags(tt.args, getenv, io.Discard)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, o)
		})
	}
}

// TestNewRepeatableFlagIsReadFromTheEnvironment: a repeatable flag added to the flag set takes
// several values from its variable with no other edit.
func TestNewRepeatableFlagIsReadFromTheEnvironment(t *testing.T) {
	fs := newFlagSet(&options{})
	var added flagenv.Strings
	fs.Var(&added, "added-list", "a new repeatable flag")
	env := map[string]string{"APM_CSI_ADDED_LIST": "one;two\nthree", "APM_CSI_PREFETCH": "registry.example/a:1;registry.example/b:2"}
	if err := parseArgsAndEnv(fs, nil, func(k string) string { return env[k] }); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual([]string(added), []string{"one", "two", "three"}) {
		t.Fatalf("--added-list from APM_CSI_ADDED_LIST = %q, want [one two three]", added)
	}
}

// TestRepeatableFlagsDeclareThemselves: a flag documented as repeatable has a value that says
// so (flagenv.Repeatable), and only those do; otherwise its variable would be taken whole.
func TestRepeatableFlagsDeclareThemselves(t *testing.T) {
	n := 0
	newFlagSet(&options{}).VisitAll(func(f *flag.Flag) {
		documented := strings.Contains(f.Usage, "repeatable")
		if flagenv.IsRepeatable(f) != documented {
			t.Errorf("--%s: repeatable in its usage %t, its value declares itself repeatable %t", f.Name, documented, flagenv.IsRepeatable(f))
		}
		if documented {
			n++
		}
	})
	if n != 7 {
		t.Errorf("%d repeatable flags, want 7 (hostdir, datadog-socket-entry and the cache's five)", n)
	}
}
