package mutation

import (
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// osLabels are the node labels that pin a pod to an operating system. kubelet sets
// kubernetes.io/os on every node; the beta label is the deprecated spelling that older
// manifests still use.
var osLabels = []string{corev1.LabelOSStable, "beta.kubernetes.io/os"}

// windowsPod reports whether the pod can only run on Windows (more precisely: on no Linux
// node, where the node plugin runs), and says what pins it there. A pod is pinned by
// spec.os.name, by its nodeSelector, or by required node affinity when every term of
// requiredDuringSchedulingIgnoredDuringExecution excludes Linux (terms are ORed, so a single
// term that admits Linux nodes makes the pod schedulable there).
func windowsPod(pod *corev1.Pod) (bool, string) {
	if pod.Spec.OS != nil && pod.Spec.OS.Name == corev1.Windows {
		return true, "spec.os.name: windows"
	}
	for _, l := range osLabels {
		if v, ok := pod.Spec.NodeSelector[l]; ok && v != string(corev1.Linux) {
			return true, fmt.Sprintf("nodeSelector %s: %s", l, v)
		}
	}
	aff := pod.Spec.Affinity
	if aff == nil || aff.NodeAffinity == nil || aff.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return false, ""
	}
	terms := aff.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms
	if len(terms) == 0 {
		return false, ""
	}
	var pins []string
	for _, term := range terms {
		pin := termExcludesLinux(term)
		if pin == "" {
			return false, ""
		}
		pins = append(pins, pin)
	}
	slices.Sort(pins)
	return true, "required node affinity " + strings.Join(slices.Compact(pins), " or ")
}

// termExcludesLinux returns the expression of a node selector term that no Linux node
// satisfies (its expressions are ANDed, so one is enough), or "".
func termExcludesLinux(term corev1.NodeSelectorTerm) string {
	linux := string(corev1.Linux)
	for _, e := range term.MatchExpressions {
		if !slices.Contains(osLabels, e.Key) {
			continue
		}
		excludes := false
		switch e.Operator {
		case corev1.NodeSelectorOpIn:
			excludes = !slices.Contains(e.Values, linux)
		case corev1.NodeSelectorOpNotIn:
			excludes = slices.Contains(e.Values, linux)
		case corev1.NodeSelectorOpDoesNotExist:
			excludes = true
		}
		if excludes {
			if len(e.Values) == 0 {
				return fmt.Sprintf("%s %s", e.Key, e.Operator)
			}
			return fmt.Sprintf("%s %s [%s]", e.Key, e.Operator, strings.Join(e.Values, ", "))
		}
	}
	return ""
}
