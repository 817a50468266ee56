// Command apm-csi-webhook is the mutating admission webhook that gives pods their tracer
// libraries through one apm-csi CSI inline volume. See docs/webhook.md.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/certwatcher"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/apm-csi/apm-csi/shared/version"
	"github.com/apm-csi/apm-csi/webhook/certs"
	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/configreload"
	"github.com/apm-csi/apm-csi/webhook/podevents"
	"github.com/apm-csi/apm-csi/webhook/server"
)

func main() {
	f, err := parseFlags(os.Args[1:], os.Getenv, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "apm-csi-webhook:", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: f.logLevel}))
	slog.SetDefault(log)
	ctrl.SetLogger(logr.FromSlogHandler(log.Handler()))
	klog.SetLogger(logr.FromSlogHandler(log.Handler()))

	if err := run(f, log); err != nil {
		log.Error("apm-csi-webhook failed", "err", err)
		os.Exit(1)
	}
}

func run(f *options, log *slog.Logger) error {
	if f.eventWindow <= 0 {
		return fmt.Errorf("--event-window %s: must be positive (it bounds which pods get an Event after a restart)", f.eventWindow)
	}
	src := configreload.Static(config.Default(), f.namespace)
	if f.configFile != "" {
		var err error
		if src, err = configreload.Load(f.configFile, f.namespace); err != nil {
			return err
		}
		// Events about a refused new version are about this pod (its name is the host name).
		host, _ := os.Hostname()
		src.Pod = configreload.Pod{Namespace: f.namespace, Name: host}
	}
	cfg := src.Config()
	log.Info("starting", "version", version.Version, "namespace", f.namespace, "configHash", src.Hash(), "mode", cfg.Mode,
		"layout", cfg.EffectiveLayout(), "languages", cfg.LanguageNames(), "certMode", f.certMode, "clientCA", f.clientCA)

	ctx := ctrl.SetupSignalHandler()
	restConfig, err := ctrl.GetConfig()
	if err != nil {
		return fmt.Errorf("kubernetes client configuration: %w", err)
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}

	byObject := server.CacheByObject(cfg)
	var selfManaged *certs.SelfManaged
	switch f.certMode {
	case certModeFiles:
	case certModeSelfManaged:
		direct, err := client.New(restConfig, client.Options{Scheme: scheme})
		if err != nil {
			return err
		}
		selfManaged = &certs.SelfManaged{
			Client: direct, Namespace: f.namespace, SecretName: f.secretName, ServiceName: f.serviceName,
			WebhookConfigName: f.webhookConfigName, CertDir: f.certDir, Log: log,
		}
		// The server cannot start without a certificate on disk: make the first one now.
		if err := bootstrap(ctx, selfManaged, f.bootstrapTimeout, log); err != nil {
			return err
		}
		maps.Copy(byObject, selfManaged.CacheByObject())
	default:
		return fmt.Errorf("--cert-mode %q: use %s or %s", f.certMode, certModeFiles, certModeSelfManaged)
	}

	watcher, err := certwatcher.New(filepath.Join(f.certDir, certs.KeyCert), filepath.Join(f.certDir, certs.KeyKey))
	if err != nil {
		return fmt.Errorf("load the serving certificate from %s: %w", f.certDir, err)
	}
	if selfManaged != nil {
		selfManaged.Reload = watcher.ReadCertificate
	}

	tlsOpts := []func(*tls.Config){func(c *tls.Config) {
		c.MinVersion = tls.VersionTLS12
		c.GetCertificate = watcher.GetCertificate
	}}
	if f.clientCA != "" {
		opt, err := certs.ClientCA(f.clientCA)
		if err != nil {
			return err
		}
		tlsOpts = append(tlsOpts, opt)
	}

	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme:                  scheme,
		Cache:                   cache.Options{ByObject: byObject},
		Metrics:                 metricsserver.Options{BindAddress: f.metricsAddr},
		HealthProbeBindAddress:  f.probeAddr,
		GracefulShutdownTimeout: &f.shutdownTimeout,
		WebhookServer: webhook.NewServer(webhook.Options{
			Host:    f.host,
			Port:    f.port,
			TLSOpts: tlsOpts,
		}),
	})
	if err != nil {
		return err
	}
	if err := mgr.Add(watcher); err != nil {
		return err
	}
	if selfManaged != nil {
		if err := selfManaged.SetupWithManager(mgr); err != nil {
			return err
		}
	}
	if _, err := server.Register(ctx, mgr, server.Options{
		Source: src, Namespace: f.namespace, Log: log,
		Events: podevents.Recorder{Window: f.eventWindow},
	}); err != nil {
		return err
	}
	return mgr.Start(ctx)
}

// bootstrap retries the first certificate while the API server is unreachable or another
// replica is creating the Secret at the same moment.
func bootstrap(ctx context.Context, s *certs.SelfManaged, timeout time.Duration, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	delay := 500 * time.Millisecond
	for {
		_, err := s.Ensure(ctx)
		if err == nil {
			return nil
		}
		log.Warn("self-managed certificate not ready; retrying", "err", err, "retryIn", delay)
		select {
		case <-ctx.Done():
			return fmt.Errorf("self-managed certificate: %w (last error: %v)", ctx.Err(), err)
		case <-time.After(delay):
		}
		delay = min(2*delay, 10*time.Second)
	}
}
