// Command cainjector runs cert-manager's CA injector: it copies the CA of a Certificate's
// Secret into the webhook configurations, APIServices and CRDs annotated with
// cert-manager.io/inject-ca-from. The reconcilers come from the github.com/cert-manager/cert-manager
// module; this file parses the flags cert-manager's Helm chart passes and starts them in a
// controller-runtime manager with leader election, as cert-manager's own cainjector does.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	apiext "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	kscheme "k8s.io/client-go/kubernetes/scheme"
	apireg "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	"github.com/cert-manager/cert-manager/pkg/controller/cainjector"
	logf "github.com/cert-manager/cert-manager/pkg/logs"
	"github.com/cert-manager/cert-manager/pkg/util"
	logsapi "k8s.io/component-base/logs/api/v1"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "cert-manager cainjector:", err)
		os.Exit(1)
	}
}

func run() error {
	logf.InitLogs()
	defer logf.FlushLogs()

	logging := logsapi.NewLoggingConfiguration()
	fs := pflag.NewFlagSet("cainjector", pflag.ContinueOnError)
	// Flags of cert-manager's chart that this launcher does not act on are accepted and ignored.
	fs.ParseErrorsAllowlist.UnknownFlags = true
	namespace := fs.String("namespace", "", "only inject into objects in this namespace (default: all)")
	leNamespace := fs.String("leader-election-namespace", "kube-system", "namespace of the leader election Lease")
	leaderElect := fs.Bool("leader-elect", true, "run leader election")
	logf.AddFlags(logging, fs)
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if err := logf.ValidateAndApply(logging); err != nil {
		return err
	}

	scheme := runtime.NewScheme()
	utilruntime.Must(kscheme.AddToScheme(scheme))
	utilruntime.Must(apiext.AddToScheme(scheme))
	utilruntime.Must(apireg.AddToScheme(scheme))
	utilruntime.Must(cmapi.AddToScheme(scheme))

	ctrl.SetLogger(logf.Log.WithName("cainjector"))
	// The user agent names the field manager of the injector's apply patches, as in
	// cert-manager's own cainjector.
	restConfig := util.RestConfigWithUserAgent(ctrl.GetConfigOrDie(), "cainjector")
	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme:                        scheme,
		LeaderElection:                *leaderElect,
		LeaderElectionNamespace:       *leNamespace,
		LeaderElectionID:              "cert-manager-cainjector-leader-election",
		LeaderElectionReleaseOnCancel: true,
		// Secrets are watched as metadata only (the injectors ask for that) and read from the
		// API server, as cert-manager's own cainjector does: a cached copy could still hold the
		// previous CA when the metadata event of a renewal arrives.
		Client:                 client.Options{Cache: &client.CacheOptions{DisableFor: []client.Object{&corev1.Secret{}}}},
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
	})
	if err != nil {
		return fmt.Errorf("creating the manager: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := cainjector.RegisterAllInjectors(ctx, mgr, cainjector.SetupOptions{
		Namespace:                    *namespace,
		EnableCertificatesDataSource: true,
		EnabledReconcilersFor: map[string]bool{
			cainjector.MutatingWebhookConfigurationName:   true,
			cainjector.ValidatingWebhookConfigurationName: true,
			cainjector.APIServiceName:                     true,
			cainjector.CustomResourceDefinitionName:       true,
		},
	}); err != nil {
		return fmt.Errorf("registering the injectors: %w", err)
	}
	return mgr.Start(ctx)
}
