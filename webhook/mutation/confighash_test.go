package mutation

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
)

// TestStatusEndsWithTheConfigurationHash: with a hash, every status the mutator writes ends
// with it, even a status truncated for length, and still reads back to its outcome.
func TestStatusEndsWithTheConfigurationHash(t *testing.T) {
	cfg := config.Default()
	m := New(cfg, "apm-csi-system", WithConfigHash("0123456789ab"))
	own := webPod()
	own.Spec.Volumes = append(own.Spec.Volumes, corev1.Volume{Name: VolumeName, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
	rewriteNS := withNSLabel(plainNamespace(), config.DefaultSSINamespaceLabel, "rewrite")
	for name, in := range map[string]Input{
		"injected":                  input(webPod(), ssiNamespace()),
		"rewritten":                 input(datadogInjectedPod(), rewriteNS),
		"error":                     input(withAnnotations(webPod(), annotations.Libraries, "cobol"), ssiNamespace()),
		"own volume skipped":        input(own, ssiNamespace()),
		"long status still ends it": input(manyContainersPod(300), ssiNamespace()),
	} {
		t.Run(name, func(t *testing.T) {
			res := m.Mutate(in)
			if res.Pod == nil {
				t.Fatalf("decision %s (%s): want a status", res.Outcome, res.Reason)
			}
			status := res.Pod.Annotations[annotations.InjectionStatus]
			if !strings.HasSuffix(status, "; config 0123456789ab") {
				t.Errorf("status %q does not end with the configuration hash", status)
			}
			if got, _, ok := StatusOutcome(status); !ok || got != res.Outcome {
				t.Errorf("StatusOutcome(%q) = %s, %v; want %s", status, got, ok, res.Outcome)
			}
		})
	}
	if res := New(cfg, "apm-csi-system").Mutate(input(webPod(), ssiNamespace())); strings.Contains(res.Pod.Annotations[annotations.InjectionStatus], "config ") {
		t.Errorf("without a hash nothing is added: %q", res.Pod.Annotations[annotations.InjectionStatus])
	}
}
