package mutation

import (
	"errors"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
)

// TestStatusOutcomeReadsBackEveryDecision: the stored status annotation of every kind of
// decision reads back into the outcome and reason that wrote it, so that an Event derived from
// the stored pod says what the webhook decided.
func TestStatusOutcomeReadsBackEveryDecision(t *testing.T) {
	windows := webPod()
	windows.Spec.NodeSelector = map[string]string{corev1.LabelOSStable: "windows"}
	rewriteNS := withNSLabel(plainNamespace(), config.DefaultSSINamespaceLabel, "rewrite")
	tests := []struct {
		name string
		in   Input
		cfg  func(*config.Config)
		want Outcome
	}{
		{name: "SSI injection", in: input(webPod(), ssiNamespace()), want: OutcomeInjected},
		{name: "Datadog init containers rewritten", in: input(datadogInjectedPod(), rewriteNS), want: OutcomeRewritten},
		{name: "OpenTelemetry init containers rewritten", in: input(otelInjectedPod(), rewriteNS), want: OutcomeRewritten},
		{name: "rewritten with manual volumes", in: input(withAnnotations(withLabels(datadogInjectedPod(), annotations.Volumes, "enabled"),
			annotations.VolumePrefix+"sock", "hostdir=apm-socket; mountPath=/var/run/datadog"), rewriteNS), want: OutcomeRewritten},
		{name: "manual volumes only", in: input(withAnnotations(withLabels(webPod(), annotations.Volumes, "enabled"),
			annotations.VolumePrefix+"sock", "hostdir=apm-socket; mountPath=/var/run/datadog"), plainNamespace()), want: OutcomeInjected},
		{name: "init-container mode (not a rewrite although it names init containers)", in: input(webPod(), ssiNamespace()),
			cfg: func(c *config.Config) { c.Mode = config.ModeInitContainer }, want: OutcomeInjected},
		{name: "Windows pod skipped", in: input(windows, ssiNamespace()), want: OutcomeSkipped},
		{name: "unreadable namespace: error", in: Input{Pod: webPod(), NamespaceError: errors.New("timeout")}, want: OutcomeError},
		{name: "unknown library: error", in: input(withAnnotations(webPod(), annotations.Libraries, "cobol"), ssiNamespace()), want: OutcomeError},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var opts []func(*config.Config)
			if tt.cfg != nil {
				opts = append(opts, tt.cfg)
			}
			res := newTestMutator(t, opts...).Mutate(tt.in)
			if res.Outcome != tt.want || res.Pod == nil {
				t.Fatalf("decision %s (%s), want %s with a changed pod", res.Outcome, res.Reason, tt.want)
			}
			got, reason, ok := StatusOutcome(res.Pod.Annotations[annotations.InjectionStatus])
			if !ok || got != res.Outcome || reason != res.Reason {
				t.Errorf("StatusOutcome(%q) = %s, %q, %v; want %s, %q", res.Pod.Annotations[annotations.InjectionStatus], got, reason, ok, res.Outcome, res.Reason)
			}
		})
	}
}

func TestStatusOutcomeRejectsForeignValues(t *testing.T) {
	for _, s := range []string{"", "done", "Injected: by hand", "pending: later", "injected-by-someone-else"} {
		if o, _, ok := StatusOutcome(s); ok {
			t.Errorf("StatusOutcome(%q) = %s; a value the webhook never writes must not be reported", s, o)
		}
	}
	if o, r, ok := StatusOutcome("skipped"); !ok || o != OutcomeSkipped || r != "" {
		t.Errorf("a status without reason: %s %q %v", o, r, ok)
	}
}
