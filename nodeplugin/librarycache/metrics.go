package librarycache

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// Download results, the only label values of apm_csi_cache_downloads_total.
const (
	resultSuccess     = "success"
	resultUnavailable = "unavailable"
	resultNotFound    = "not_found"
	resultRejected    = "rejected"
	resultError       = "error"
)

// Eviction reasons, the only label values of apm_csi_cache_evictions_total.
const (
	evictUnused = "unused"
	evictBudget = "budget"
	evictOrphan = "orphan"
)

// metrics are the cache's Prometheus metrics. Labels are bounded enums: never an image name,
// digest, pod or path.
type metrics struct {
	hits            prometheus.Counter
	misses          prometheus.Counter
	staleServed     prometheus.Counter
	downloads       *prometheus.CounterVec
	downloadSeconds prometheus.Histogram
	downloadedBytes prometheus.Counter
	extractedBytes  prometheus.Counter
	evictions       *prometheus.CounterVec
	cacheBytes      prometheus.Gauge
	libraries       prometheus.Gauge
	librariesInUse  prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	ns, sub := "apm_csi", "cache"
	m := &metrics{
		hits: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "hits_total",
			Help: "Library requests served from the cache without waiting for a download."}),
		misses: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "misses_total",
			Help: "Library requests that needed a download (whether or not another request had started it)."}),
		staleServed: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "stale_served_total",
			Help: "Library requests served under a tag's last known digest because the registry could not confirm it in time."}),
		downloads: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "downloads_total",
			Help: "Library image downloads by result (success, unavailable, not_found, rejected, error)."}, []string{"result"}),
		downloadSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "download_seconds",
			Help:    "Time to download and extract one library image.",
			Buckets: []float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600}}),
		downloadedBytes: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "downloaded_bytes_total",
			Help: "Bytes received from registries (compressed layers, manifests)."}),
		extractedBytes: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "extracted_bytes_total",
			Help: "Bytes of library files written into the cache."}),
		evictions: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "evictions_total",
			Help: "Cache entries removed, by reason (unused past the grace period, budget, orphan)."}, []string{"reason"}),
		cacheBytes: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "bytes",
			Help: "Bytes of library files held by the cache."}),
		libraries: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "libraries",
			Help: "Library images cached on this node."}),
		librariesInUse: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "libraries_in_use",
			Help: "Cached library images referenced by a mount or a volume record at the last garbage collection."}),
	}
	for _, r := range []string{resultSuccess, resultUnavailable, resultNotFound, resultRejected, resultError} {
		m.downloads.WithLabelValues(r)
	}
	for _, r := range []string{evictUnused, evictBudget, evictOrphan} {
		m.evictions.WithLabelValues(r)
	}
	if reg == nil {
		return m, nil
	}
	cs := []prometheus.Collector{m.hits, m.misses, m.staleServed, m.downloads, m.downloadSeconds, m.downloadedBytes,
		m.extractedBytes, m.evictions, m.cacheBytes, m.libraries, m.librariesInUse}
	var errs []error
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return m, nil
}

func downloadResult(f failure) string {
	switch f {
	case failUnavailable, failDenied:
		return resultUnavailable
	case failNotFound:
		return resultNotFound
	case failRejected:
		return resultRejected
	default:
		return resultError
	}
}
