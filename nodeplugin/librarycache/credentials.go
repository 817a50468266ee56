package librarycache

import (
	"context"
	"slices"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/apm-csi/apm-csi/shared/repoallow"
)

// requester is who a registry operation runs for: the namespace of the pod whose volume asked
// (kubelet's csi.storage.k8s.io/pod.namespace, which a pod cannot forge; "" for prefetch and
// callers without one). It travels in the flight's context, so the registry code in pull.go
// picks its credentials without knowing about namespaces.
type requester struct {
	namespace string
	// scopeKey names the namespace-restricted secrets granted to namespace: requests with
	// the same key can share a flight (they would send the same credentials).
	scopeKey string

	mu sync.Mutex
	// resolved: credentials were looked up, so the registry was asked (a grant may be
	// recorded); secret: the namespace-restricted secret the last lookup chose, "" if the
	// credentials (anonymous, node docker config, unrestricted secret) serve every namespace.
	resolved bool
	secret   string
}

type requesterKey struct{}

func withRequester(ctx context.Context, rq *requester) context.Context {
	return context.WithValue(ctx, requesterKey{}, rq)
}

func requesterFrom(ctx context.Context) *requester {
	if rq, ok := ctx.Value(requesterKey{}).(*requester); ok {
		return rq
	}
	return &requester{}
}

func (rq *requester) used() (resolved bool, secret string) {
	rq.mu.Lock()
	defer rq.mu.Unlock()
	return rq.resolved, rq.secret
}

func (rq *requester) record(secret string) {
	rq.mu.Lock()
	rq.resolved, rq.secret = true, secret
	rq.mu.Unlock()
}

// newRequester computes the scope key of namespace.
func (p *puller) newRequester(namespace string) *requester {
	var granted []string
	for _, sc := range p.cfg.PullSecretScopes {
		if len(sc.Namespaces) > 0 && slices.Contains(sc.Namespaces, namespace) {
			granted = append(granted, sc.Secret)
		}
	}
	slices.Sort(granted)
	return &requester{namespace: namespace, scopeKey: strings.Join(granted, ",")}
}

// scopeOf returns the scope configured for a secret, if any.
func (p *puller) scopeOf(secret string) (repoallow.SecretScope, bool) {
	i := slices.IndexFunc(p.cfg.PullSecretScopes, func(sc repoallow.SecretScope) bool { return sc.Secret == secret })
	if i < 0 {
		return repoallow.SecretScope{}, false
	}
	return p.cfg.PullSecretScopes[i], true
}

// keychainFor is the keychain of the flight running in ctx: the mounted pull secrets its
// namespace is granted, then the node's docker config.
func (p *puller) keychainFor(ctx context.Context) authn.Keychain {
	return &requestKeychain{p: p, rq: requesterFrom(ctx)}
}

type requestKeychain struct {
	p  *puller
	rq *requester
}

func (k *requestKeychain) Resolve(res authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), res)
}

func (k *requestKeychain) ResolveContext(ctx context.Context, res authn.Resource) (authn.Authenticator, error) {
	if k.p.cfg.Keychain != nil {
		k.rq.record("")
		return authn.Resolve(ctx, k.p.cfg.Keychain, res)
	}
	if k.p.cfg.PullSecretDir != "" {
		sk := &secretDirKeychain{dir: k.p.cfg.PullSecretDir, log: k.p.log, scopes: k.p.cfg.PullSecretScopes, namespace: k.rq.namespace}
		auth, secret := sk.resolve(res)
		if auth != authn.Anonymous {
			restricted := ""
			if sc, ok := k.p.scopeOf(secret); ok && len(sc.Namespaces) > 0 {
				restricted = secret
			}
			k.rq.record(restricted)
			return auth, nil
		}
	}
	k.rq.record("")
	return authn.Resolve(ctx, authn.DefaultKeychain, res)
}
