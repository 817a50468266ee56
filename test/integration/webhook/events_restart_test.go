package webhook_test

import (
	"context"
	"testing"

	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/podevents"
	"github.com/apm-csi/apm-csi/webhook/server"
)

// podEventsTotal reads apm_csi_webhook_pod_events_total{result}.
func podEventsTotal(tb testing.TB, result string) float64 {
	tb.Helper()
	m, ok := webhookMetric(tb, "apm_csi_webhook_pod_events_total", "result", result)
	if !ok {
		tb.Fatalf("no apm_csi_webhook_pod_events_total{result=%q}", result)
	}
	return counterValue(m)
}

// startEventRecorder runs another webhook's pod Event recorder against the same API server,
// with the webhook's own cache settings: a second replica, or the webhook after a restart
// (its informer lists every pod again).
func startEventRecorder(tb testing.TB, h *harness, instance string) (stop func()) {
	tb.Helper()
	scheme := k8sruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		tb.Fatal(err)
	}
	mgr, err := ctrl.NewManager(h.cfg, ctrl.Options{
		Scheme:                 scheme,
		Cache:                  cache.Options{ByObject: server.CacheByObject(config.Default())},
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
	})
	if err != nil {
		tb.Fatal(err)
	}
	rec := &podevents.Recorder{Client: mgr.GetClient(), Instance: instance}
	if err := rec.SetupWithManager(mgr); err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("the event recorder's manager: %v", err)
		}
	}
}

// TestPodEventOnceAcrossRestartsAndReplicas: the webhook is restarted and a second replica
// starts; both list the pods again, and the pod still has exactly one Event.
func TestPodEventOnceAcrossRestartsAndReplicas(t *testing.T) {
	h := startHarness(t)
	h.setDriver(t, true)
	h.namespace(t, "once", map[string]string{"apm-csi.io/ssi": "enabled"}, nil)
	p := h.create(t, pod("once", "web", nil, nil))
	h.eventually(t, "the pod's Event", func() bool { return len(h.podEvents(t, "once", p.UID)) == 1 })

	// The webhook stops; a restarted one and a second replica list the pods from scratch.
	h.shutdown(t)
	already := podEventsTotal(t, "already-recorded")
	for _, instance := range []string{"restarted", "replica-2"} {
		stop := startEventRecorder(t, h, instance)
		h.eventually(t, instance+" to find the pod's Event already recorded", func() bool {
			return podEventsTotal(t, "already-recorded") > already
		})
		already = podEventsTotal(t, "already-recorded")
		defer stop()
	}
	if evs := h.podEvents(t, "once", p.UID); len(evs) != 1 {
		t.Errorf("want exactly one Event for the pod, got %d: %+v", len(evs), evs)
	}
}
