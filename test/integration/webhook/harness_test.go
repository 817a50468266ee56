// Package webhook_test runs apm-csi-webhook against a real kube-apiserver and etcd
// (controller-runtime envtest): the real MutatingWebhookConfiguration is installed, pods are
// created through the API and the stored pods are checked.
package webhook_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/apm-csi/apm-csi/shared/tenancy"
	"github.com/apm-csi/apm-csi/test/eventually"
	"github.com/apm-csi/apm-csi/test/testenv"
	"github.com/apm-csi/apm-csi/webhook/admission"
	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/configreload"
	"github.com/apm-csi/apm-csi/webhook/server"
)

const driverName = "csi.apm-csi.io"

// manifest is the canonical MutatingWebhookConfiguration, installed as shipped; envtest only
// points its clientConfig at the local server and sets the caBundle.
func manifest(tb testing.TB) string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..", "deploy", "base", "webhook", "mutatingwebhookconfiguration.yaml")
}

// harness is a running API server with the webhook installed and served in-process.
type harness struct {
	cfg    *rest.Config
	client client.Client
	mgr    manager.Manager
	stop   context.CancelFunc
	done   chan error
	// webhookAddr is host:port of the webhook server.
	webhookAddr string
	mutator     *admission.PodMutator
	// startWebhook starts the webhook (again, after shutdown) with the harness's settings.
	startWebhook func(testing.TB)
	// configHash is the hash of the webhook's configuration, which ends every status.
	configHash string
	// answerDelay holds back every admission answer this long after the handler has run (a
	// webhook that decided but whose answer arrives after the API server's timeout).
	answerDelay atomic.Int64
}

// delayedServer holds back the answers of the handlers registered on it by *delay.
type delayedServer struct {
	webhook.Server
	delay *atomic.Int64
}

func (s delayedServer) Register(path string, hook http.Handler) {
	s.Server.Register(path, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d := time.Duration(s.delay.Load())
		if d == 0 {
			hook.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		hook.ServeHTTP(rec, r)
		select {
		case <-time.After(d):
		case <-r.Context().Done():
		}
		maps.Copy(w.Header(), rec.Header())
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
	}))
}

func startHarness(tb testing.TB) *harness {
	tb.Helper()
	return startHarnessWith(tb, harnessOptions{})
}

// harnessOptions changes the API server's flags or the webhook server's TLS.
type harnessOptions struct {
	apiServerFlags map[string]string
	tlsOpts        []func(*tls.Config)
	// config changes the webhook configuration.
	config func(*config.Config)
	// configFile, when set, is the webhook's configuration file, reloaded as it changes
	// (config is then ignored); Events about refused versions are about configPod.
	configFile string
	configPod  configreload.Pod
}

func startHarnessWith(tb testing.TB, opts harnessOptions) *harness {
	tb.Helper()
	assets := testenv.KubebuilderAssets(tb)
	log := slog.New(slog.NewTextHandler(tb.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctrl.SetLogger(logr.FromSlogHandler(log.Handler()))

	env := &envtest.Environment{
		BinaryAssetsDirectory: assets,
		WebhookInstallOptions: envtest.WebhookInstallOptions{
			Paths:            []string{manifest(tb)},
			LocalServingHost: "127.0.0.1",
		},
	}
	for k, v := range opts.apiServerFlags {
		env.ControlPlane.GetAPIServer().Configure().Set(k, v)
	}
	cfg, err := env.Start()
	if err != nil {
		tb.Fatalf("start kube-apiserver and etcd: %v", err)
	}
	tb.Cleanup(func() {
		if err := env.Stop(); err != nil {
			tb.Errorf("stop envtest: %v", err)
		}
	})

	scheme := k8sruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		tb.Fatal(err)
	}
	wcfg := config.Default()
	// The node plugin's hostdir entries with their tenancy, as the chart renders them.
	wcfg.HostDirs = []config.HostDir{
		{Name: "team-a", Tenancy: tenancy.Tenancy{Namespaces: []string{"team-a"}}},
		{Name: "labelled", Tenancy: tenancy.Tenancy{Namespaces: []string{"*"}, NamespaceSelector: "apm-csi.io/hostdir=allowed"}},
	}
	if opts.config != nil {
		opts.config(wcfg)
	}
	if err := wcfg.Validate(); err != nil {
		tb.Fatal(err)
	}
	var src *configreload.Source
	if opts.configFile != "" {
		if src, err = configreload.Load(opts.configFile, "apm-csi-system"); err != nil {
			tb.Fatal(err)
		}
		src.Pod = opts.configPod
		wcfg = src.Config()
	}
	wio := env.WebhookInstallOptions
	h := &harness{cfg: cfg, configHash: wcfg.Hash(),
		webhookAddr: fmt.Sprintf("%s:%d", wio.LocalServingHost, wio.LocalServingPort)}
	if h.client, err = client.New(cfg, client.Options{Scheme: scheme}); err != nil {
		tb.Fatal(err)
	}
	h.startWebhook = func(tb testing.TB) {
		tb.Helper()
		h.done = make(chan error, 1)
		mgr, err := ctrl.NewManager(cfg, ctrl.Options{
			Scheme:                 scheme,
			Cache:                  cache.Options{ByObject: server.CacheByObject(wcfg)},
			Metrics:                metricsserver.Options{BindAddress: "0"},
			HealthProbeBindAddress: "0",
			WebhookServer: delayedServer{Server: webhook.NewServer(webhook.Options{
				Host: wio.LocalServingHost, Port: wio.LocalServingPort, CertDir: wio.LocalServingCertDir, TLSOpts: opts.tlsOpts,
			}), delay: &h.answerDelay},
		})
		if err != nil {
			tb.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		mutator, err := server.Register(ctx, mgr, server.Options{Config: wcfg, Source: src, Namespace: "apm-csi-system", Log: log})
		if err != nil {
			tb.Fatal(err)
		}
		h.mgr, h.stop, h.mutator = mgr, cancel, mutator
		go func() { h.done <- mgr.Start(ctx) }()

		started := mgr.GetWebhookServer().StartedChecker()
		eventually.Require(tb, ctx, 30*time.Second, 50*time.Millisecond, "the webhook server to start", func(context.Context) error {
			return started(nil)
		})
		if !mgr.GetCache().WaitForCacheSync(ctx) {
			tb.Fatal("informers did not sync")
		}
		// What the webhook's readiness check waits for too: auto and image-volume decisions
		// need the API server's version.
		eventually.Require(tb, ctx, 30*time.Second, 50*time.Millisecond, "the webhook to read the API server's version", func(context.Context) error {
			if mutator.ServerVersion() == "" {
				return errors.New("no version read yet")
			}
			return nil
		})
	}
	h.startWebhook(tb)
	tb.Cleanup(func() { h.shutdown(tb) })
	return h
}

// shutdown stops the webhook (the API server keeps running); tb fails if the manager ended
// with an error.
func (h *harness) shutdown(tb testing.TB) {
	tb.Helper()
	if h.stop == nil {
		return
	}
	h.stop()
	h.stop = nil
	if err := <-h.done; err != nil {
		tb.Errorf("the webhook's manager: %v", err)
	}
}

// namespace creates a namespace with labels and annotations.
func (h *harness) namespace(tb testing.TB, name string, labels, annotations map[string]string) {
	tb.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels, Annotations: annotations}}
	if err := h.client.Create(context.Background(), ns); err != nil {
		tb.Fatal(err)
	}
	// The webhook reads namespaces from its cache (or the API server for a brand-new one);
	// wait for the cache so that the test exercises the normal path.
	h.eventually(tb, "namespace in the webhook's cache", func() bool {
		return h.mgr.GetClient().Get(context.Background(), client.ObjectKey{Name: name}, &corev1.Namespace{}) == nil
	})
}

// setDriver installs or removes the CSIDriver and waits until the webhook sees it.
func (h *harness) setDriver(tb testing.TB, installed bool) {
	tb.Helper()
	d := &storagev1.CSIDriver{
		ObjectMeta: metav1.ObjectMeta{Name: driverName},
		Spec: storagev1.CSIDriverSpec{
			AttachRequired:       new(false),
			PodInfoOnMount:       new(true),
			VolumeLifecycleModes: []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecycleEphemeral, storagev1.VolumeLifecyclePersistent},
		},
	}
	var err error
	if installed {
		err = h.client.Create(context.Background(), d)
	} else {
		err = h.client.Delete(context.Background(), d)
	}
	if client.IgnoreNotFound(err) != nil && !apierrors.IsAlreadyExists(err) {
		tb.Fatal(err)
	}
	h.eventually(tb, fmt.Sprintf("CSIDriver installed=%v in the webhook's cache", installed), func() bool {
		err := h.mgr.GetClient().Get(context.Background(), client.ObjectKey{Name: driverName}, &storagev1.CSIDriver{})
		return (err == nil) == installed
	})
}

// eventually waits up to 20 s for cond, which reads the webhook's cache, Events or metrics.
func (h *harness) eventually(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	eventually.Require(tb, context.Background(), 20*time.Second, 20*time.Millisecond, what, eventually.True(cond))
}

// admissions is how many admission requests the webhook has handled, from its metrics.
func admissions(tb testing.TB) float64 {
	tb.Helper()
	families, err := metrics.Registry.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	var total float64
	for _, f := range families {
		if f.GetName() != "apm_csi_webhook_mutations_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			total += counterValue(m)
		}
	}
	return total
}

func counterValue(m *dto.Metric) float64 { return m.GetCounter().GetValue() }

// webhookMetric finds, among the webhook's metrics, the sample of the metric name whose label
// has value; ok is false when there is none.
func webhookMetric(tb testing.TB, name, label, value string) (m *dto.Metric, ok bool) {
	tb.Helper()
	families, err := metrics.Registry.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m, true
				}
			}
		}
	}
	return nil, false
}
