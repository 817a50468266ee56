package librarycache

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"syscall"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Messages. gRPC messages reach the pod's Events, where the pod author reads them; the pod
// author also chooses the image, so a registry is whatever they point at. A registry's (or
// any server's) response body therefore never goes into a message: go-containerregistry's
// transport.Error carries up to 64 KiB of it. Messages describe a failure with fixed phrases
// (status class, well-known registry error codes, kind of network failure); the full error
// goes to the plugin log, truncated.

// maxLoggedError bounds an error logged from a registry operation.
const maxLoggedError = 512

// knownCodes are the registry error codes of the distribution spec, safe to repeat.
var knownCodes = []transport.ErrorCode{
	transport.BlobUnknownErrorCode, transport.BlobUploadInvalidErrorCode, transport.BlobUploadUnknownErrorCode,
	transport.DigestInvalidErrorCode, transport.ManifestBlobUnknownErrorCode, transport.ManifestInvalidErrorCode,
	transport.ManifestUnknownErrorCode, transport.ManifestUnverifiedErrorCode, transport.NameInvalidErrorCode,
	transport.NameUnknownErrorCode, transport.SizeInvalidErrorCode, transport.TagInvalidErrorCode,
	transport.UnauthorizedErrorCode, transport.DeniedErrorCode, transport.UnsupportedErrorCode,
	transport.TooManyRequestsErrorCode, transport.UnknownErrorCode, transport.UnavailableErrorCode,
}

// describe says what went wrong in words the node plugin chose, never the server's.
func describe(err error) string {
	var terr *transport.Error
	var perr *plainHTTPError
	var uerr x509.UnknownAuthorityError
	var herr x509.HostnameError
	var dnsErr *net.DNSError
	switch {
	case errors.As(err, &perr):
		return "plain HTTP refused: the registry is not listed in --insecure-registry"
	case errors.As(err, &terr):
		var codes []string
		for _, d := range terr.Errors {
			if slices.Contains(knownCodes, d.Code) && !slices.Contains(codes, string(d.Code)) {
				codes = append(codes, string(d.Code))
			}
		}
		s := fmt.Sprintf("HTTP %d (%s)", terr.StatusCode, statusClass(terr.StatusCode))
		if len(codes) > 0 {
			s += " " + strings.Join(codes, ", ")
		}
		return s
	case isIntegrityError(err):
		return "the content did not match its digest or ended early (corrupted in transit or by the server)"
	case strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		return "the registry speaks plain HTTP, which is refused unless it is listed in --insecure-registry"
	case errors.As(err, &uerr), errors.As(err, &herr), strings.Contains(err.Error(), "tls: "):
		return "TLS failed (certificate not trusted or not for this host)"
	case errors.As(err, &dnsErr):
		return "host name not found"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, context.DeadlineExceeded):
		return "timed out"
	case errors.Is(err, context.Canceled):
		return "cancelled"
	}
	var nerr net.Error
	if errors.As(err, &nerr) {
		if nerr.Timeout() {
			return "timed out"
		}
		return "network error"
	}
	return "unexpected response"
}

func statusClass(code int) string {
	switch {
	case code == http.StatusUnauthorized || code == http.StatusForbidden:
		return "access refused"
	case code == http.StatusNotFound:
		return "not found"
	case code == http.StatusTooManyRequests:
		return "rate limited"
	case code >= 500:
		return "server error"
	case code >= 400:
		return "request refused"
	case code >= 300:
		return "unexpected redirect"
	}
	return "unexpected status"
}

// isIntegrityError reports a transfer whose bytes do not match what was asked for: a digest
// or size mismatch (go-containerregistry verifies blobs and manifests as they are read) or a
// stream that ended early. Another location may serve the right bytes.
func isIntegrityError(err error) bool {
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return true
	}
	s := err.Error()
	return strings.Contains(s, "error verifying") || strings.Contains(s, "does not match requested digest") ||
		strings.Contains(s, "unexpected EOF")
}

func isStatus(err error, code int) bool {
	var terr *transport.Error
	return errors.As(err, &terr) && terr.StatusCode == code
}

// truncate bounds a logged error.
func truncate(s string) string {
	if len(s) <= maxLoggedError {
		return s
	}
	return s[:maxLoggedError] + "…(truncated)"
}

// logAttempts logs every failed location with its error, truncated: the administrator's
// view, with what the servers said.
func (p *puller) logAttempts(image string, attempts []attempt) {
	for _, a := range attempts {
		p.log.Warn("registry operation failed", "image", image, "location", a.where, "err", truncate(a.err.Error()))
	}
}
