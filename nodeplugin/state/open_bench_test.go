package state

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// scaleRecord is a writable library volume's record as the driver writes it for an injector
// volume of three libraries and the preload file, on a node whose state dir is stateDir.
func scaleRecord(stateDir string, i int) *Record {
	pod := fmt.Sprintf("pod-%d", i)
	r := &Record{
		VolumeID:   "csi-" + pod,
		TargetPath: "/var/lib/kubelet/pods/" + pod + "-0123-4567-89ab-cdef01234567/volumes/kubernetes.io~csi/apm/mount",
		Kind:       "library",
		Type:       "library",
		Attributes: map[string]string{
			"csi.storage.k8s.io/ephemeral":     "true",
			"csi.storage.k8s.io/pod.name":      pod,
			"csi.storage.k8s.io/pod.namespace": "default",
			"csi.storage.k8s.io/pod.uid":       pod + "-0123-4567-89ab-cdef01234567",
			"library.0.image":                  "registry.local:5000/datadog/apm-inject:1.0.0",
			"library.0.source":                 "/opt/datadog-packages/datadog-apm-inject",
			"library.0.target":                 "opt/datadog-packages/datadog-apm-inject",
			"library.1.image":                  "registry.local:5000/datadog/dd-lib-python-init:1.0.0",
			"library.1.target":                 "opt/datadog/apm/library/python",
			"library.2.image":                  "registry.local:5000/datadog/dd-lib-js-init:1.0.0",
			"library.2.target":                 "opt/datadog/apm/library/js",
			"preload":                          "/opt/datadog-packages/datadog-apm-inject/stable/inject/launcher.preload.so",
			"type":                             "library",
		},
		WritableLimit: 256 << 20,
		WritableLayer: "tmpfs",
		Pod:           Pod{Namespace: "default", Name: pod, UID: pod + "-0123-4567-89ab-cdef01234567"},
		Ephemeral:     true,
		Created:       time.Date(2026, 1, 2, 3, 4, 5, 678, time.UTC),
	}
	r.OverlayDir = filepath.Join(stateDir, "overlays", r.Key())
	r.UpperDir, r.WorkDir = r.OverlayDir+"/upper", r.OverlayDir+"/work"
	r.Layers = []Layer{{Dir: stateDir + "/store/generated/86ee99a82746b0d1bcd5f879e5f81a11d8ebfa2e3454c21a2d1cf81fbd91a2d7/root"}}
	for _, h := range []string{"c914a152f7024fc971d364a43d7c732592bd7d4d821590cf6e4a517f1cdb506e", "ea994367cb7753e8b2e004710b4fdde04622b3a863686e58ac8b1acaf459d218", "ef60d94951a7d1f1b9d1e6bbddf60d01ca838e8bfe15443ba49387c3111a4596"} {
		r.Layers = append(r.Layers, Layer{Dir: stateDir + "/store/views/" + h + "/root", Digest: "sha256:" + h})
	}
	return r
}

// BenchmarkOpenWith2000Records: what start-up spends reading a journal of 2,000 records
// (Open and Index), per start; journal-bytes is the journal's size.
func BenchmarkOpenWith2000Records(b *testing.B) {
	stateDir := filepath.Join(b.TempDir(), "var", "lib", "apm-csi")
	s, err := Open(stateDir)
	if err != nil {
		b.Fatal(err)
	}
	var journal []byte
	for i := range 2000 {
		journal = append(journal, s.encodePut(scaleRecord(stateDir, i))...)
	}
	s.Close()
	if err := os.WriteFile(filepath.Join(stateDir, "volumes", journalName), journal, 0o600); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		s, err := Open(stateDir)
		if err != nil {
			b.Fatal(err)
		}
		recs, _, err := s.Index()
		if err != nil || len(recs) != 2000 {
			b.Fatalf("%d records, %v", len(recs), err)
		}
		s.Close()
	}
	b.ReportMetric(float64(len(journal)), "journal-bytes")
}

// BenchmarkDecodeRecordForIndex: what Open spends decoding one record of the usual shape
// (scaleRecord) for Index, its attributes skipped and what it keeps copied out of the read
// buffer, the key checked.
func BenchmarkDecodeRecordForIndex(b *testing.B) {
	c := newCodec("/var/lib/apm-csi")
	r := scaleRecord("/var/lib/apm-csi", 7)
	key := r.Key()
	body := c.encodeCompact(r)
	d := decoder{c: c, paths: map[string]string{}, interned: map[string]string{}, skipAttributes: true, detach: true}
	records := make([]Record, 1024)
	i := 0
	for b.Loop() {
		if i == len(records) {
			clear(records)
			i = 0
		}
		if _, err := d.decodeBody(&records[i], key, body); err != nil {
			b.Fatal(err)
		}
		i++
	}
}
