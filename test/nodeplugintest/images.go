package nodeplugintest

import (
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/test/libimages"
)

// PushedImage is an image in the test registry, with what tests need to name it in a volume
// and to count its fetches at the registry.
type PushedImage struct {
	Repo string // datadog/dd-lib-python-init
	Tag  string
	// Ref is the reference a volume names: 127.0.0.1:port/datadog/dd-lib-python-init:tag.
	Ref   string
	Image v1.Image
}

// PushLibrary pushes libimages' dd-lib-<lang>-init image of version, tagged version, to
// datadog/dd-lib-<lang>-init as Datadog publishes it.
func PushLibrary(t testing.TB, reg *libimages.Registry, lang, version string) PushedImage {
	t.Helper()
	img, err := libimages.Library(lang, version)
	if err != nil {
		t.Fatal(err)
	}
	return Push(t, reg, "datadog/"+libref.PackageName(lang), version, img)
}

// PushInjector pushes libimages' apm-inject image of version, tagged version, to
// datadog/apm-inject.
func PushInjector(t testing.TB, reg *libimages.Registry, version string) PushedImage {
	t.Helper()
	img, err := libimages.Injector(version)
	if err != nil {
		t.Fatal(err)
	}
	return Push(t, reg, "datadog/"+libref.InjectorPackage, version, img)
}

// Push pushes img as repo:tag.
func Push(t testing.TB, reg *libimages.Registry, repo, tag string, img v1.Image) PushedImage {
	t.Helper()
	if _, err := reg.Push(repo, tag, img); err != nil {
		t.Fatal(err)
	}
	return PushedImage{Repo: repo, Tag: tag, Ref: reg.Repo(repo) + ":" + tag, Image: img}
}
