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

// failf returns an error of the kinds given (library.Err* sentinels, or any error errors.Is
// and errors.As should find) whose message is only the formatted text: the kinds' own words
// are not repeated. Messages say each fact once: the driver names the image the pod asked for,
// the kind of failure and whether kubelet retries; the cache's message says what failed and
// what to fix, without naming the image again or promising a retry.
func failf(kinds []error, format string, args ...any) error {
	return &kindError{kinds: kinds, err: fmt.Errorf(format, args...)}
}

// fail is failf of one kind.
func fail(kind error, format string, args ...any) error {
	return failf([]error{kind}, format, args...)
}

type kindError struct {
	kinds []error
	err   error
}

func (e *kindError) Error() string   { return e.err.Error() }
func (e *kindError) Unwrap() []error { return append([]error{e.err}, e.kinds...) }

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
func registryError(attempts []attempt) error {
	var parts []string
	var served, rejected, corrupt []attempt
	worst := failNotFound
	for _, a := range attempts {
		f := classify(a.err)
		switch f {
		case failLocal:
			// The node's own failure does not depend on where the image came from.
			return wrapFailure(f, a.err)
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
		return wrapFailure(failRejected, rejected[len(rejected)-1].err)
	case len(served) > 0 && len(rejected)+len(corrupt) == len(served):
		return wrapFailure(failCorrupt, cause)
	case len(served) > 0 && worst == failNotFound:
		worst = failUnavailable
	}
	return wrapFailure(worst, cause)
}

// wrapFailure wraps both the sentinel and the cause, so errors.Is sees either.
func wrapFailure(f failure, cause error) error {
	switch f {
	case failNotFound:
		return fail(library.ErrImageNotFound, "no registry location has it (%w); check the library image and version in the pod's annotations or volume attributes", cause)
	case failDenied:
		return fail(library.ErrRegistryUnavailable, "the registry refused access (%w); the node plugin needs a pull secret for it that is granted to this pod's namespace (--pull-secret-dir, --pull-secret-scope; Helm: libraries.pullSecrets) or node docker credentials", cause)
	case failCorrupt:
		return failf([]error{library.ErrRegistryUnavailable, errCorrupt}, "every location served bytes that do not match the image's digest (%w); check the --registry-mirror and any proxy between the node and the registry", cause)
	case failUnavailable:
		return fail(library.ErrRegistryUnavailable, "it is not cached on this node and no registry location answered (%w); check that the registry or a --registry-mirror is reachable from the node", cause)
	case failRejected:
		if errors.Is(cause, library.ErrImageRejected) {
			return cause
		}
		return fail(library.ErrImageRejected, "%w", cause)
	default:
		return fmt.Errorf("storing it in the library cache: %w", cause)
	}
}
