// Package mutation decides what the webhook does to a pod and does it, as pure logic over
// Kubernetes objects: no API calls, no clock, no randomness. The same input always gives the
// same pod, which is what makes reinvocation and the tests deterministic.
package mutation

import (
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/apm-csi/apm-csi/shared/repoallow"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
)

// VolumeName is the pod volume that serves the libraries the webhook injects (a CSI inline
// volume, or the emptyDir of init-container mode).
const VolumeName = "apm-csi-libraries"

// Outcome is what the webhook did to a pod. It is also the "result" label of the metrics.
type Outcome string

const (
	// OutcomeIgnored: the pod was not the webhook's to touch (opted out, excluded namespace,
	// already processed, nothing to rewrite). The pod is admitted exactly as it came.
	OutcomeIgnored Outcome = "ignored"
	// OutcomeInjected: libraries were added (SSI or manual volumes).
	OutcomeInjected Outcome = "injected"
	// OutcomeRewritten: another injector's init containers were replaced by the CSI volume.
	OutcomeRewritten Outcome = "rewritten"
	// OutcomeSkipped: the pod was a target but nothing was injected; the status says why.
	OutcomeSkipped Outcome = "skipped"
	// OutcomeError: SSI could not be applied (bad library annotation, unreadable namespace);
	// the pod is admitted without instrumentation and the status says why.
	OutcomeError Outcome = "error"
	// OutcomeDenied: a manual volume annotation is invalid; the pod is refused with a message
	// that names the annotation and the fix.
	OutcomeDenied Outcome = "denied"
)

// Outcomes lists every outcome, for metrics initialisation.
var Outcomes = []Outcome{OutcomeIgnored, OutcomeInjected, OutcomeRewritten, OutcomeSkipped, OutcomeError, OutcomeDenied}

// Input is everything a decision depends on.
type Input struct {
	// Pod as received. It is never modified.
	Pod *corev1.Pod
	// Namespace of the pod, for its labels and annotations. Nil when it could not be read;
	// NamespaceError then says why, and SSI reports an error instead of guessing.
	Namespace      *corev1.Namespace
	NamespaceError error
	// DriverInstalled reports whether the CSIDriver object of the configured driver exists.
	DriverInstalled bool
	// ServerVersion is the API server's version (e.g. v1.35.2); "" when not known. Image-volume
	// and auto modes need it.
	ServerVersion string
	// Nodes are the cluster's nodes (name, labels, taints and status.nodeInfo are read), set
	// when NeedsNodes says the decision reads them; NodesError says why they could not be read.
	Nodes      []corev1.Node
	NodesError error
	// Now is the admission time, written into DD_INJECT_START_TIME.
	Now time.Time
}

// Result is the decision and, when the pod changes, the new pod.
type Result struct {
	Outcome Outcome
	// Reason says why, in words a person can act on.
	Reason string
	// Mode is how libraries were delivered; empty when none were.
	Mode config.Mode
	// Layout is the SSI layout used; empty for rewrites and manual volumes only.
	Layout config.Layout
	// Libraries are "<key>=<image>" entries, as written to the InjectedLibraries annotation.
	Libraries []string
	// Pod is the mutated copy; nil when the pod is admitted unchanged.
	Pod *corev1.Pod
	// Warnings go back to the client as admission warnings.
	Warnings []string
	// Denial is the message of a refused pod (OutcomeDenied).
	Denial string
}

// Mutator applies one configuration.
type Mutator struct {
	cfg *config.Config
	// allowed is the repository allowlist library images must match (fail closed: an
	// invalid list allows nothing).
	allowed *repoallow.List
	// excludedNamespaces always includes kube-system and the webhook's own namespace.
	excludedNamespaces []string
	// configHash, when set, ends every status the mutator writes ("; config <hash>").
	configHash string
}

// Option changes a Mutator at construction.
type Option func(*Mutator)

// WithConfigHash makes every status annotation the mutator writes end with
// "; config <hash>", so that a stored pod says which configuration admitted it.
func WithConfigHash(hash string) Option {
	return func(m *Mutator) { m.configHash = hash }
}

// New returns a Mutator. systemNamespace is the namespace apm-csi runs in; it is never
// mutated, whatever the configuration says.
func New(cfg *config.Config, systemNamespace string, opts ...Option) *Mutator {
	excluded := append([]string{metav1.NamespaceSystem, systemNamespace}, cfg.ExcludedNamespaces...)
	slices.Sort(excluded)
	allowed, err := cfg.AllowList()
	if err != nil {
		allowed = &repoallow.List{}
	}
	m := &Mutator{cfg: cfg, allowed: allowed, excludedNamespaces: slices.Compact(excluded)}
	for _, o := range opts {
		o(m)
	}
	return m
}

// ConfigHash is the hash given with WithConfigHash ("" when none).
func (m *Mutator) ConfigHash() string { return m.configHash }

// withHash ends a status reason with the configuration's hash (after any truncation, so that
// it is always there).
func (m *Mutator) withHash(reason string) string {
	if m.configHash == "" {
		return reason
	}
	return joinReason(reason, configHashPrefix+m.configHash)
}

// configHashPrefix introduces the configuration's hash at the end of a status.
const configHashPrefix = "config "

// Config returns the configuration the mutator applies.
func (m *Mutator) Config() *config.Config { return m.cfg }

// maxReason bounds the status annotation; a pod with hundreds of containers must not make
// its own annotations too large to store.
const maxReason = 1024

// Mutate decides what to do with a pod at creation.
func (m *Mutator) Mutate(in Input) Result {
	pod := in.Pod
	if _, mirror := pod.Annotations[corev1.MirrorPodAnnotationKey]; mirror {
		// kubelet runs the static pod from its manifest file; the API object only mirrors it,
		// so a change would never reach the containers (and the API server refuses most).
		return Result{Outcome: OutcomeIgnored, Reason: "mirror pod of a static pod (" + corev1.MirrorPodAnnotationKey + "): kubelet runs its manifest, not this object"}
	}
	if slices.Contains(m.excludedNamespaces, pod.Namespace) {
		return Result{Outcome: OutcomeIgnored, Reason: fmt.Sprintf("namespace %s is excluded", pod.Namespace)}
	}
	if s, ok := pod.Annotations[annotations.InjectionStatus]; ok {
		// Reinvocation, or a pod created from a copy of a processed pod: unchanged.
		return Result{Outcome: OutcomeIgnored, Reason: fmt.Sprintf("already processed (%s=%q)", annotations.InjectionStatus, s)}
	}
	if slices.ContainsFunc(pod.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == VolumeName }) {
		return m.reservedVolumeTaken(pod, in)
	}
	if hasOwnImageVolumes(pod) {
		return Result{Outcome: OutcomeIgnored, Reason: fmt.Sprintf("already processed (image volumes %s* exist)", ImageVolumePrefix)}
	}
	vols, err := annotations.ParseVolumes(pod.Annotations)
	if err != nil {
		return Result{Outcome: OutcomeDenied, Reason: err.Error(), Denial: err.Error()}
	}

	work := pod.DeepCopy()
	manual, err := m.applyManualVolumes(work, vols, in)
	if err != nil {
		return Result{Outcome: OutcomeDenied, Reason: err.Error(), Denial: err.Error()}
	}
	ssi := m.applySSI(work, in)

	res := Result{
		Outcome:   ssi.outcome,
		Reason:    ssi.reason,
		Mode:      ssi.mode,
		Layout:    ssi.layout,
		Libraries: append(ssi.libraries, manual.libraries...),
		Warnings:  append(ssi.warnings, manual.warnings...),
	}
	if len(manual.volumes) > 0 {
		note := "manual volumes " + strings.Join(manual.volumes, ", ")
		switch res.Outcome {
		case OutcomeIgnored:
			res.Outcome, res.Reason, res.Mode = OutcomeInjected, note, config.ModeCSI
		default:
			res.Reason = joinReason(res.Reason, note)
		}
	}
	if res.Outcome == OutcomeIgnored {
		return res
	}
	if len(res.Reason) > maxReason {
		res.Reason = res.Reason[:maxReason] + "..."
	}
	res.Reason = m.withHash(res.Reason)
	if work.Annotations == nil {
		work.Annotations = map[string]string{}
	}
	work.Annotations[annotations.InjectionStatus] = statusWord(res.Outcome) + ": " + res.Reason
	if len(res.Libraries) > 0 {
		work.Annotations[annotations.InjectedLibraries] = strings.Join(res.Libraries, ",")
	}
	res.Pod = work
	return res
}

func statusWord(o Outcome) string {
	switch o {
	case OutcomeInjected, OutcomeRewritten:
		return annotations.StatusInjected
	case OutcomeSkipped:
		return annotations.StatusSkipped
	}
	return annotations.StatusError
}

// rewriteReasonPrefix starts the reason of every rewrite (OutcomeRewritten), which the status
// annotation records with the word "injected": StatusOutcome tells the two apart by it.
const rewriteReasonPrefix = string(config.ModeCSI) + " mode, replaced init containers "

// StatusOutcome reads a stored status annotation back into the outcome that wrote it and its
// reason: the inverse of what Mutate writes, for reporting a pod from what the API server
// stored rather than from what the webhook answered. ok is false for a value the webhook does
// not write (someone else's text, or an empty annotation).
func StatusOutcome(status string) (outcome Outcome, reason string, ok bool) {
	word, reason, _ := strings.Cut(status, ": ")
	switch word {
	case annotations.StatusInjected:
		if strings.HasPrefix(reason, rewriteReasonPrefix) {
			return OutcomeRewritten, reason, true
		}
		return OutcomeInjected, reason, true
	case annotations.StatusSkipped:
		return OutcomeSkipped, reason, true
	case annotations.StatusError:
		return OutcomeError, reason, true
	}
	return "", "", false
}

func joinReason(a, b string) string {
	switch {
	case a == "":
		return b
	case b == "":
		return a
	}
	return a + "; " + b
}

// reservedVolumeTaken decides for a pod that already has a volume named VolumeName but no
// status annotation. If it is apm-csi's own volume (the CSI driver's, or the emptyDir its init
// containers fill), the pod's spec was copied from an instrumented pod: it is already wired and
// comes out unchanged. Otherwise it is the user's volume and the webhook cannot add its own: the
// pod is left as it is, and a pod the webhook would act on (an SSI target, or one with manual
// volume annotations) gets the reason in its status and counts as skipped.
func (m *Mutator) reservedVolumeTaken(pod *corev1.Pod, in Input) Result {
	v := pod.Spec.Volumes[slices.IndexFunc(pod.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == VolumeName })]
	ours := (v.CSI != nil && v.CSI.Driver == m.cfg.DriverName) ||
		(v.EmptyDir != nil && slices.ContainsFunc(pod.Spec.InitContainers, func(c corev1.Container) bool { return strings.HasPrefix(c.Name, InitContainerPrefix) }))
	if ours {
		return Result{Outcome: OutcomeIgnored, Reason: fmt.Sprintf("already processed (volume %s exists)", VolumeName)}
	}
	_, ssi := m.ssiTarget(pod, in)
	manual := slices.ContainsFunc(sortedKeys(pod.Annotations), annotations.IsVolumeKey)
	if !ssi && !manual {
		return Result{Outcome: OutcomeIgnored, Reason: fmt.Sprintf("not a target, and has a volume named %s", VolumeName)}
	}
	reason := m.withHash(fmt.Sprintf("the pod already has a volume named %s that apm-csi did not add; rename that volume to have the pod instrumented", VolumeName))
	work := pod.DeepCopy()
	if work.Annotations == nil {
		work.Annotations = map[string]string{}
	}
	work.Annotations[annotations.InjectionStatus] = statusWord(OutcomeSkipped) + ": " + reason
	return Result{Outcome: OutcomeSkipped, Reason: reason, Pod: work}
}

// MayInstrument reports, from a stored pod's metadata and its namespace alone, whether the
// webhook could have changed the pod at its creation, with the same rules as Mutate: not a
// mirror pod, not in an excluded namespace, no status annotation (a pod the webhook decided
// about, including every pod it skipped on purpose, has one), and selected for SSI or asking
// for manual volumes. False means no spec could make Mutate instrument the pod; true means
// Mutate on the whole pod decides. ns nil (not readable) is false unless the pod's own label
// selects it.
func (m *Mutator) MayInstrument(pod metav1.Object, ns *corev1.Namespace) bool {
	if _, mirror := pod.GetAnnotations()[corev1.MirrorPodAnnotationKey]; mirror {
		return false
	}
	if slices.Contains(m.excludedNamespaces, pod.GetNamespace()) {
		return false
	}
	if _, ok := pod.GetAnnotations()[annotations.InjectionStatus]; ok {
		return false
	}
	if pod.GetLabels()[annotations.Volumes] == annotations.VolumesEnabled {
		return true
	}
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: pod.GetNamespace(), Labels: pod.GetLabels()}}
	_, target := m.ssiTarget(p, Input{Pod: p, Namespace: ns})
	return target
}
