package drift

import (
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Results of an owner restart.
const (
	resultRestarted = "restarted"
	resultDeferred  = "deferred"
	resultForbidden = "forbidden"
)

var (
	uninstrumentedPods = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "apm_csi",
		Subsystem: "webhook",
		Name:      "uninstrumented_pods",
		Help:      "Running pods the webhook would instrument but that run without (created while it did not answer, or before their namespace was selected), by namespace; namespaces without any are not exported.",
	}, []string{"namespace"})
	restartsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "apm_csi",
		Subsystem: "webhook",
		Name:      "owner_restarts_total",
		Help:      "Restarts of the owners of uninstrumented pods, by result (restarted; deferred: rate limit or previous rollout; forbidden: no rights).",
	}, []string{"result"})
)

func init() {
	metrics.Registry.MustRegister(uninstrumentedPods, restartsTotal)
	for _, r := range []string{resultRestarted, resultDeferred, resultForbidden} {
		restartsTotal.WithLabelValues(r)
	}
}
