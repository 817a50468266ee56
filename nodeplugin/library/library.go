// Package library is what the CSI driver and the library cache share: the layer a library
// volume stacks, the store interface the driver asks for layers, the errors that store wraps
// (the driver maps them to gRPC codes), and the set of layer dirs in use that the driver
// hands to the cache's garbage collector. It imports nothing of the node plugin, so the
// driver and the cache depend on it and not on each other.
package library

import (
	"context"
	"errors"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// Store turns library references into immutable, content-addressed directories that can
// serve as overlayfs lower dirs. It is implemented by nodeplugin/librarycache; the driver
// only composes what it returns into mounts, so its logic is testable with a fake store.
type Store interface {
	// LayerFor returns an immutable directory whose content is lib.Source of lib.Image placed
	// at lib.Target (the directory itself is the root of the volume view). It downloads the
	// image if needed. If ctx expires before a download finishes, the download goes on in the
	// background and LayerFor returns an error wrapping ErrDownloadInProgress. namespace is the
	// requesting pod's namespace as kubelet reports it (csi.storage.k8s.io/pod.namespace):
	// only registry credentials granted to it are used, and only cached images it could
	// have pulled are served to it.
	LayerFor(ctx context.Context, namespace string, lib volumeattrs.Library) (Layer, error)

	// GeneratedFiles returns an immutable directory holding exactly the given files
	// (relative path -> content), created once per distinct content. Used for the
	// ld.so.preload file, both as an extra lower dir and as a bind-mount source.
	GeneratedFiles(files map[string]string) (string, error)
}

// Layer is one lower dir of a library volume. The node plugin's state journal stores it as
// JSON: the field names are part of the on-disk format.
type Layer struct {
	// Dir is the absolute path of the immutable directory.
	Dir string `json:"dir"`
	// Digest is the manifest digest of the image it came from ("sha256:..."); empty for
	// generated files.
	Digest string `json:"digest,omitempty"`
}

// Errors a Store wraps, so the driver can choose the gRPC code kubelet acts on.
var (
	// ErrDownloadInProgress: a first download outlived the publish budget; it continues in
	// the background. Mapped to codes.Unavailable (non-final: kubelet retries).
	ErrDownloadInProgress = errors.New("library download in progress")
	// ErrRegistryUnavailable: the registry could not be reached and the library is not cached.
	// Mapped to codes.Unavailable.
	ErrRegistryUnavailable = errors.New("registry unavailable")
	// ErrImageNotFound: the registry answered that the image or tag does not exist.
	// Mapped to codes.NotFound.
	ErrImageNotFound = errors.New("image not found")
	// ErrImageRejected: the image is unusable (hostile archive, too large, no such source
	// directory). Mapped to codes.FailedPrecondition.
	ErrImageRejected = errors.New("image rejected")
	// ErrDownloadSlotsBusy: every download slot this library could use stayed busy for the
	// bounded wait. Mapped to codes.Unavailable.
	ErrDownloadSlotsBusy = errors.New("download slots busy")
	// ErrCacheFull: the library cache is over its disk budget and cannot take a new
	// library. Mapped to codes.ResourceExhausted (non-final: kubelet retries).
	ErrCacheFull = errors.New("library cache full")
	// ErrImageNotAllowed: the image's repository is not in the node's allowed repositories.
	// Mapped to codes.PermissionDenied.
	ErrImageNotAllowed = errors.New("image repository not allowed")
)

// InUse is the set of what the library cache's garbage collector must keep: absolute paths
// of layer dirs (or of anything inside a cache entry, such as a bind-mounted generated file)
// and image digests ("sha256:..."). The driver builds it whole; the collector keeps every
// entry a member lies in and removes nothing when the set cannot be built.
type InUse map[string]struct{}

// NewInUse returns a set holding members.
func NewInUse(members ...string) InUse {
	s := make(InUse, len(members))
	for _, m := range members {
		s.Add(m)
	}
	return s
}

// Add puts m in the set; the empty string is not a dir and is ignored.
func (s InUse) Add(m string) {
	if m != "" {
		s[m] = struct{}{}
	}
}

// Has reports whether m is in the set.
func (s InUse) Has(m string) bool {
	_, ok := s[m]
	return ok
}
