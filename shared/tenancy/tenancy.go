// Package tenancy is who may use a host directory entry: the namespaces (by name, and by label
// selector at admission) and optionally the service accounts whose pods may mount it. The node
// plugin checks names and service accounts against what kubelet reports for the pod (those
// podInfoOnMount attributes are written by kubelet and cannot be forged by the pod); the webhook
// checks the same and, since it reads namespaces, the label selector too.
package tenancy

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
)

// AllNamespaces, as the only element of Namespaces, lets every namespace use an entry.
const AllNamespaces = "*"

// Syntax is how an entry declares its tenancy, for error messages that tell the administrator
// what to write.
const Syntax = `declare who may use it: flag --hostdir NAME=PATH,namespaces=NS1|NS2 (or namespaces=* for every namespace)[,service-accounts=NS/SA|NS/SA][,namespace-selector=KEY=VALUE&KEY2 in (A|B)]; config file: namespaces: [NS1, NS2] (or ["*"]), serviceAccounts: [NS/SA], namespaceSelector: "KEY=VALUE"`

// Tenancy is who may use one entry. The zero value allows nobody and is refused by Validate:
// every entry must say whom it is for, "every namespace" included.
type Tenancy struct {
	// Namespaces whose pods may use the entry, or ["*"] for every namespace. Required.
	Namespaces []string `json:"namespaces,omitempty"`
	// NamespaceSelector (label selector syntax, e.g. "team=a,env in (dev,test)") further
	// restricts the namespaces to those whose labels match. Only the webhook can read labels:
	// the node plugin does not enforce it, so it narrows admission, it is not a boundary.
	NamespaceSelector string `json:"namespaceSelector,omitempty"`
	// ServiceAccounts ("namespace/name"), when set, further restrict the entry to pods running
	// as one of them. Each one's namespace must be allowed by Namespaces.
	ServiceAccounts []string `json:"serviceAccounts,omitempty"`
}

// Declared reports whether the tenancy says anything at all.
func (t Tenancy) Declared() bool { return len(t.Namespaces) > 0 }

// AllowsAllNamespaces reports whether Namespaces is ["*"].
func (t Tenancy) AllowsAllNamespaces() bool {
	return len(t.Namespaces) == 1 && t.Namespaces[0] == AllNamespaces
}

// Unrestricted reports whether any pod may use the entry, even one whose identity is unknown.
func (t Tenancy) Unrestricted() bool {
	return t.AllowsAllNamespaces() && len(t.ServiceAccounts) == 0 && t.NamespaceSelector == ""
}

// Validate checks the declaration. It does not normalise: see Normalize.
func (t Tenancy) Validate() error {
	if !t.Declared() {
		return errors.New(Syntax)
	}
	var errs []error
	if slices.Contains(t.Namespaces, AllNamespaces) && len(t.Namespaces) > 1 {
		errs = append(errs, fmt.Errorf("namespaces: %q means every namespace; list either %q alone or namespace names", AllNamespaces, AllNamespaces))
	}
	for _, ns := range t.Namespaces {
		if ns == AllNamespaces {
			continue
		}
		if msgs := validation.IsDNS1123Label(ns); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("namespaces: %q is not a namespace name: %s", ns, strings.Join(msgs, "; ")))
		}
	}
	if t.NamespaceSelector != "" {
		if _, err := labels.Parse(t.NamespaceSelector); err != nil {
			errs = append(errs, fmt.Errorf("namespaceSelector %q: %v", t.NamespaceSelector, err))
		}
	}
	for _, sa := range t.ServiceAccounts {
		ns, name, ok := strings.Cut(sa, "/")
		if !ok {
			errs = append(errs, fmt.Errorf("serviceAccounts: %q: want NAMESPACE/NAME", sa))
			continue
		}
		if msgs := validation.IsDNS1123Label(ns); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("serviceAccounts: %q: %q is not a namespace name: %s", sa, ns, strings.Join(msgs, "; ")))
			continue
		}
		if msgs := validation.IsDNS1123Subdomain(name); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("serviceAccounts: %q: %q is not a service account name: %s", sa, name, strings.Join(msgs, "; ")))
			continue
		}
		if !t.namespaceListed(ns) {
			errs = append(errs, fmt.Errorf("serviceAccounts: %q can never be allowed: namespace %s is not in namespaces (%s)", sa, ns, strings.Join(t.Namespaces, ", ")))
		}
	}
	return errors.Join(errs...)
}

// Normalize returns t with the selector in its canonical form (requirements sorted by key), so
// that a declaration read from a flag and from a file compare equal. t must be valid.
func (t Tenancy) Normalize() Tenancy {
	if t.NamespaceSelector != "" {
		if sel, err := labels.Parse(t.NamespaceSelector); err == nil {
			t.NamespaceSelector = sel.String()
		}
	}
	return t
}

func (t Tenancy) namespaceListed(ns string) bool {
	return t.AllowsAllNamespaces() || slices.Contains(t.Namespaces, ns)
}

// Identity is the pod asking for the entry, as kubelet (node plugin) or the API server
// (webhook) reports it. Empty fields are unknown.
type Identity struct {
	Namespace      string
	ServiceAccount string
}

// AuthorizeIdentity is the node plugin's decision: the namespace by name and the service
// account. It returns nil when allowed, else an error saying what did not match and what the
// entry allows. The namespace selector is not evaluated here (no labels on a node).
func (t Tenancy) AuthorizeIdentity(id Identity) error {
	if !t.Declared() {
		return errors.New("the entry declares no namespaces, so no pod may use it")
	}
	if t.AllowsAllNamespaces() && len(t.ServiceAccounts) == 0 {
		return nil
	}
	if id.Namespace == "" {
		return errors.New("the pod's namespace is unknown (kubelet sends it only when the CSIDriver has podInfoOnMount: true), and this entry is restricted to " + t.Describe())
	}
	if !t.namespaceListed(id.Namespace) {
		return fmt.Errorf("namespace %s is not allowed; the entry allows %s", id.Namespace, t.Describe())
	}
	if len(t.ServiceAccounts) == 0 {
		return nil
	}
	if id.ServiceAccount == "" {
		return errors.New("the pod's service account is unknown, and this entry is restricted to " + t.Describe())
	}
	if !slices.Contains(t.ServiceAccounts, id.Namespace+"/"+id.ServiceAccount) {
		return fmt.Errorf("service account %s/%s is not allowed; the entry allows %s", id.Namespace, id.ServiceAccount, t.Describe())
	}
	return nil
}

// AuthorizeNamespaceLabels is the selector half of the webhook's decision.
func (t Tenancy) AuthorizeNamespaceLabels(namespace string, nsLabels map[string]string) error {
	if t.NamespaceSelector == "" {
		return nil
	}
	sel, err := labels.Parse(t.NamespaceSelector)
	if err != nil {
		return fmt.Errorf("the entry's namespaceSelector %q is invalid: %v", t.NamespaceSelector, err)
	}
	if !sel.Matches(labels.Set(nsLabels)) {
		return fmt.Errorf("namespace %s does not carry the labels the entry requires (namespaceSelector %q)", namespace, t.NamespaceSelector)
	}
	return nil
}

// Describe says whom the entry allows, for messages.
func (t Tenancy) Describe() string {
	var parts []string
	if t.AllowsAllNamespaces() {
		parts = append(parts, "every namespace")
	} else {
		parts = append(parts, "namespaces "+strings.Join(t.Namespaces, ", "))
	}
	if t.NamespaceSelector != "" {
		parts = append(parts, "labelled "+t.NamespaceSelector)
	}
	if len(t.ServiceAccounts) > 0 {
		parts = append(parts, "service accounts "+strings.Join(t.ServiceAccounts, ", "))
	}
	return strings.Join(parts, ", ")
}
