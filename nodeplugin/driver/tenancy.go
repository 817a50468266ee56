package driver

import (
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/shared/tenancy"
)

// attrServiceAccount is the pod's service account name; kubelet adds it (and overwrites any
// value the pod wrote) when the CSIDriver has podInfoOnMount: true.
const attrServiceAccount = "csi.storage.k8s.io/serviceAccount.name"

// authorizeHostDir checks that the pod kubelet publishes for may use the hostdir entry: its
// namespace and service account, as kubelet reports them, against the entry's tenancy. A
// restricted entry is refused to a publish that carries no pod identity. via is the prefix
// that explains a Datadog socket type's mapping to the entry ("" for type hostdir).
func (d *Driver) authorizeHostDir(r *publishRequest, entry hostdir.Entry, via string) error {
	id := tenancy.Identity{Namespace: r.attrs[attrPodNamespace], ServiceAccount: r.attrs[attrServiceAccount]}
	err := entry.Tenancy().AuthorizeIdentity(id)
	if err == nil {
		return nil
	}
	// err says which of the pod's namespace and service account is refused, or unknown: the
	// pod is named without them.
	pod := "this pod"
	if id.Namespace != "" {
		pod = "pod " + id.Namespace + "/" + r.attrs[attrPodName]
	}
	r.call.add("entry", entry.Name, "serviceAccount", id.ServiceAccount, "allowed", entry.Tenancy().Describe())
	return status.Errorf(codes.PermissionDenied,
		"%shostdir entry %q may not be used by %s: %v. The node administrator declares who may use each entry "+
			"in the node plugin's configuration: --hostdir NAME=PATH,namespaces=NS1|NS2[,service-accounts=NS/SA], "+
			"or namespaces/serviceAccounts of the entry in its --config file (Helm value node.hostDirs[].namespaces); "+
			"use an entry allowed for this namespace or ask for this one to be extended",
		via, entry.Name, pod, err)
}
