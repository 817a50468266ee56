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
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
)

func TestClassify(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want failure
	}{
		{"manifest unknown", &transport.Error{StatusCode: 404, Errors: []transport.Diagnostic{{Code: transport.ManifestUnknownErrorCode}}}, failNotFound},
		{"name unknown", &transport.Error{StatusCode: 404, Errors: []transport.Diagnostic{{Code: transport.NameUnknownErrorCode}}}, failNotFound},
		{"bare 404 (HEAD)", &transport.Error{StatusCode: 404}, failNotFound},
		{"unauthorized", &transport.Error{StatusCode: 401, Errors: []transport.Diagnostic{{Code: transport.UnauthorizedErrorCode}}}, failDenied},
		{"forbidden", &transport.Error{StatusCode: http.StatusForbidden}, failDenied},
		{"server error", &transport.Error{StatusCode: 503}, failUnavailable},
		{"rate limited", &transport.Error{StatusCode: 429, Errors: []transport.Diagnostic{{Code: transport.TooManyRequestsErrorCode}}}, failUnavailable},
		{"connection refused", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, failUnavailable},
		{"dns", &net.DNSError{Err: "no such host", Name: "gcr.io"}, failUnavailable},
		// A blob that ends early is a transfer failure: the next location is tried.
		{"cut mid-layer", &extract.ReadError{Err: io.ErrUnexpectedEOF}, failCorrupt},
		{"digest mismatch", &extract.ReadError{Err: errors.New("error verifying sha256 checksum after reading 100 bytes; got \"sha256:aa\", want \"sha256:bb\"")}, failCorrupt},
		{"reset mid-layer", &extract.ReadError{Err: fmt.Errorf("read: %w", syscall.ECONNRESET)}, failUnavailable},
		{"timeout", fmt.Errorf("pull: %w", context.DeadlineExceeded), failUnavailable},
		{"hostile entry", &extract.RejectedError{Entry: "dev/mem", Reason: "is a device node"}, failRejected},
		{"corrupt archive", &extract.ReadError{Err: errors.New("archive/tar: invalid tar header")}, failRejected},
		{"rejected by the cache", fmt.Errorf("%w: no platform", library.ErrImageRejected), failRejected},
		{"disk full", localErr(syscall.ENOSPC), failLocal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := classify(tt.err); got != tt.want {
				t.Errorf("classify(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

func TestRegistryError(t *testing.T) {
	notFound := &transport.Error{StatusCode: 404}
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	tests := []struct {
		name     string
		attempts []attempt
		want     error
		wantText []string
	}{
		{"not found everywhere", []attempt{{"mirror/x", notFound}, {"gcr.io/x", notFound}}, library.ErrImageNotFound, []string{"no registry location has it", "mirror/x", "gcr.io/x"}},
		// A mirror without the image and an unreachable source: the image may exist.
		{"not found on the mirror, source down", []attempt{{"mirror/x", notFound}, {"gcr.io/x", refused}}, library.ErrRegistryUnavailable, []string{"not cached on this node", "connection refused"}},
		{"denied", []attempt{{"gcr.io/x", &transport.Error{StatusCode: 401}}}, library.ErrRegistryUnavailable, []string{"refused access", "--pull-secret-dir"}},
		{"content refused only when every location serves it so", []attempt{{"mirror/x", &extract.RejectedError{Entry: "a", Reason: "is a FIFO"}}, {"gcr.io/x", refused}}, library.ErrRegistryUnavailable, []string{"not cached on this node", "connection refused"}},
		{"corrupt everywhere", []attempt{{"mirror/x", &extract.ReadError{Err: io.ErrUnexpectedEOF}}, {"gcr.io/x", &extract.ReadError{Err: errors.New("error verifying sha256 checksum")}}}, errCorrupt, []string{"do not match the image's digest", "mirror/x", "gcr.io/x"}},
		{"server text stays out", []attempt{{"gcr.io/x", &transport.Error{StatusCode: 502, Errors: []transport.Diagnostic{{Code: "PWNED", Message: "token=abc"}}}}}, library.ErrRegistryUnavailable, []string{"HTTP 502 (server error)"}},
		{"rejected everywhere", []attempt{{"gcr.io/x", &extract.RejectedError{Entry: "a", Reason: "is a FIFO"}}}, library.ErrImageRejected, []string{"is a FIFO"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := registryError(tt.attempts)
			if !errors.Is(err, tt.want) {
				t.Fatalf("registryError = %v, want %v", err, tt.want)
			}
			if strings.Contains(err.Error(), "PWNED") || strings.Contains(err.Error(), "token=abc") {
				t.Errorf("message %q repeats what the server said", err)
			}
			for _, w := range tt.wantText {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("message %q does not say %q", err, w)
				}
			}
		})
	}
	// Local failures wrap no registry sentinel: the driver reports them as internal errors.
	err := registryError([]attempt{{"gcr.io/x", localErr(syscall.ENOSPC)}})
	for _, s := range []error{library.ErrImageNotFound, library.ErrRegistryUnavailable, library.ErrImageRejected, library.ErrDownloadInProgress} {
		if errors.Is(err, s) {
			t.Errorf("disk full wraps %v", s)
		}
	}
	if !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("disk full lost its cause: %v", err)
	}
}
