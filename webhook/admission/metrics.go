package admission

import (
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/mutation"
)

// modeNone is the mode label of a decision that delivered no library.
const modeNone = "none"

// Metrics, on controller-runtime's registry so that the manager's metrics endpoint serves
// them. Labels are closed sets (outcomes and modes), never pod or namespace names.
var (
	mutationsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "apm_csi",
		Subsystem: "webhook",
		Name:      "mutations_total",
		Help:      "Pod admission decisions by result (injected, rewritten, skipped, error, denied, ignored) and mode (csi, image-volume, init-container, none).",
	}, []string{"result", "mode"})

	mutationDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "apm_csi",
		Subsystem: "webhook",
		Name:      "mutation_duration_seconds",
		Help:      "Time to decide and build the patch for one pod, by result.",
		Buckets:   []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1},
	}, []string{"result"})
)

func init() {
	metrics.Registry.MustRegister(mutationsTotal, mutationDuration)
	// Every series exists from the start, so that rate() and alerts see zeros, not gaps.
	for _, o := range mutation.Outcomes {
		mutationDuration.WithLabelValues(string(o))
		for _, m := range []string{string(config.ModeCSI), string(config.ModeImageVolume), string(config.ModeInitContainer), modeNone} {
			mutationsTotal.WithLabelValues(string(o), m)
		}
	}
}
