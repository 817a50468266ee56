package driver

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/status"
)

// Metric label values are bounded: operation (publish, unpublish), volume_type (hostdir,
// library, preload, unknown) and grpc_code (the ~17 gRPC codes). Never a pod, volume id or path.
const (
	opPublish   = "publish"
	opUnpublish = "unpublish"
	kindUnknown = "unknown"
)

// Metrics are the node plugin's Prometheus metrics.
type Metrics struct {
	operations *prometheus.CounterVec
	duration   *prometheus.HistogramVec
	published  *prometheus.GaugeVec
	// keptRemoved counts kept writable layers removed, by reason (pod-gone, budget).
	keptRemoved *prometheus.CounterVec
}

// NewMetrics creates the metrics and registers them on reg (controller-runtime's
// metrics.Registry in the binary); a nil reg leaves them unregistered, for tests.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		operations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "apm_csi", Subsystem: "node", Name: "operations_total",
			Help: "NodePublishVolume and NodeUnpublishVolume calls by volume type and gRPC code.",
		}, []string{"operation", "volume_type", "grpc_code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "apm_csi", Subsystem: "node", Name: "operation_duration_seconds",
			Help: "Latency of NodePublishVolume and NodeUnpublishVolume by volume type and gRPC code.",
			// From a bind mount (~1 ms) to a first library download near the publish budget.
			Buckets: []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120},
		}, []string{"operation", "volume_type", "grpc_code"}),
		published: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "apm_csi", Subsystem: "node", Name: "published_volumes",
			Help: "Volume targets currently published on this node, by volume type.",
		}, []string{"volume_type"}),
		keptRemoved: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "apm_csi", Subsystem: "node", Name: "kept_writable_layers_removed_total",
			Help: "Writable layers kept across a node reboot (--keep-writable-layers) and removed without an unpublish: pod-gone (the pod's dir was gone for the grace period) or budget (the kept layers took more than --max-kept-writable-bytes).",
		}, []string{"reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.operations, m.duration, m.published, m.keptRemoved)
	}
	return m
}

func (m *Metrics) observe(op, kind string, start time.Time, err error) {
	code := status.Code(err).String()
	m.operations.WithLabelValues(op, kind, code).Inc()
	m.duration.WithLabelValues(op, kind, code).Observe(time.Since(start).Seconds())
}
