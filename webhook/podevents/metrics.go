package podevents

import (
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Results of an Event write.
const (
	resultRecorded        = "recorded"
	resultAlreadyRecorded = "already-recorded"
	resultFailed          = "failed"
)

var eventsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "apm_csi",
	Subsystem: "webhook",
	Name:      "pod_events_total",
	Help:      "Pod Events derived from the stored status annotation, by result (recorded; already-recorded: by another replica or before a restart; failed: retried).",
}, []string{"result"})

func init() {
	metrics.Registry.MustRegister(eventsTotal)
	for _, r := range []string{resultRecorded, resultAlreadyRecorded, resultFailed} {
		eventsTotal.WithLabelValues(r)
	}
}
