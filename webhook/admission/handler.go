// Package admission is the apm-csi-webhook's controller-runtime admission handler: it reads
// what a decision needs from the cluster (the namespace, whether the CSI driver is installed),
// lets package mutation decide, and turns the decision into an admission response, a log line
// and metrics. It writes nothing to the API: Events are recorded from the stored pod by package
// podevents, so that they describe what the API server kept, not what the webhook answered.
package admission

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync/atomic"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrladmission "sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/apm-csi/apm-csi/webhook/mutation"
)

// Path is where the webhook server serves the pod mutation.
const Path = "/mutate-v1-pod"

// apiReadTimeout bounds the uncached namespace read, well within the webhook's timeout.
const apiReadTimeout = time.Second

// PodMutator is the admission.Handler for pod CREATE.
type PodMutator struct {
	// Mutator applies the configuration; Current, when set, replaces it and is read once per
	// request, so that a configuration reloaded meanwhile never mixes with the old one in one
	// decision.
	Mutator *mutation.Mutator
	Current func() *mutation.Mutator
	// Reader serves namespaces, the CSIDriver and nodes, normally from the manager's cache.
	Reader client.Reader
	// ServerVersion, when set, returns the API server's version ("" while unknown), for the
	// image-volume and auto modes.
	ServerVersion func() string
	// APIReader, when set, reads a namespace the cache does not have yet (just created).
	APIReader client.Reader
	Log       *slog.Logger
	// Now defaults to time.Now.
	Now func() time.Time

	served atomic.Bool
}

// Served reports whether the API server has sent this replica a pod since it started: proof
// that the API server reaches it through the Service (a ready replica may not be reachable yet
// while the endpoints propagate).
func (h *PodMutator) Served() bool { return h.served.Load() }

var _ ctrladmission.Handler = (*PodMutator)(nil)

// Handle decides about one pod. It never refuses a pod except for an invalid manual volume
// annotation: every other problem admits the pod, uninstrumented, with the reason recorded.
func (h *PodMutator) Handle(ctx context.Context, req ctrladmission.Request) (resp ctrladmission.Response) {
	start := time.Now()
	defer func() {
		// controller-runtime turns a panic into an error response, which the API server treats
		// as a denial whatever the failurePolicy. A bug here must never block a pod.
		if r := recover(); r != nil {
			h.logger().Error("panic while handling a pod; admitting it unchanged", "namespace", req.Namespace,
				"panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			observe(mutation.Result{Outcome: mutation.OutcomeError}, time.Since(start))
			resp = ctrladmission.Allowed("").WithWarnings("apm-csi: internal error, pod not instrumented")
		}
	}()
	if req.Operation != admissionv1.Create || req.Kind.Kind != "Pod" || req.Kind.Group != "" || req.SubResource != "" {
		return ctrladmission.Allowed("")
	}
	h.served.Store(true)
	pod := &corev1.Pod{}
	if err := json.Unmarshal(req.Object.Raw, pod); err != nil {
		h.logger().Error("cannot decode pod; admitting it unchanged", "namespace", req.Namespace, "err", err)
		observe(mutation.Result{Outcome: mutation.OutcomeError}, time.Since(start))
		return ctrladmission.Allowed("").WithWarnings("apm-csi: pod could not be decoded and was not instrumented")
	}
	// The namespace is not always in the object of a CREATE; the request always has it.
	pod.Namespace = req.Namespace

	res := h.Decide(ctx, pod)

	resp = h.respond(pod, res)
	elapsed := time.Since(start)
	observe(res, elapsed)
	h.log(pod, res, elapsed)
	return resp
}

// Decide reads what a decision needs from the cluster and lets the current configuration's
// mutator decide about pod (not modified). Admission and the uninstrumented-pod check (package
// drift) both decide through it, so they never disagree about a pod.
func (h *PodMutator) Decide(ctx context.Context, pod *corev1.Pod) mutation.Result {
	m := h.CurrentMutator()
	in := mutation.Input{Pod: pod, DriverInstalled: h.driverInstalled(ctx, m), Now: h.now()}
	in.Namespace, in.NamespaceError = h.namespace(ctx, pod.Namespace)
	if m.NeedsNodes(pod, in.Namespace, in.DriverInstalled) {
		if h.ServerVersion != nil {
			in.ServerVersion = h.ServerVersion()
		}
		in.Nodes, in.NodesError = h.nodes(ctx)
	}
	return m.Mutate(in)
}

// CurrentMutator is the mutator of the configuration in force.
func (h *PodMutator) CurrentMutator() *mutation.Mutator {
	if h.Current != nil {
		return h.Current()
	}
	return h.Mutator
}

func (h *PodMutator) respond(pod *corev1.Pod, res mutation.Result) ctrladmission.Response {
	switch {
	case res.Outcome == mutation.OutcomeDenied:
		return ctrladmission.Denied(res.Denial)
	case res.Pod == nil:
		return ctrladmission.Allowed("").WithWarnings(res.Warnings...)
	}
	// Diff the decoded pod against the mutated one (rather than against the raw request), so
	// that fields this build does not know are absent from both sides and never removed.
	original, err := json.Marshal(pod)
	if err == nil {
		var mutated []byte
		if mutated, err = json.Marshal(res.Pod); err == nil {
			resp := ctrladmission.PatchResponseFromRaw(original, mutated)
			if resp.Allowed {
				return resp.WithWarnings(res.Warnings...)
			}
			err = fmt.Errorf("%s", resp.Result.Message)
		}
	}
	h.logger().Error("cannot build the patch; admitting the pod unchanged", "namespace", pod.Namespace, "pod", podName(pod), "err", err)
	return ctrladmission.Allowed("").WithWarnings("apm-csi: internal error, pod not instrumented")
}

// namespace returns the pod's namespace, from the cache or, for a namespace created a moment
// ago, from the API server.
func (h *PodMutator) namespace(ctx context.Context, name string) (*corev1.Namespace, error) {
	ns := &corev1.Namespace{}
	err := h.Reader.Get(ctx, client.ObjectKey{Name: name}, ns)
	if apierrors.IsNotFound(err) && h.APIReader != nil {
		ctx, cancel := context.WithTimeout(ctx, apiReadTimeout)
		defer cancel()
		err = h.APIReader.Get(ctx, client.ObjectKey{Name: name}, ns)
	}
	if err != nil {
		return nil, err
	}
	return ns, nil
}

// nodes lists the nodes from the cache (shared, never modified: the mutation only reads them).
func (h *PodMutator) nodes(ctx context.Context) ([]corev1.Node, error) {
	var list corev1.NodeList
	if err := h.Reader.List(ctx, &list, client.UnsafeDisableDeepCopy); err != nil {
		h.logger().Warn("cannot list nodes; image volumes count as unsupported", "err", err)
		return nil, err
	}
	return list.Items, nil
}

// driverInstalled reports whether the CSIDriver object exists. Any doubt counts as not
// installed: init containers work without the driver, CSI volumes do not.
func (h *PodMutator) driverInstalled(ctx context.Context, m *mutation.Mutator) bool {
	name := m.Config().DriverName
	err := h.Reader.Get(ctx, client.ObjectKey{Name: name}, &storagev1.CSIDriver{})
	if err != nil && !apierrors.IsNotFound(err) {
		h.logger().Warn("cannot read the CSIDriver; assuming it is not installed", "driver", name, "err", err)
	}
	return err == nil
}

func (h *PodMutator) log(pod *corev1.Pod, res mutation.Result, elapsed time.Duration) {
	level := slog.LevelInfo
	switch res.Outcome {
	case mutation.OutcomeIgnored:
		level = slog.LevelDebug
	case mutation.OutcomeError:
		level = slog.LevelWarn
	}
	h.logger().Log(context.Background(), level, "pod admission",
		"namespace", pod.Namespace, "pod", podName(pod),
		"result", string(res.Outcome), "mode", string(res.Mode), "layout", string(res.Layout),
		"libraries", res.Libraries, "reason", res.Reason, "duration", elapsed)
}

func observe(res mutation.Result, elapsed time.Duration) {
	mode := string(res.Mode)
	if mode == "" {
		mode = modeNone
	}
	mutationsTotal.WithLabelValues(string(res.Outcome), mode).Inc()
	mutationDuration.WithLabelValues(string(res.Outcome)).Observe(elapsed.Seconds())
}

func podName(pod *corev1.Pod) string {
	if pod.Name != "" {
		return pod.Name
	}
	return pod.GenerateName
}

func (h *PodMutator) now() time.Time {
	if h.Now != nil {
		return h.Now()
	}
	return time.Now()
}

func (h *PodMutator) logger() *slog.Logger {
	if h.Log != nil {
		return h.Log
	}
	return slog.Default()
}
