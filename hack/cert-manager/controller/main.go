// Command controller runs cert-manager's certificate controllers for the issuer kinds that
// apm-csi's manifests use (SelfSigned and CA): Issuers and ClusterIssuers, CertificateRequest
// approval and signing, and the Certificate lifecycle (trigger, key, request, issuing,
// readiness, revisions), including renewal. The controllers, their informers and clients come
// from the github.com/cert-manager/cert-manager module; this file parses the flags that
// cert-manager's Helm chart passes, builds the controller context and runs them.
//
// Left out on purpose: ACME, Vault and Venafi (their clients pull in every cloud SDK and need
// networks this cluster does not have), the ingress and Gateway shims, leader election (the
// chart runs one replica).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	logsapi "k8s.io/component-base/logs/api/v1"

	controllerpkg "github.com/cert-manager/cert-manager/pkg/controller"
	logf "github.com/cert-manager/cert-manager/pkg/logs"

	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/approver"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/ca"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/selfsigned"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/issuing"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/keymanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/readiness"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/requestmanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/revisionmanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/trigger"
	_ "github.com/cert-manager/cert-manager/pkg/controller/clusterissuers"
	_ "github.com/cert-manager/cert-manager/pkg/controller/issuers"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/ca"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/selfsigned"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "cert-manager controller:", err)
		os.Exit(1)
	}
}

func run() error {
	logf.InitLogs()
	defer logf.FlushLogs()

	logging := logsapi.NewLoggingConfiguration()
	fs := pflag.NewFlagSet("controller", pflag.ContinueOnError)
	// Flags of cert-manager's chart that this launcher does not act on (leader election, ACME
	// solver image, ...) are accepted and ignored.
	fs.ParseErrorsAllowlist.UnknownFlags = true
	var opts controllerpkg.ContextOptions
	fs.StringVar(&opts.Kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster)")
	fs.StringVar(&opts.Namespace, "namespace", "", "only watch this namespace (default: all)")
	fs.StringVar(&opts.ClusterResourceNamespace, "cluster-resource-namespace", "kube-system", "namespace of the Secrets that ClusterIssuers reference")
	fs.Float32Var(&opts.KubernetesAPIQPS, "kube-api-qps", 20, "client QPS when API Priority and Fairness is off")
	fs.IntVar(&opts.KubernetesAPIBurst, "kube-api-burst", 50, "client burst when API Priority and Fairness is off")
	fs.BoolVar(&opts.EnableOwnerRef, "enable-certificate-owner-ref", false, "make the Certificate the owner of its Secret")
	workers := fs.Int("concurrent-workers", 5, "workers per controller")
	logf.AddFlags(logging, fs)
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if err := logf.ValidateAndApply(logging); err != nil {
		return err
	}
	// cert-manager's defaults for a failed request's retry backoff.
	opts.CertificateRequestMinimumBackoffDuration = time.Hour
	opts.CertificateRequestMaximumBackoffDuration = 32 * time.Hour
	opts.MaxConcurrentChallenges = 60
	opts.CopiedAnnotationPrefixes = []string{"*", "-kubectl.kubernetes.io/", "-fluxcd.io/", "-argocd.argoproj.io/"}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := logf.Log.WithName("controller")
	ctx = logf.NewContext(ctx, log)

	factory, err := controllerpkg.NewContextFactory(ctx, opts)
	if err != nil {
		return err
	}
	names := make([]string, 0, len(controllerpkg.Known()))
	for name := range controllerpkg.Known() {
		names = append(names, name)
	}
	sort.Strings(names)
	var wg sync.WaitGroup
	errs := make(chan error, len(names))
	for _, name := range names {
		c, err := controllerpkg.Known()[name](factory)
		if err != nil {
			return fmt.Errorf("building controller %s: %w", name, err)
		}
		log.Info("starting controller", "controller", name)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.Run(*workers, ctx); err != nil {
				errs <- fmt.Errorf("controller %s: %w", name, err)
			}
		}()
	}
	// The controllers registered their informers while being built; start them now.
	shared, err := factory.Build()
	if err != nil {
		return err
	}
	shared.KubeSharedInformerFactory.Start(ctx.Done())
	shared.SharedInformerFactory.Start(ctx.Done())
	shared.HTTP01ResourceMetadataInformersFactory.Start(ctx.Done())

	select {
	case err := <-errs:
		stop()
		wg.Wait()
		return err
	case <-ctx.Done():
		wg.Wait()
		return nil
	}
}
