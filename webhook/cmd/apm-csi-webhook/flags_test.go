package main

import (
	"errors"
	"flag"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		check   func(t *testing.T, o *options)
		wantErr string
	}{
		{
			name: "defaults",
			check: func(t *testing.T, o *options) {
				want := options{namespace: "apm-csi-system", port: 9443, certDir: "/tmp/k8s-webhook-server/serving-certs", certMode: certModeFiles,
					secretName: "apm-csi-webhook-tls", serviceName: "apm-csi-webhook", webhookConfigName: "apm-csi-webhook", metricsAddr: ":8080",
					probeAddr: ":8081", logLevel: slog.LevelInfo, logLevelName: "info", shutdownTimeout: 30 * time.Second, bootstrapTimeout: 2 * time.Minute,
					eventWindow: 15 * time.Minute}
				if *o != want {
					t.Fatalf("defaults:\n got %+v\nwant %+v", *o, want)
				}
			},
		},
		{
			name: "namespace and cert dir follow the pod's environment",
			env:  map[string]string{"POD_NAMESPACE": "apm", "TMPDIR": "/scratch"},
			check: func(t *testing.T, o *options) {
				if o.namespace != "apm" || o.certDir != "/scratch/k8s-webhook-server/serving-certs" {
					t.Fatalf("namespace %q, cert dir %q", o.namespace, o.certDir)
				}
			},
		},
		{
			name: "flags",
			args: []string{"--cert-mode=self-managed", "--webhook-port", "9444", "--log-level", "debug", "--event-window", "5m", "--namespace", "ns", "--client-ca", "/ca.pem"},
			check: func(t *testing.T, o *options) {
				if o.certMode != certModeSelfManaged || o.port != 9444 || o.logLevel != slog.LevelDebug || o.eventWindow != 5*time.Minute || o.namespace != "ns" || o.clientCA != "/ca.pem" {
					t.Fatalf("flags: %+v", o)
				}
			},
		},
		{
			name: "environment, the command line winning",
			args: []string{"--webhook-port", "9445"},
			env:  map[string]string{"APM_CSI_WEBHOOK_PORT": "9444", "APM_CSI_CERT_MODE": "self-managed", "APM_CSI_SHUTDOWN_TIMEOUT": "10s", "POD_NAMESPACE": "apm", "APM_CSI_NAMESPACE": "other"},
			check: func(t *testing.T, o *options) {
				if o.port != 9445 || o.certMode != certModeSelfManaged || o.shutdownTimeout != 10*time.Second || o.namespace != "other" {
					t.Fatalf("from env: %+v", o)
				}
			},
		},
		{name: "bad log level", args: []string{"--log-level", "loud"}, wantErr: "--log-level"},
		{name: "bad env value", env: map[string]string{"APM_CSI_EVENT_WINDOW": "soon"}, wantErr: `APM_CSI_EVENT_WINDOW="soon"`},
		{name: "unknown flag", args: []string{"--webhook-prot", "1"}, wantErr: "flag provided but not defined: -webhook-prot"},
		{name: "stray argument", args: []string{"extra"}, wantErr: "unexpected"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parseFlags(tt.args, func(k string) string { return tt.env[k] }, io.Discard)
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

// TestKubeconfigFlag: controller-runtime's --kubeconfig is in the webhook's own flag set.
func TestKubeconfigFlag(t *testing.T) {
	fs := newFlagSet(&options{}, func(string) string { return "" })
	if fs.Lookup("kubeconfig") == nil {
		t.Fatal("--kubeconfig is not a flag of the webhook")
	}
	if _, err := parseFlags([]string{"--kubeconfig", "/etc/kubeconfig"}, func(string) string { return "" }, io.Discard); err != nil {
		t.Fatal(err)
	}
}

func TestHelpIsNotAnError(t *testing.T) {
	var help strings.Builder
	_, err := parseFlags([]string{"--help"}, func(string) string { return "" }, &help)
	if !errors.Is(err, flag.ErrHelp) || !strings.Contains(help.String(), "-cert-mode") {
		t.Fatalf("--help = %v, output %q; want flag.ErrHelp and the flags", err, help.String())
	}
}
