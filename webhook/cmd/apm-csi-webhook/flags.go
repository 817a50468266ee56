package main

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"time"

	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/client/config"

	"github.com/apm-csi/apm-csi/shared/flagenv"
	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/webhook/podevents"
)

// envPrefix: as for the node plugin, every flag can also be set as APM_CSI_<FLAG_NAME>
// (dashes become underscores). A flag given on the command line wins over its variable.
const envPrefix = "APM_CSI_"

// Certificate modes.
const (
	// certModeFiles serves whatever certificate is mounted in --cert-dir (cert-manager's
	// Secret, typically) and reloads it when it changes.
	certModeFiles = "cert-manager"
	// certModeSelfManaged creates and renews the certificate itself (package certs).
	certModeSelfManaged = "self-managed"
)

// options are the parsed flags.
type options struct {
	configFile        string
	namespace         string
	host              string
	port              int
	certDir           string
	certMode          string
	clientCA          string
	secretName        string
	serviceName       string
	webhookConfigName string
	metricsAddr       string
	probeAddr         string
	logLevel          slog.Level
	logLevelName      string
	shutdownTimeout   time.Duration
	bootstrapTimeout  time.Duration
	eventWindow       time.Duration
}

// newFlagSet returns the webhook's flags bound to o, with their defaults set. getenv supplies
// $POD_NAMESPACE (the default of --namespace) and $TMPDIR (where --cert-dir defaults to).
func newFlagSet(o *options, getenv func(string) string) *flag.FlagSet {
	fs := flag.NewFlagSet(names.WebhookBinary, flag.ContinueOnError)
	namespace := getenv("POD_NAMESPACE")
	if namespace == "" {
		namespace = names.SystemNamespace
	}
	tmp := getenv("TMPDIR") // os.TempDir
	if tmp == "" {
		tmp = "/tmp"
	}
	fs.StringVar(&o.configFile, "config", "", "Configuration file (YAML, see docs/webhook.md); empty uses the defaults. Reloaded when it changes; an invalid new version is refused and the previous one stays.")
	fs.StringVar(&o.namespace, "namespace", namespace, "Namespace the webhook runs in (never mutated; holds the self-managed Secret). The default is $POD_NAMESPACE, else "+names.SystemNamespace+".")
	fs.StringVar(&o.host, "webhook-host", "", "Address the webhook server listens on; empty is every address.")
	fs.IntVar(&o.port, "webhook-port", 9443, "Port of the webhook's HTTPS server (TLS 1.2 or later, path /mutate-v1-pod).")
	fs.StringVar(&o.certDir, "cert-dir", filepath.Join(tmp, "k8s-webhook-server", "serving-certs"), "Directory holding tls.crt and tls.key; reloaded when they change.")
	fs.StringVar(&o.certMode, "cert-mode", certModeFiles, "cert-manager: serve the certificate mounted in --cert-dir. self-managed: create a CA and serving certificate in --secret-name, write them to --cert-dir, set the caBundle and renew them.")
	fs.StringVar(&o.clientCA, "client-ca", "", "PEM file of the CA that signs the API server's webhook client certificate; when set, callers without such a certificate are refused. Empty: callers are not authenticated.")
	fs.StringVar(&o.secretName, "secret-name", "apm-csi-webhook-tls", "Secret of the self-managed certificate (self-managed mode).")
	fs.StringVar(&o.serviceName, "service-name", names.WebhookBinary, "Service in front of the webhook (its names are in the self-managed certificate).")
	fs.StringVar(&o.webhookConfigName, "webhook-config-name", names.WebhookBinary, "MutatingWebhookConfiguration whose caBundle the self-managed mode sets.")
	fs.StringVar(&o.metricsAddr, "metrics-bind-address", ":8080", "Address of the Prometheus metrics endpoint; 0 disables it.")
	fs.StringVar(&o.probeAddr, "health-probe-bind-address", ":8081", "Address of /healthz (liveness) and /readyz.")
	fs.StringVar(&o.logLevelName, "log-level", "info", "debug, info, warn or error; logs are JSON on stderr.")
	fs.DurationVar(&o.shutdownTimeout, "shutdown-timeout", 30*time.Second, "How long in-flight admission requests may take to finish on shutdown.")
	fs.DurationVar(&o.bootstrapTimeout, "bootstrap-timeout", 2*time.Minute, "How long the self-managed mode retries creating the first certificate.")
	fs.DurationVar(&o.eventWindow, "event-window", podevents.DefaultWindow, "A pod gets its Event only if the webhook sees it within this time of its creation; keep it below the API server's --event-ttl (default 1h), or a restart may report a pod twice.")
	// --kubeconfig, read by controller-runtime's GetConfig.
	ctrlconfig.RegisterFlags(fs)
	return fs
}

// parseFlags reads args, then the environment for flags not given.
func parseFlags(args []string, getenv func(string) string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := newFlagSet(o, getenv)
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := flagenv.Apply(fs, envPrefix, getenv); err != nil {
		return nil, err
	}
	if err := o.logLevel.UnmarshalText([]byte(o.logLevelName)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	return o, nil
}
