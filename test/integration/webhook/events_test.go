package webhook_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/drift"
)

// podEventsNamed lists the Events of namespace ns about the pod of that name.
func (h *harness) podEventsNamed(tb testing.TB, ns, name string) []eventsv1.Event {
	tb.Helper()
	var list eventsv1.EventList
	if err := h.client.List(context.Background(), &list, client.InNamespace(ns)); err != nil {
		tb.Fatal(err)
	}
	return slices.DeleteFunc(list.Items, func(e eventsv1.Event) bool { return e.Regarding.Kind != "Pod" || e.Regarding.Name != name })
}

// podEvents lists the Events of namespace ns about the pod with that UID.
func (h *harness) podEvents(tb testing.TB, ns string, uid types.UID) []eventsv1.Event {
	tb.Helper()
	var list eventsv1.EventList
	if err := h.client.List(context.Background(), &list, client.InNamespace(ns)); err != nil {
		tb.Fatal(err)
	}
	return slices.DeleteFunc(list.Items, func(e eventsv1.Event) bool { return e.Regarding.UID != uid })
}

// TestEventsFromTheStoredPod: Events describe what the API server stored, written after the
// pod exists, never during admission.
func TestEventsFromTheStoredPod(t *testing.T) {
	h := startHarness(t)
	h.setDriver(t, true)
	h.namespace(t, "ev", map[string]string{"apm-csi.io/ssi": "enabled"}, nil)
	ctx := context.Background()

	t.Run("a pod created from generateName without owner gets its Event", func(t *testing.T) {
		p := pod("ev", "", nil, nil)
		p.GenerateName = "job-run-"
		if err := h.client.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(p.Annotations[annotations.InjectionStatus], "injected: csi mode") {
			t.Fatalf("stored status = %q", p.Annotations[annotations.InjectionStatus])
		}
		h.eventually(t, "an Injected Event about pod "+p.Name, func() bool {
			return slices.ContainsFunc(h.podEvents(t, "ev", p.UID), func(e eventsv1.Event) bool {
				return e.Reason == "Injected" && e.Type == corev1.EventTypeNormal && e.Regarding.Kind == "Pod" && e.Regarding.Name == p.Name &&
					strings.HasPrefix(e.Note, "csi mode, injector layout") && e.ReportingController == "apm-csi-webhook"
			})
		})
	})

	t.Run("a pod stored unmutated after the webhook's answer came too late gets no Injected Event", func(t *testing.T) {
		// The webhook decides and builds its patch, but answers after the API server's
		// timeoutSeconds (3 s); failurePolicy Ignore stores the pod as the client sent it.
		h.answerDelay.Store(int64(5 * time.Second))
		late := h.create(t, pod("ev", "answered-late", nil, nil))
		h.answerDelay.Store(0)
		assertUnmutated(t, late)

		// A pod created afterwards gets its Event; by then the late pod's would have been
		// written too, had it been derived from the admission answer.
		next := h.create(t, pod("ev", "answered-in-time", nil, nil))
		h.eventually(t, "the Event of the next pod", func() bool { return len(h.podEventsNamed(t, "ev", next.Name)) > 0 })
		var list eventsv1.EventList
		if err := h.client.List(ctx, &list, client.InNamespace("ev")); err != nil {
			t.Fatal(err)
		}
		for _, e := range list.Items {
			// The only Event such a pod gets says it runs uninstrumented (package drift).
			if e.Regarding.Name == "answered-late" && e.Reason != drift.ReasonNotInstrumented {
				t.Errorf("Event %s %q about a pod that was stored unmutated: %q", e.Reason, e.Regarding.Name, e.Note)
			}
		}
		h.eventually(t, "the NotInstrumented Event of the pod stored unmutated", func() bool {
			_, ok := h.eventsWithReason(t, "ev", drift.ReasonNotInstrumented)["Pod/answered-late"]
			return ok
		})
	})

	t.Run("a pod that needs no decision gets no Event", func(t *testing.T) {
		plain := h.create(t, pod("ev", "opted-out", map[string]string{annotations.DatadogEnabled: "false"}, nil))
		next := h.create(t, pod("ev", "after-opted-out", nil, nil))
		h.eventually(t, "the Event of the next pod", func() bool { return len(h.podEventsNamed(t, "ev", next.Name)) > 0 })
		if evs := h.podEvents(t, "ev", plain.UID); len(evs) != 0 {
			t.Errorf("Events about a pod the webhook left alone: %+v", evs)
		}
	})

	t.Run("a dry run records nothing", func(t *testing.T) {
		p := pod("ev", "dry", nil, nil)
		if err := h.client.Create(ctx, p, client.DryRunAll); err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(p.Annotations[annotations.InjectionStatus], "injected") {
			t.Fatalf("a dry run is mutated like a create; status %q", p.Annotations[annotations.InjectionStatus])
		}
		next := h.create(t, pod("ev", "after-dry", nil, nil))
		h.eventually(t, "the Event of the next pod", func() bool { return len(h.podEventsNamed(t, "ev", next.Name)) > 0 })
		var list eventsv1.EventList
		if err := h.client.List(ctx, &list, client.InNamespace("ev")); err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(list.Items, func(e eventsv1.Event) bool { return e.Regarding.Name == "dry" }) {
			t.Error("Event about a dry-run pod, which was never stored")
		}
	})
}
