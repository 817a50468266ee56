// Package libref describes tracer library images: how Datadog names and lays them out, and
// how an OCI reference to one is validated. The webhook uses it to write volume attributes and
// the node plugin to read them, so both sides agree on what a reference means.
package libref

import (
	"fmt"
	"path"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
)

// Languages that have a Datadog library image, in the order the webhook injects them.
var Languages = []string{"java", "js", "python", "dotnet", "ruby", "php"}

const (
	// DefaultRegistry is where Datadog publishes its library images.
	DefaultRegistry = "gcr.io/datadoghq"

	// LibrarySource is the directory inside a dd-lib-<lang>-init image that holds the tracer.
	LibrarySource = "/datadog-init/package"

	// InjectorPackage is the image name of the injector (the LD_PRELOAD launcher).
	InjectorPackage = "apm-inject"
	// InjectorSource is the directory inside the injector image that holds the injector.
	InjectorSource = "/opt/datadog-packages/datadog-apm-inject"
	// InjectorTarget is where the injector is mounted in the container (and placed in a volume).
	InjectorTarget = "opt/datadog-packages/datadog-apm-inject"
	// LauncherPath is the shared object that /etc/ld.so.preload names in the injector layout.
	LauncherPath = "/opt/datadog-packages/datadog-apm-inject/stable/inject/launcher.preload.so"
	// LibraryTargetDir is where the injector layout places each language's package.
	LibraryTargetDir = "opt/datadog/apm/library"
)

// IsLanguage reports whether lang is one of Languages.
func IsLanguage(lang string) bool {
	for _, l := range Languages {
		if l == lang {
			return true
		}
	}
	return false
}

// PackageName returns the Datadog image name for a language: dd-lib-<lang>-init.
func PackageName(lang string) string { return "dd-lib-" + lang + "-init" }

// LanguageOfPackage returns the language of a dd-lib-<lang>-init package name.
func LanguageOfPackage(pkg string) (string, bool) {
	lang, ok := strings.CutPrefix(pkg, "dd-lib-")
	if !ok {
		return "", false
	}
	lang, ok = strings.CutSuffix(lang, "-init")
	if !ok || !IsLanguage(lang) {
		return "", false
	}
	return lang, true
}

// SourceForPackage returns the directory inside a Datadog package image that holds its payload.
func SourceForPackage(pkg string) string {
	if pkg == InjectorPackage {
		return InjectorSource
	}
	return LibrarySource
}

// LanguageTarget is where the injector layout places a language's package inside the volume.
func LanguageTarget(lang string) string { return path.Join(LibraryTargetDir, lang) }

// Image joins a registry, a package name and a version into an image reference. A version
// may be a tag ("v1.2.3"), a digest ("sha256:...") or both ("v1.2.3@sha256:...").
func Image(registry, pkg, version string) string {
	registry = strings.TrimSuffix(registry, "/")
	switch {
	case strings.HasPrefix(version, "sha256:"):
		return registry + "/" + pkg + "@" + version
	default:
		return registry + "/" + pkg + ":" + version
	}
}

// Ref is a parsed, validated image reference.
type Ref struct {
	// Repository is the fully qualified repository, e.g. "gcr.io/datadoghq/dd-lib-java-init".
	Repository string
	// Tag is empty when the reference names only a digest.
	Tag string
	// Digest is empty when the reference names only a tag.
	Digest string
}

// String returns the canonical form: repo:tag, repo@digest or repo:tag@digest.
func (r Ref) String() string {
	s := r.Repository
	if r.Tag != "" {
		s += ":" + r.Tag
	}
	if r.Digest != "" {
		s += "@" + r.Digest
	}
	return s
}

// Pinned reports whether the reference names a digest, so that it never needs the registry
// once cached.
func (r Ref) Pinned() bool { return r.Digest != "" }

// Parse validates an image reference of the form repo[:tag][@sha256:hex]. A reference with
// neither tag nor digest is refused rather than silently meaning "latest": tracer versions
// must be explicit.
func Parse(ref string) (Ref, error) {
	if ref == "" {
		return Ref{}, fmt.Errorf("empty image reference")
	}
	if len(ref) > 512 {
		return Ref{}, fmt.Errorf("image reference is %d characters long, the limit is 512", len(ref))
	}
	repoTag, digest, hasDigest := strings.Cut(ref, "@")
	var out Ref
	if hasDigest {
		d, err := name.NewDigest("example.invalid/x@"+digest, name.StrictValidation)
		if err != nil {
			return Ref{}, fmt.Errorf("image reference %q: invalid digest %q: want sha256:<64 hex digits>", ref, digest)
		}
		out.Digest = d.DigestStr()
		if !strings.HasPrefix(out.Digest, "sha256:") {
			return Ref{}, fmt.Errorf("image reference %q: only sha256 digests are supported", ref)
		}
	}
	// A tag follows the last ':' after the last '/' (a ':' before it is a registry port).
	repo := repoTag
	if i := strings.LastIndex(repoTag, ":"); i > strings.LastIndex(repoTag, "/") {
		repo, out.Tag = repoTag[:i], repoTag[i+1:]
		if out.Tag == "" {
			return Ref{}, fmt.Errorf("image reference %q: empty tag", ref)
		}
		if _, err := name.NewTag("example.invalid/x:"+out.Tag, name.StrictValidation); err != nil {
			return Ref{}, fmt.Errorf("image reference %q: invalid tag %q", ref, out.Tag)
		}
	}
	if out.Tag == "" && out.Digest == "" {
		return Ref{}, fmt.Errorf("image reference %q names no tag or digest: add :<version> or @sha256:<digest>", ref)
	}
	// Weak validation lets "org/image" default to Docker Hub, as every container runtime does.
	r, err := name.NewRepository(repo, name.WeakValidation)
	if err != nil {
		return Ref{}, fmt.Errorf("image reference %q: invalid repository %q: %v", ref, repo, err)
	}
	out.Repository = r.Name()
	return out, nil
}
