package librarycache

import (
	"errors"
	"flag"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/repoallow"
)

// transportRejectionTTL is how long an image is refused after every location served
// corrupted bytes: long enough that a pod's retries do not download it in a loop, short
// enough that a repaired mirror or proxy is used at once. Content that breaks the archive
// rules is refused for rejectionTTL.
const transportRejectionTTL = 30 * time.Second

// refusalTTL is how long a failed download's error is remembered for its digest (0: not).
func refusalTTL(err error) time.Duration {
	switch {
	case errors.Is(err, errCorrupt):
		return transportRejectionTTL
	case errors.Is(err, library.ErrImageRejected):
		return rejectionTTL
	}
	return 0
}

// addTrustFlags binds the flags that decide what the cache may pull and with which
// credentials.
func (c *Config) addTrustFlags(fs *flag.FlagSet) {
	repeatableFlag(fs, "allowed-repository", "registry or repository prefix library images may come from (repeatable), matched on path components after name normalisation (docker.io is index.docker.io); default "+libref.DefaultRegistry+"; every --registry-mirror source is always allowed", func(s string) error {
		if _, err := repoallow.Normalize(s); err != nil {
			return err
		}
		c.AllowedRepositories = append(c.AllowedRepositories, s)
		return nil
	})
	repeatableFlag(fs, "pull-secret-scope", "SECRET=REPOSITORY_PREFIX[,...][@NAMESPACE[,...]]: send the pull secret mounted as <pull-secret-dir>/SECRET only to these repositories and only for pods of these namespaces (repeatable); secrets without a scope serve every namespace", func(s string) error {
		sc, err := repoallow.ParseSecretScope(s)
		if err != nil {
			return err
		}
		c.PullSecretScopes = append(c.PullSecretScopes, sc)
		return nil
	})
}

// allowList is AllowedRepositories (or the Datadog default) plus every mirror's source: a
// mirror is the administrator's statement that its source is trusted.
func (c Config) allowList() (*repoallow.List, error) {
	prefixes := slices.Clone(c.AllowedRepositories)
	if len(prefixes) == 0 {
		prefixes = []string{libref.DefaultRegistry}
	}
	for _, m := range c.Mirrors {
		if m.Source != "" {
			prefixes = append(prefixes, m.Source)
		}
	}
	return repoallow.New(prefixes...)
}

// validateTrust checks the allowlist, the secret scopes, and that prefetched images are
// allowed (a configuration mistake is reported at start, not at the first pod).
func (c *Config) validateTrust() error {
	list, err := c.allowList()
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range c.Prefetch {
		if err := list.Check(p); err != nil {
			errs = append(errs, fmt.Errorf("prefetch: %w", err))
		}
	}
	seen := map[string]bool{}
	c.PullSecretScopes = slices.Clone(c.PullSecretScopes)
	for i := range c.PullSecretScopes {
		sc := &c.PullSecretScopes[i]
		sc.Repositories, sc.Namespaces = slices.Clone(sc.Repositories), slices.Clone(sc.Namespaces)
		if err := sc.Normalize(); err != nil {
			errs = append(errs, fmt.Errorf("pull secret scope: %w", err))
		}
		if seen[sc.Secret] {
			errs = append(errs, fmt.Errorf("pull secret %s is scoped twice; give it one scope with every repository and namespace", sc.Secret))
		}
		seen[sc.Secret] = true
	}
	return errors.Join(errs...)
}

// checkAllowed refuses an image outside the allowlist before any registry is contacted.
func (p *puller) checkAllowed(image string) error {
	err := p.allowed.Check(image)
	var nae *repoallow.NotAllowedError
	if !errors.As(err, &nae) {
		if err != nil {
			return fail(library.ErrImageNotAllowed, "%w", err)
		}
		return nil
	}
	allowed := "none"
	if len(nae.Allowed) > 0 {
		allowed = strings.Join(nae.Allowed, ", ")
	}
	// The driver names the image: the message says which repository and what to do, once.
	return failf([]error{library.ErrImageNotAllowed, nae}, "its repository %s is not in the allowed repositories (%s); use an image from an allowed repository, or ask the cluster administrator to add its repository with %s (Helm: libraries.allowedRepositories)",
		nae.Repository, allowed, repoallow.Flag)
}

// plainHTTPGuard refuses plain HTTP to every host not listed in --insecure-registry.
// go-containerregistry picks http for loopback and private addresses on its own (and follows
// redirects to http): that would let a pod's image reference make the plugin talk
// unencrypted to any service on the node's network.
type plainHTTPGuard struct {
	base     http.RoundTripper
	insecure map[string]bool
}

func (g *plainHTTPGuard) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "https" && !g.insecure[req.URL.Host] {
		if req.Body != nil {
			_ = req.Body.Close()
		}
		return nil, &plainHTTPError{host: req.URL.Host}
	}
	return g.base.RoundTrip(req)
}

// plainHTTPError is a plain HTTP request the guard refused.
type plainHTTPError struct{ host string }

func (e *plainHTTPError) Error() string {
	return fmt.Sprintf("plain HTTP to %s refused: only registries listed with --insecure-registry are reached without TLS", e.host)
}
