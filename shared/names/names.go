// Package names holds the fixed identifiers that the webhook, the node plugin and the
// deployment manifests must agree on. Changing any of them is a breaking change for
// clusters that already run apm-csi.
package names

const (
	// DriverName is the CSI driver name registered with kubelet and written into pod specs.
	DriverName = "csi.apm-csi.io"

	// Prefix is the prefix of every label and annotation apm-csi owns.
	Prefix = "apm-csi.io/"

	// NodeBinary and WebhookBinary are the names of the two programs.
	NodeBinary    = "apm-csi-node"
	WebhookBinary = "apm-csi-webhook"

	// SystemNamespace is the namespace the manifests install apm-csi into.
	SystemNamespace = "apm-csi-system"
)
