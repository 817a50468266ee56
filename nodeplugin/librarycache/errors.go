package librarycache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
)

// failure is what went wrong with one registry operation, in the terms the driver maps to
// gRPC codes.
type failure int

const (
	// failLocal: the node itself failed (disk full, permissions): no sentinel, the driver
	// reports an internal error.
	failLocal failure = iota
	// failUnavailable: the registry could not be reached or answered with a server error.
	failUnavailable
	// failDenied: the registry refused our credentials.
	failDenied
	// failNotFound: the registry says the repository, tag or manifest does not exist.
	failNotFound
	// failRejected: the content is unusable whatever registry serves it.
	failRejected
	// failCorrupt: the bytes received do not match the digest asked for (or ended early):
	// the transfer or that location is at fault, another location may serve the image.
	failCorrupt
)

// errCorrupt marks an image refused because every location served corrupted bytes; the
// refusal is remembered only briefly (transportRejectionTTL).
var errCorrupt = errors.New("content corrupted in transit")

// classify decides what err from go-containerregistry or the extractor means.
func classify(err error) failure {
	if errors.Is(err, extract.ErrRejected) || errors.Is(err, library.ErrImageRejected) {
		return failRejected
	}
	var terr *transport.Error
	if errors.As(err, &terr) {
		for _, d := range terr.Errors {
			switch d.Code {
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				return failNotFound
			case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
				return failDenied
			}
		}
		switch terr.StatusCode {
		case http.StatusNotFound:
			return failNotFound
		case http.StatusUnauthorized, http.StatusForbidden:
			return failDenied
		}
		return failUnavailable
	}
	var perr *pathError
	if errors.As(err, &perr) {
		return failLocal
	}
	if isIntegrityError(err) {
		return failCorrupt
	}
	// Checked after local errors: a syscall.Errno also satisfies net.Error.
	var nerr net.Error
	if errors.As(err, &nerr) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return failUnavailable
	}
	var rerr *extract.ReadError
	if errors.As(err, &rerr) {
		// Not a network error below it: the archive itself is corrupt (bad gzip or tar
		// framing, a path mutate.Extract refuses, a layer over the size cap, a digest
		// mismatch). Another registry would serve the same bytes.
		return failRejected
	}
	return failUnavailable
}

// pathError marks failures of the node's own filesystem, so they are never blamed on the
// registry.
type pathError struct{ err error }

func (e *pathError) Error() string { return e.err.Error() }
func (e *pathError) Unwrap() error { return e.err }

func localErr(err error) error {
	if err == nil {
		return nil
	}
	return &pathError{err: err}
}

// attempt is one registry location tried for an image, and how it failed.
type attempt struct {
	where string
	err   error
}

// registryError turns the failures of every location tried into one error wrapping the
// sentinel the driver maps to a gRPC code, with a message that says what to do. Each
// location's failure is described in fixed words (describe), never with what the server
// sent: callers log the full errors.
//
// "Not found" is only believed when every location says so; content is refused only when
// every location that served it served unusable content; corrupted transfers everywhere are
// errCorrupt (remembered briefly); otherwise the registry is unavailable (or refused access).
func registryError(image string, attempts []attempt) error {
	var parts []string
	var served, rejected, corrupt []attempt
	worst := failNotFound
	for _, a := range attempts {
		f := classify(a.err)
		switch f {
		case failLocal:
			// The node's own failure does not depend on where the image came from.
			return wrapFailure(f, image, a.err)
		case failRejected:
			rejected = append(rejected, a)
		case failCorrupt:
			corrupt = append(corrupt, a)
		}
		if f != failNotFound {
			served = append(served, a)
			if f == failUnavailable || f == failDenied {
				worst = min(worst, f)
			}
		}
		parts = append(parts, fmt.Sprintf("%s: %s", a.where, describe(a.err)))
	}
	cause := errors.New(strings.Join(parts, "; "))
	switch {
	case len(served) > 0 && len(rejected) == len(served):
		// The last location is the most authoritative (the source comes after mirrors).
		return wrapFailure(failRejected, image, rejected[len(rejected)-1].err)
	case len(served) > 0 && len(rejected)+len(corrupt) == len(served):
		return wrapFailure(failCorrupt, image, cause)
	case len(served) > 0 && worst == failNotFound:
		worst = failUnavailable
	}
	return wrapFailure(worst, image, cause)
}

// wrapFailure wraps both the sentinel and the cause, so errors.Is sees either.
func wrapFailure(f failure, image string, cause error) error {
	switch f {
	case failNotFound:
		return fmt.Errorf("%w: %s does not exist in the registry (%w); check the library image and version in the pod's annotations or volume attributes", library.ErrImageNotFound, image, cause)
	case failDenied:
		return fmt.Errorf("%w: the registry refused access to %s (%w); the node plugin needs a pull secret for it that is granted to this pod's namespace (--pull-secret-dir, --pull-secret-scope; Helm: libraries.pullSecrets) or node docker credentials, kubelet retries the mount", library.ErrRegistryUnavailable, image, cause)
	case failCorrupt:
		return fmt.Errorf("%w: %w: every location of %s served bytes that do not match the image's digest (%w); check the --registry-mirror and any proxy between the node and the registry, kubelet retries the mount", library.ErrRegistryUnavailable, errCorrupt, image, cause)
	case failUnavailable:
		return fmt.Errorf("%w: cannot pull %s and it is not cached on this node (%w); pods that use it wait until the registry or a --registry-mirror is reachable, kubelet retries the mount", library.ErrRegistryUnavailable, image, cause)
	case failRejected:
		if errors.Is(cause, library.ErrImageRejected) {
			return cause
		}
		return fmt.Errorf("%w: %s cannot be served as a library: %w", library.ErrImageRejected, image, cause)
	default:
		return fmt.Errorf("storing %s in the library cache: %w", image, cause)
	}
}
