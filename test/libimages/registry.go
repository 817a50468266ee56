package libimages

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"k8s.io/apimachinery/pkg/util/wait"
)

// Request is one request the registry served, as tests count them.
type Request struct {
	Method string
	// Kind is "manifest", "blob" or "other" (the /v2/ ping, uploads, tag lists).
	Kind string
	// Repo is the repository path without the registry host, e.g. "datadog/dd-lib-java-init".
	Repo string
	// Ref is the tag or digest of a manifest, the digest of a blob.
	Ref string
}

// Registry is go-containerregistry's in-process registry on a loopback port, with request
// counting, a way to stall blob downloads mid-way, optional basic auth, and Stop/Start that
// keep the address and the content (a registry outage and its recovery).
type Registry struct {
	handler http.Handler

	mu       sync.Mutex
	addr     string
	srv      *http.Server
	stopped  chan struct{}
	requests []Request
	hold     *hold
	user     string
	password string
}

type hold struct {
	after   int64
	release chan struct{}
}

// NewRegistry returns a registry that is not listening yet.
func NewRegistry() *Registry {
	return &Registry{handler: registry.New(registry.Logger(log.New(io.Discard, "", 0)))}
}

// Start creates and starts a registry for the test and stops it at cleanup.
func Start(t testing.TB) *Registry {
	t.Helper()
	r := NewRegistry()
	if err := r.Start(); err != nil {
		t.Fatalf("starting registry: %v", err)
	}
	t.Cleanup(func() { _ = r.Stop() })
	return r
}

// Start listens on 127.0.0.1: a new port the first time, the same one after a Stop.
func (r *Registry) Start() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.srv != nil {
		return errors.New("registry already started")
	}
	addr := r.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	r.addr = ln.Addr().String()
	r.stopped = make(chan struct{})
	r.srv = &http.Server{Handler: http.HandlerFunc(r.serve), ErrorLog: log.New(io.Discard, "", 0)}
	go func(srv *http.Server) { _ = srv.Serve(ln) }(r.srv)
	return nil
}

// Stop closes the listener and every connection: clients see "connection refused" until the
// next Start. Stalled downloads end.
func (r *Registry) Stop() error {
	r.mu.Lock()
	srv, stopped := r.srv, r.stopped
	r.srv = nil
	r.mu.Unlock()
	if srv == nil {
		return nil
	}
	close(stopped)
	return srv.Close()
}

// Addr is host:port, valid once started.
func (r *Registry) Addr() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.addr
}

// Repo returns the full repository name of repo on this registry.
func (r *Registry) Repo(repo string) string { return r.Addr() + "/" + repo }

// Push uploads img as repo:tag and returns its digest reference (addr/repo@sha256:...).
// Push requests are not counted.
func (r *Registry) Push(repo, tag string, img v1.Image) (string, error) {
	ref, err := name.NewTag(r.Repo(repo) + ":" + tag)
	if err != nil {
		return "", err
	}
	if err := remote.Write(ref, img, r.pushAuth()...); err != nil {
		return "", fmt.Errorf("pushing %s: %w", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		return "", err
	}
	r.ResetCounts()
	return r.Repo(repo) + "@" + d.String(), nil
}

// PushIndex uploads a multi-platform index as repo:tag and returns its digest reference.
func (r *Registry) PushIndex(repo, tag string, idx v1.ImageIndex) (string, error) {
	ref, err := name.NewTag(r.Repo(repo) + ":" + tag)
	if err != nil {
		return "", err
	}
	if err := remote.WriteIndex(ref, idx, r.pushAuth()...); err != nil {
		return "", fmt.Errorf("pushing %s: %w", ref, err)
	}
	d, err := idx.Digest()
	if err != nil {
		return "", err
	}
	r.ResetCounts()
	return r.Repo(repo) + "@" + d.String(), nil
}

func (r *Registry) pushAuth() []remote.Option {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.user == "" {
		return nil
	}
	return []remote.Option{remote.WithAuth(&authn.Basic{Username: r.user, Password: r.password})}
}

// RequireBasicAuth makes every request need these credentials (a private registry).
func (r *Registry) RequireBasicAuth(user, password string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.user, r.password = user, password
}

// HoldBlobs makes every blob download stall after sending `after` bytes, until release is
// called or the registry stops: a slow first download, or one to interrupt mid-way.
func (r *Registry) HoldBlobs(after int64) (release func()) {
	h := &hold{after: after, release: make(chan struct{})}
	r.mu.Lock()
	r.hold = h
	r.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			r.mu.Lock()
			if r.hold == h {
				r.hold = nil
			}
			r.mu.Unlock()
			close(h.release)
		})
	}
}

// Requests returns a copy of the requests served since the last reset.
func (r *Registry) Requests() []Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Request(nil), r.requests...)
}

// ResetCounts forgets the requests served so far.
func (r *Registry) ResetCounts() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.requests = nil
}

// Count returns how many requests match.
func (r *Registry) Count(match func(Request) bool) int {
	n := 0
	for _, req := range r.Requests() {
		if match(req) {
			n++
		}
	}
	return n
}

// BlobFetches counts GETs of the blob with digest d, in any repository.
func (r *Registry) BlobFetches(d v1.Hash) int {
	return r.Count(func(q Request) bool { return q.Method == http.MethodGet && q.Kind == "blob" && q.Ref == d.String() })
}

// ManifestFetches counts GETs of repo's manifest by ref (tag or digest).
func (r *Registry) ManifestFetches(repo, ref string) int {
	return r.Count(func(q Request) bool {
		return q.Method == http.MethodGet && q.Kind == "manifest" && q.Repo == repo && q.Ref == ref
	})
}

// ImageFetches returns, for img, the number of GETs of its manifest by digest and the
// largest number of GETs of any of its layer blobs: (1, 1) is exactly one pull.
func (r *Registry) ImageFetches(repo string, img v1.Image) (manifest, maxLayer int, err error) {
	d, err := img.Digest()
	if err != nil {
		return 0, 0, err
	}
	layers, err := img.Layers()
	if err != nil {
		return 0, 0, err
	}
	for _, l := range layers {
		ld, err := l.Digest()
		if err != nil {
			return 0, 0, err
		}
		maxLayer = max(maxLayer, r.BlobFetches(ld))
	}
	return r.ManifestFetches(repo, d.String()), maxLayer, nil
}

func (r *Registry) serve(w http.ResponseWriter, req *http.Request) {
	q := classify(req)
	r.mu.Lock()
	if q.Kind != "other" || req.Method == http.MethodGet {
		r.requests = append(r.requests, q)
	}
	user, password, h, stopped := r.user, r.password, r.hold, r.stopped
	r.mu.Unlock()

	if user != "" {
		u, p, ok := req.BasicAuth()
		if !ok || u != user || p != password {
			w.Header().Set("WWW-Authenticate", `Basic realm="libimages"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
	}
	if h != nil && q.Kind == "blob" && req.Method == http.MethodGet {
		w = &holdingWriter{ResponseWriter: w, hold: h, done: req.Context().Done(), stopped: stopped}
	}
	r.handler.ServeHTTP(w, req)
}

// classify parses /v2/<repo>/manifests/<ref> and /v2/<repo>/blobs/<digest>.
func classify(req *http.Request) Request {
	q := Request{Method: req.Method, Kind: "other"}
	p := strings.TrimPrefix(req.URL.Path, "/v2/")
	for _, kind := range []string{"manifests", "blobs"} {
		if i := strings.LastIndex(p, "/"+kind+"/"); i > 0 {
			rest := p[i+len(kind)+2:]
			if rest == "uploads" || strings.HasPrefix(rest, "uploads/") {
				return q
			}
			q.Kind = strings.TrimSuffix(kind, "s")
			q.Repo, q.Ref = p[:i], rest
			return q
		}
	}
	return q
}

// holdingWriter passes `after` bytes of a blob, then blocks until released.
type holdingWriter struct {
	http.ResponseWriter
	hold    *hold
	done    <-chan struct{}
	stopped <-chan struct{}
	written int64
}

func (w *holdingWriter) Write(p []byte) (int, error) {
	total := 0
	if room := w.hold.after - w.written; room < int64(len(p)) {
		if room > 0 {
			n, err := w.ResponseWriter.Write(p[:room])
			total, w.written = n, w.written+int64(n)
			if err != nil {
				return total, err
			}
			p = p[room:]
		}
		if f, ok := w.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		select {
		case <-w.hold.release:
		case <-w.done:
			return total, errors.New("client gone")
		case <-w.stopped:
			return total, errors.New("registry stopped")
		}
	}
	n, err := w.ResponseWriter.Write(p)
	w.written += int64(n)
	return total + n, err
}

// WaitQuiet waits until the registry has served no new request for quiet (at most max), so
// that the requests of an earlier, aborted download are not counted as a later call's: when an
// extraction is rejected, the flattening goroutine of mutate.Extract may still have a blob
// request on the wire.
func (r *Registry) WaitQuiet(quiet, max time.Duration) error {
	all := func(Request) bool { return true }
	last := r.Count(all)
	// Not immediate: the first comparison is one quiet period after the first count.
	err := wait.PollUntilContextTimeout(context.Background(), quiet, max, false, func(context.Context) (bool, error) {
		n := r.Count(all)
		if n == last {
			return true, nil
		}
		last = n
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("registry still busy after %v: %d requests", max, last)
	}
	return nil
}
