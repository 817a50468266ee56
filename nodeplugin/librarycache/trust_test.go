package librarycache

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	clocktesting "k8s.io/utils/clock/testing"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/repoallow"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

func TestRepositoryOutsideAllowlistIsRefused(t *testing.T) {
	reg := libimages.Start(t)
	img := must[v1.Image](t)(libimages.Library("java", "v1"))
	good := nodeplugintest.Push(t, reg, "datadoghq/dd-lib-java-init", "v1", img)
	evil := nodeplugintest.Push(t, reg, "datadoghq-evil/dd-lib-java-init", "v1", img)
	other := nodeplugintest.Push(t, reg, "team-a/private", "v1", img)
	digest := must[v1.Hash](t)(img.Digest())

	c := newCache(t, Config{AllowedRepositories: []string{reg.Addr() + "/datadoghq"}, InsecureRegistries: []string{reg.Addr()}})
	reg.ResetCounts()
	for _, image := range []string{evil.Ref, other.Ref, reg.Repo("datadoghq-evil/dd-lib-java-init") + "@" + digest.String()} {
		_, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
		if !errors.Is(err, library.ErrImageNotAllowed) {
			t.Errorf("%s: %v, want ErrImageNotAllowed", image, err)
		}
		checkMessage(t, err, image, "not in the allowed repositories", repoallow.Flag)
	}
	if n := len(reg.Requests()); n != 0 {
		t.Errorf("the registry saw %d requests for refused images: %v", n, reg.Requests())
	}
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: good.Ref}); err != nil {
		t.Fatalf("allowed image: %v", err)
	}

	// The default list is the Datadog registry (and mirror sources): a test registry is not in it.
	d := newCache(t, Config{InsecureRegistries: []string{reg.Addr()}})
	if _, err := d.Layer(t.Context(), volumeattrs.Library{Image: good.Ref}); !errors.Is(err, library.ErrImageNotAllowed) {
		t.Errorf("default allowlist served %s: %v", good.Ref, err)
	}
	m := newCache(t, Config{InsecureRegistries: []string{reg.Addr()}, Mirrors: []Mirror{{Source: reg.Addr() + "/datadoghq", Mirror: reg.Addr() + "/datadoghq"}}})
	if _, err := m.Layer(t.Context(), volumeattrs.Library{Image: good.Ref}); err != nil {
		t.Errorf("a mirror's source must be allowed: %v", err)
	}
}

func TestCachedDigestIsNotServedForAnotherRepository(t *testing.T) {
	reg := libimages.Start(t)
	img := must[v1.Image](t)(libimages.Library("java", "team-a-secret"))
	digest := must[v1.Hash](t)(img.Digest()).String()
	nodeplugintest.Push(t, reg, "team-a/lib", "v1", img)
	nodeplugintest.Push(t, reg, "team-c/lib", "v1", img)
	must[string](t)(reg.Push("team-b/lib", "v1", must[v1.Image](t)(libimages.Library("java", "team-b"))))
	// An allowed registry that is not reachable.
	down := libimages.NewRegistry()
	if err := down.Start(); err != nil {
		t.Fatal(err)
	}
	downAddr := down.Addr()
	_ = down.Stop()

	c := newCache(t, Config{AllowedRepositories: []string{downAddr}, InsecureRegistries: []string{downAddr}}, reg)
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: reg.Repo("team-a/lib") + "@" + digest}); err != nil {
		t.Fatal(err)
	}
	reg.ResetCounts()
	_, err := c.Layer(t.Context(), volumeattrs.Library{Image: reg.Repo("team-b/lib") + "@" + digest})
	if !errors.Is(err, library.ErrImageNotFound) {
		t.Errorf("team-b@<team-a's digest> = %v, want ErrImageNotFound (team-b does not hold it)", err)
	}
	_, err = c.Layer(t.Context(), volumeattrs.Library{Image: downAddr + "/anything/lib@" + digest})
	if !errors.Is(err, library.ErrRegistryUnavailable) {
		t.Errorf("unreachable registry @<cached digest> = %v, want ErrRegistryUnavailable (not served)", err)
	}
	// A repository that holds the digest is confirmed with one request, then served as a hit.
	layer, err := c.Layer(t.Context(), volumeattrs.Library{Image: reg.Repo("team-c/lib") + "@" + digest})
	if err != nil {
		t.Fatalf("team-c holds the digest: %v", err)
	}
	equalTrees(t, nodeplugintest.ReadTree(t, layer.Dir), libimages.LibraryFiles("java", "team-a-secret"))
	if n := reg.BlobFetches(must[v1.Hash](t)(img.Digest())); n != 0 {
		t.Errorf("confirming a repository downloaded content (%d fetches)", n)
	}
	reg.ResetCounts()
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: reg.Repo("team-c/lib") + "@" + digest}); err != nil {
		t.Fatal(err)
	}
	if n := len(reg.Requests()); n != 0 {
		t.Errorf("a confirmed repository was asked again: %v", reg.Requests())
	}
}

// syncBuffer is a log sink for tests.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRegistryResponseBodiesStayInTheLog(t *testing.T) {
	const secret = "db-password=hunter2-do-not-show"
	var hits atomic.Int64
	internal := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusInternalServerError)
		_, _ = io.WriteString(w, "<html>internal admin console "+secret+strings.Repeat(" padding", 200)+"</html>")
	}))
	t.Cleanup(internal.Close)
	addr := strings.TrimPrefix(internal.URL, "http://")
	var log syncBuffer
	c := newCache(t, Config{
		AllowedRepositories: []string{addr}, InsecureRegistries: []string{addr},
		Logger: slog.New(slog.NewJSONHandler(&log, nil)),
	})
	for _, image := range []string{addr + "/admin/x:v1", addr + "/admin/x@sha256:" + strings.Repeat("ab", 32)} {
		_, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
		if !errors.Is(err, library.ErrRegistryUnavailable) {
			t.Fatalf("%s: %v, want ErrRegistryUnavailable", image, err)
		}
		if strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), "admin console") {
			t.Errorf("the message shown to the pod carries the server's response: %v", err)
		}
		if !strings.Contains(err.Error(), "HTTP 500 (server error)") {
			t.Errorf("message %q does not say what failed", err)
		}
	}
	if hits.Load() == 0 {
		t.Fatal("the registry was never asked")
	}
	if !strings.Contains(log.String(), "registry operation failed") {
		t.Errorf("the failure is not in the plugin log: %s", log.String())
	}
	for _, line := range strings.Split(log.String(), "\n") {
		if len(line) > 2*maxLoggedError+1024 {
			t.Errorf("a log line carries %d bytes: the response body is not truncated", len(line))
		}
	}
}

func TestPlainHTTPOnlyForInsecureRegistries(t *testing.T) {
	var hits atomic.Int64
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.WriteHeader(http.StatusNotFound)
	}))
	t.Cleanup(plain.Close)
	addr := strings.TrimPrefix(plain.URL, "http://")
	c := newCache(t, Config{AllowedRepositories: []string{addr}})
	_, err := c.Layer(t.Context(), volumeattrs.Library{Image: addr + "/datadoghq/dd-lib-java-init:v1"})
	if !errors.Is(err, library.ErrRegistryUnavailable) || !strings.Contains(err.Error(), "--insecure-registry") {
		t.Errorf("loopback registry without TLS = %v, want ErrRegistryUnavailable pointing at --insecure-registry", err)
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the plugin sent %d plain HTTP requests to %s, which is not an insecure registry", n, addr)
	}
}

// faultyProxy forwards to a registry and damages blob downloads while its mode is set:
// "flip" changes bytes in the middle of each blob, "truncate" ends each blob half-way.
type faultyProxy struct {
	srv  *httptest.Server
	mode atomic.Value
}

func startFaultyProxy(t *testing.T, reg *libimages.Registry, mode string) *faultyProxy {
	p := &faultyProxy{}
	p.mode.Store(mode)
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, err := http.NewRequestWithContext(r.Context(), r.Method, "http://"+reg.Addr()+r.URL.RequestURI(), r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		req.Header = r.Header.Clone()
		resp, err := http.DefaultTransport.RoundTrip(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		blob := r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") && resp.StatusCode == http.StatusOK
		switch mode := p.mode.Load().(string); {
		case blob && mode == "flip" && len(body) > 16:
			for i := len(body) / 3; i < len(body)/3+8; i++ {
				body[i] ^= 0xff
			}
		case blob && mode == "truncate":
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			w.WriteHeader(resp.StatusCode)
			_, _ = w.Write(body[:len(body)/2])
			if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
				_ = conn.(*net.TCPConn).SetLinger(0)
				_ = conn.Close()
			}
			return
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = w.Write(body)
	}))
	t.Cleanup(p.srv.Close)
	return p
}

func (p *faultyProxy) Addr() string { return strings.TrimPrefix(p.srv.URL, "http://") }

func TestBadMirrorFallsBackToTheSource(t *testing.T) {
	reg := libimages.Start(t)
	lib := nodeplugintest.PushLibrary(t, reg, "python", "v1")
	for _, mode := range []string{"flip", "truncate"} {
		t.Run(mode, func(t *testing.T) {
			mirror := startFaultyProxy(t, reg, mode)
			c := newCache(t, Config{
				Mirrors:            []Mirror{{Source: reg.Addr() + "/datadog", Mirror: mirror.Addr() + "/datadog"}},
				InsecureRegistries: []string{mirror.Addr()},
				StoreDir:           filepath.Join(t.TempDir(), "store"),
			}, reg)
			layer, err := c.Layer(t.Context(), volumeattrs.Library{Image: lib.Ref})
			if err != nil {
				t.Fatalf("mirror serving damaged blobs, good source: %v", err)
			}
			equalTrees(t, nodeplugintest.ReadTree(t, layer.Dir), libimages.LibraryFiles("python", "v1"))
		})
	}
}

func TestTransportRefusalExpiresQuickly(t *testing.T) {
	reg := libimages.Start(t)
	lib := nodeplugintest.PushLibrary(t, reg, "python", "v1")
	source := startFaultyProxy(t, reg, "flip")
	mirror := startFaultyProxy(t, reg, "flip")
	clock := clocktesting.NewFakeClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	c := newCache(t, Config{
		AllowedRepositories: []string{source.Addr()},
		Mirrors:             []Mirror{{Source: source.Addr() + "/datadog", Mirror: mirror.Addr() + "/datadog"}},
		InsecureRegistries:  []string{source.Addr(), mirror.Addr()},
		Clock:               clock,
	})
	image := source.Addr() + "/datadog/dd-lib-python-init@" + must[v1.Hash](t)(lib.Image.Digest()).String()
	_, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if !errors.Is(err, library.ErrRegistryUnavailable) || errors.Is(err, library.ErrImageRejected) || !strings.Contains(err.Error(), "do not match the image's digest") {
		t.Fatalf("every location damaged = %v, want ErrRegistryUnavailable saying the bytes do not match the digest", err)
	}
	// Repaired: the refusal is remembered only briefly.
	source.mode.Store("")
	mirror.mode.Store("")
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: image}); !errors.Is(err, errCorrupt) {
		t.Errorf("within the refusal TTL: %v, want the remembered refusal", err)
	}
	clock.Step(transportRejectionTTL + time.Second)
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: image}); err != nil {
		t.Fatalf("%s after the transport refusal expired, with the registry repaired: %v", transportRejectionTTL, err)
	}
}

func TestHostileContentRefusalIsNotShortened(t *testing.T) {
	if transportRejectionTTL >= rejectionTTL {
		t.Fatalf("transport refusals (%s) must be shorter than content refusals (%s)", transportRejectionTTL, rejectionTTL)
	}
	for _, tc := range []struct {
		err  error
		want time.Duration
	}{
		{registryError([]attempt{{"m", fmt.Errorf("reading archive: %w", io.ErrUnexpectedEOF)}, {"s", errors.New("error verifying sha256 checksum after reading 10 bytes")}}), transportRejectionTTL},
		{fmt.Errorf("%w: setuid", library.ErrImageRejected), rejectionTTL},
		{fmt.Errorf("%w: down", library.ErrRegistryUnavailable), 0},
	} {
		if got := refusalTTL(tc.err); got != tc.want {
			t.Errorf("refusalTTL(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}

func TestPullSecretsAreScopedToNamespaces(t *testing.T) {
	reg := libimages.Start(t)
	lib := nodeplugintest.Push(t, reg, "team-a/dd-lib-java-init", "v1", must[v1.Image](t)(libimages.Library("java", "private")))
	reg.RequireBasicAuth("team-a", "s3cret")
	secrets := t.TempDir()
	if err := os.MkdirAll(filepath.Join(secrets, "team-a"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`{"auths":{%q:{"auth":"dGVhbS1hOnMzY3JldA=="}}}`, reg.Addr())
	if err := os.WriteFile(filepath.Join(secrets, "team-a", ".dockerconfigjson"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c := newCache(t, Config{
		PullSecretDir:    secrets,
		PullSecretScopes: []repoallow.SecretScope{{Secret: "team-a", Repositories: []string{reg.Addr() + "/team-a"}, Namespaces: []string{"ns-a"}}},
	}, reg)
	ctx := t.Context()
	_, err := c.LayerFor(ctx, "ns-b", volumeattrs.Library{Image: lib.Ref})
	if !errors.Is(err, library.ErrRegistryUnavailable) || !strings.Contains(err.Error(), "refused access") || !strings.Contains(err.Error(), "namespace") {
		t.Fatalf("namespace ns-b with team-a's private image = %v, want a registry access error pointing at pull secrets granted to the namespace", err)
	}
	if _, err := c.LayerFor(ctx, "ns-a", volumeattrs.Library{Image: lib.Ref}); err != nil {
		t.Fatalf("namespace ns-a with its own secret: %v", err)
	}
	// Cached now, by ns-a's credentials: ns-b still cannot have it, by tag or by digest.
	pinned := reg.Repo(lib.Repo) + "@" + must[v1.Hash](t)(lib.Image.Digest()).String()
	for _, image := range []string{lib.Ref, pinned} {
		if _, err := c.LayerFor(ctx, "ns-b", volumeattrs.Library{Image: image}); !errors.Is(err, library.ErrRegistryUnavailable) || !strings.Contains(err.Error(), "refused access") {
			t.Errorf("ns-b after ns-a cached %s: %v, want the registry's refusal", image, err)
		}
		if _, err := c.LayerFor(ctx, "ns-a", volumeattrs.Library{Image: image}); err != nil {
			t.Errorf("ns-a, cached %s: %v", image, err)
		}
	}
	// Outside its repositories the secret is not sent, even for ns-a.
	reg.RequireBasicAuth("", "")
	other := nodeplugintest.Push(t, reg, "team-z/dd-lib-java-init", "v1", must[v1.Image](t)(libimages.Library("java", "z")))
	reg.RequireBasicAuth("team-a", "s3cret")
	if _, err := c.LayerFor(ctx, "ns-a", volumeattrs.Library{Image: other.Ref}); !errors.Is(err, library.ErrRegistryUnavailable) {
		t.Errorf("team-a's secret was sent for %s: %v", other.Ref, err)
	}
}
