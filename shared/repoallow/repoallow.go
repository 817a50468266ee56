// Package repoallow is the allowlist of image repositories that library volumes may name.
// The node plugin pulls library images from the host network with the node's credentials, and
// inline CSI volumes reach it without admission, so it only serves repositories an
// administrator listed; the webhook checks the same list at admission so that a pod learns of
// a refusal before it is scheduled.
//
// Entries and references are compared after go-containerregistry's name normalisation
// (docker.io becomes index.docker.io, "org/image" is on Docker Hub), on path-component
// boundaries: "gcr.io/datadoghq" allows "gcr.io/datadoghq/dd-lib-java-init" but not
// "gcr.io/datadoghq-evil/x". Tags and digests are checked alike: only the repository counts.
package repoallow

import (
	"fmt"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/apm-csi/apm-csi/shared/libref"
)

// Flag is the node plugin flag (and the name used in messages) that extends the list.
const Flag = "--allowed-repository"

// List is a normalised, sorted set of registry or repository prefixes. The zero List allows
// nothing.
type List struct {
	prefixes []string
}

// Normalize canonicalises a registry ("registry.example:5000", "docker.io") or repository
// prefix ("gcr.io/datadoghq") the way go-containerregistry canonicalises repositories. The
// first component must be a registry host (a name with a dot or a port, or localhost), so
// that "datadog" is not silently read as Docker Hub's "index.docker.io/datadog".
func Normalize(prefix string) (string, error) {
	s := strings.TrimSpace(prefix)
	if s == "" || strings.ContainsAny(s, "@ \t") {
		return "", fmt.Errorf("allowed repository %q: want a registry host or repository prefix, e.g. gcr.io/datadoghq", prefix)
	}
	host, rest, _ := strings.Cut(strings.TrimSuffix(s, "/"), "/")
	if !strings.ContainsAny(host, ".:") && host != "localhost" {
		return "", fmt.Errorf("allowed repository %q: %q is not a registry host; write the registry first, e.g. docker.io/%s", prefix, host, strings.TrimSuffix(s, "/"))
	}
	reg, err := name.NewRegistry(host, name.StrictValidation)
	if err != nil {
		return "", fmt.Errorf("allowed repository %q: invalid registry %q: %v", prefix, host, err)
	}
	if rest == "" {
		return reg.Name(), nil
	}
	// Validated with a child component: a one-component path on Docker Hub must stay a
	// prefix ("docker.io/datadog"), not become "library/datadog".
	if _, err := name.NewRepository(reg.Name()+"/"+rest+"/x", name.StrictValidation); err != nil {
		return "", fmt.Errorf("allowed repository %q: invalid repository path %q: %v", prefix, rest, err)
	}
	return reg.Name() + "/" + rest, nil
}

// New normalises prefixes into a List; duplicates collapse.
func New(prefixes ...string) (*List, error) {
	l := &List{}
	for _, p := range prefixes {
		n, err := Normalize(p)
		if err != nil {
			return nil, err
		}
		if !slices.Contains(l.prefixes, n) {
			l.prefixes = append(l.prefixes, n)
		}
	}
	slices.Sort(l.prefixes)
	return l, nil
}

// Prefixes returns the normalised entries.
func (l *List) Prefixes() []string {
	if l == nil {
		return nil
	}
	return slices.Clone(l.prefixes)
}

// AllowsRepository reports whether a normalised repository (libref.Ref.Repository) is at or
// below an entry, on a path-component boundary.
func (l *List) AllowsRepository(repo string) bool {
	if l == nil {
		return false
	}
	for _, p := range l.prefixes {
		if Covers(p, repo) {
			return true
		}
	}
	return false
}

// Covers reports whether the normalised prefix covers the normalised repository: equal, or a
// parent on a path-component boundary.
func Covers(prefix, repo string) bool {
	rest, ok := strings.CutPrefix(repo, prefix)
	return ok && (rest == "" || strings.HasPrefix(rest, "/"))
}

// Check parses image and returns nil if its repository is allowed, else an error naming the
// image, its normalised repository, the list and the flag that extends it.
func (l *List) Check(image string) error {
	ref, err := libref.Parse(image)
	if err != nil {
		return err
	}
	if l.AllowsRepository(ref.Repository) {
		return nil
	}
	return &NotAllowedError{Image: image, Repository: ref.Repository, Allowed: l.Prefixes()}
}

// NotAllowedError is a library image outside the allowlist.
type NotAllowedError struct {
	Image      string
	Repository string
	Allowed    []string
}

func (e *NotAllowedError) Error() string {
	allowed := "none"
	if len(e.Allowed) > 0 {
		allowed = strings.Join(e.Allowed, ", ")
	}
	return fmt.Sprintf("library image %s (repository %s) is not in the allowed repositories (%s); use an image from an allowed repository, or ask the cluster administrator to add its repository with %s (Helm: libraries.allowedRepositories)", e.Image, e.Repository, allowed, Flag)
}
