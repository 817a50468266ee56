package mutation

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/shared/tenancy"
)

// hostDirRefusal says why the pod may not use hostdir entry name, and what to change; "" when
// it may. Entries the configuration does not list are left to the node plugin (its --hostdir
// flags may declare entries the webhook does not know), with a warning.
func (m *Mutator) hostDirRefusal(pod *corev1.Pod, name string, in Input) (problem, fix, warning string) {
	entry, ok := m.cfg.HostDir(name)
	if !ok {
		if len(m.cfg.HostDirs) > 0 {
			warning = fmt.Sprintf("apm-csi: hostdir entry %s is not in the webhook's list of entries; the node plugin decides whether this pod may mount it", name)
		}
		return "", "", warning
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	where := "the entry's namespaces/serviceAccounts in the node plugin's configuration (Helm value node.hostDirs[].namespaces)"
	if err := entry.AuthorizeIdentity(tenancy.Identity{Namespace: pod.Namespace, ServiceAccount: sa}); err != nil {
		return fmt.Sprintf("hostdir entry %s may not be used by pods of namespace %s running as service account %s: %v", name, pod.Namespace, sa, err),
			"use an entry allowed for this namespace, run the pod in an allowed namespace or as an allowed service account, or ask the cluster administrator to add it to " + where, ""
	}
	if entry.NamespaceSelector == "" {
		return "", "", ""
	}
	if in.Namespace == nil {
		return fmt.Sprintf("hostdir entry %s is restricted to namespaces labelled %s, and namespace %s could not be read to check its labels: %v", name, entry.NamespaceSelector, pod.Namespace, in.NamespaceError),
			"create the pod again; if this persists, check the webhook's access to namespaces", ""
	}
	if err := entry.AuthorizeNamespaceLabels(pod.Namespace, in.Namespace.Labels); err != nil {
		return fmt.Sprintf("hostdir entry %s may not be used here: %v", name, err),
			"use an entry allowed for this namespace, or ask the cluster administrator to label the namespace or change " + where, ""
	}
	return "", "", ""
}
