package repoallow

import (
	"fmt"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// SecretScope restricts one pull secret: which repositories it is sent to and which
// namespaces' pods may use it. Empty Repositories: every allowed repository its keys match;
// empty Namespaces: every namespace.
type SecretScope struct {
	// Secret is the secret's name: its directory below the pull secret directory.
	Secret       string   `json:"secret"`
	Repositories []string `json:"repositories,omitempty"`
	Namespaces   []string `json:"namespaces,omitempty"`
}

// ParseSecretScope parses the flag syntax SECRET=PREFIX[,PREFIX...][@NAMESPACE[,NAMESPACE...]],
// e.g. "team-a=registry.example/team-a@team-a,team-a-dev" or "shared=@ns1".
func ParseSecretScope(s string) (SecretScope, error) {
	secret, rest, ok := strings.Cut(s, "=")
	if !ok {
		return SecretScope{}, fmt.Errorf("pull secret scope %q: want SECRET=REPOSITORY_PREFIX[,...][@NAMESPACE[,...]], e.g. team-a=registry.example/team-a@team-a", s)
	}
	repos, nss, _ := strings.Cut(rest, "@")
	sc := SecretScope{Secret: secret}
	for _, r := range strings.Split(repos, ",") {
		if r = strings.TrimSpace(r); r != "" {
			sc.Repositories = append(sc.Repositories, r)
		}
	}
	for _, n := range strings.Split(nss, ",") {
		if n = strings.TrimSpace(n); n != "" {
			sc.Namespaces = append(sc.Namespaces, n)
		}
	}
	if err := sc.Normalize(); err != nil {
		return SecretScope{}, fmt.Errorf("pull secret scope %q: %w", s, err)
	}
	return sc, nil
}

// Normalize validates the scope and canonicalises its repository prefixes.
func (sc *SecretScope) Normalize() error {
	if errs := validation.IsDNS1123Subdomain(sc.Secret); len(errs) > 0 {
		return fmt.Errorf("secret name %q: %s", sc.Secret, strings.Join(errs, "; "))
	}
	for i, r := range sc.Repositories {
		n, err := Normalize(r)
		if err != nil {
			return fmt.Errorf("secret %s: %w", sc.Secret, err)
		}
		sc.Repositories[i] = n
	}
	for _, n := range sc.Namespaces {
		if errs := validation.IsDNS1123Label(n); len(errs) > 0 {
			return fmt.Errorf("secret %s: namespace %q: %s", sc.Secret, n, strings.Join(errs, "; "))
		}
	}
	return nil
}

// Grants reports whether a pod of namespace may use the secret for the normalised repo.
func (sc SecretScope) Grants(namespace, repo string) bool {
	if len(sc.Namespaces) > 0 && !slices.Contains(sc.Namespaces, namespace) {
		return false
	}
	if len(sc.Repositories) == 0 {
		return true
	}
	return slices.ContainsFunc(sc.Repositories, func(p string) bool { return Covers(p, repo) })
}
