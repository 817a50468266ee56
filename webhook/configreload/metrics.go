package configreload

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

const (
	resultLoaded   = "loaded"
	resultRejected = "rejected"
)

var (
	configInfo = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "apm_csi",
		Subsystem: "webhook",
		Name:      "config_info",
		Help:      "1 for the hash of the configuration in force (the hash that ends each pod's status annotation); only the current hash is exported.",
	}, []string{"hash"})
	reloadsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "apm_csi",
		Subsystem: "webhook",
		Name:      "config_reloads_total",
		Help:      "New versions of the configuration file, by result (loaded; rejected: invalid or needing a restart, the previous configuration stays in force).",
	}, []string{"result"})

	infoMu   sync.Mutex
	infoHash string
)

func init() {
	metrics.Registry.MustRegister(configInfo, reloadsTotal)
	reloadsTotal.WithLabelValues(resultLoaded)
	reloadsTotal.WithLabelValues(resultRejected)
}

// setInfo exports hash as the one live configuration hash.
func setInfo(hash string) {
	infoMu.Lock()
	defer infoMu.Unlock()
	if infoHash != "" && infoHash != hash {
		configInfo.DeleteLabelValues(infoHash)
	}
	infoHash = hash
	configInfo.WithLabelValues(hash).Set(1)
}
