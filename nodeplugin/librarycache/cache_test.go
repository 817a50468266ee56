package librarycache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

func TestLayerServesLibraryAtRoot(t *testing.T) {
	reg := libimages.Start(t)
	image, img := pushLibrary(t, reg, "python", "v2.1.0")
	c := newCache(t, Config{}, reg)

	layer, err := c.Layer(t.Context(), volumeattrs.Library{Image: image, Source: libref.LibrarySource})
	if err != nil {
		t.Fatalf("Layer: %v", err)
	}
	digest := must[v1.Hash](t)(img.Digest())
	if layer.Digest != digest.String() {
		t.Errorf("Digest = %s, want %s", layer.Digest, digest)
	}
	if !strings.HasPrefix(layer.Dir, c.Dir()+"/") {
		t.Errorf("Dir %s is not inside the store %s", layer.Dir, c.Dir())
	}
	equalTrees(t, nodeplugintest.ReadTree(t, layer.Dir), libimages.LibraryFiles("python", "v2.1.0"))

	// A second publish within the TTL is served from the cache without the registry.
	reg.ResetCounts()
	again, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if err != nil {
		t.Fatal(err)
	}
	if again != layer {
		t.Errorf("second Layer = %+v, want %+v", again, layer)
	}
	if n := len(reg.Requests()); n != 0 {
		t.Errorf("the registry saw %d requests for a cached tag within its TTL: %v", n, reg.Requests())
	}
	if hits := metricValue(t, c.store.metrics.hits); hits != 1 {
		t.Errorf("hits = %v, want 1", hits)
	}
	if misses := metricValue(t, c.store.metrics.misses); misses != 1 {
		t.Errorf("misses = %v, want 1", misses)
	}
	if n := metricValue(t, c.store.metrics.downloads.WithLabelValues(resultSuccess)); n != 1 {
		t.Errorf("successful downloads = %v, want 1", n)
	}
	if n := metricValue(t, c.store.metrics.libraries); n != 1 {
		t.Errorf("libraries gauge = %v, want 1", n)
	}
}

func TestLayerPlacesLibraryAtTarget(t *testing.T) {
	reg := libimages.Start(t)
	c := newCache(t, Config{}, reg)
	injector := must[v1.Image](t)(libimages.Injector("0.30.1"))
	injRef := must[string](t)(reg.Push("datadog/apm-inject", "0.30.1", injector))
	javaRef, _ := pushLibrary(t, reg, "java", "v1.40.0")

	tests := []struct {
		name string
		lib  volumeattrs.Library
		want map[string]string
	}{
		{
			name: "language package in the injector layout",
			lib:  volumeattrs.Library{Image: javaRef, Source: libref.LibrarySource, Target: libref.LanguageTarget("java")},
			want: nodeplugintest.Prefixed(libref.LanguageTarget("java"), libimages.LibraryFiles("java", "v1.40.0")),
		},
		{
			name: "injector with its stable symlink",
			lib:  volumeattrs.Library{Image: injRef, Source: libref.InjectorSource, Target: libref.InjectorTarget},
			want: nodeplugintest.Prefixed(libref.InjectorTarget, libimages.InjectorFiles("0.30.1")),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			layer, err := c.Layer(t.Context(), tt.lib)
			if err != nil {
				t.Fatalf("Layer: %v", err)
			}
			equalTrees(t, nodeplugintest.ReadTree(t, layer.Dir), tt.want)
			// Views are hardlink farms: the files are the image's own inodes.
			imgLayer, err := c.Layer(t.Context(), volumeattrs.Library{Image: tt.lib.Image, Source: tt.lib.Source})
			if err != nil {
				t.Fatal(err)
			}
			for rel := range nodeplugintest.ReadTree(t, imgLayer.Dir) {
				a, err := os.Stat(filepath.Join(imgLayer.Dir, rel))
				if err != nil {
					t.Fatal(err)
				}
				b, err := os.Stat(filepath.Join(layer.Dir, tt.lib.Target, rel))
				if err != nil {
					t.Fatal(err)
				}
				if !os.SameFile(a, b) {
					t.Errorf("%s in the view is a copy, not a hardlink", rel)
				}
			}
			// Parents of the target are traversable by any pod user.
			fi, err := os.Stat(filepath.Join(layer.Dir, strings.Split(tt.lib.Target, "/")[0]))
			if err != nil || fi.Mode().Perm() != 0o755 {
				t.Errorf("target parent mode = %v (%v), want 0755", fi.Mode(), err)
			}
			again, err := c.Layer(t.Context(), tt.lib)
			if err != nil || again.Dir != layer.Dir {
				t.Errorf("second Layer = %v, %v; want the same view %s", again, err, layer.Dir)
			}
		})
	}
}

func TestConcurrentPublishesDownloadOnce(t *testing.T) {
	reg := libimages.Start(t)
	image, img := pushLibrary(t, reg, "js", "v5.0.0")
	c := newCache(t, Config{}, reg)

	const n = 25
	var wg sync.WaitGroup
	layers := make([]library.Layer, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			target := ""
			if i%2 == 1 {
				target = libref.LanguageTarget("js")
			}
			layers[i], errs[i] = c.Layer(t.Context(), volumeattrs.Library{Image: image, Source: libref.LibrarySource, Target: target})
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		if layers[i] != layers[i%2] {
			t.Errorf("publish %d got %v, publish %d got %v", i, layers[i], i%2, layers[i%2])
		}
	}
	manifests, maxLayer, err := reg.ImageFetches("datadog/dd-lib-js-init", img)
	if err != nil {
		t.Fatal(err)
	}
	if manifests != 1 || maxLayer != 1 {
		t.Errorf("registry served the manifest %d times and a layer up to %d times, want exactly one pull", manifests, maxLayer)
	}
	heads := reg.Count(func(q libimages.Request) bool { return q.Method == http.MethodHead && q.Kind == "manifest" })
	if heads != 1 {
		t.Errorf("tag resolved %d times, want 1", heads)
	}
}

func TestDownloadsInParallelBounded(t *testing.T) {
	for _, parallel := range []int{1, 2} {
		t.Run(fmt.Sprintf("max %d", parallel), func(t *testing.T) {
			// Two registries: one registry never gets every slot (TestStalledRegistryDoesNotStarveOthers).
			reg, reg2 := libimages.Start(t), libimages.Start(t)
			javaRef, javaImg := pushLibrary(t, reg, "java", "v1")
			rubyRef, rubyImg := pushLibrary(t, reg2, "ruby", "v1")
			c := newCache(t, Config{MaxParallelDownloads: parallel, DownloadSlotWait: time.Minute}, reg, reg2)
			release, release2 := reg.HoldBlobs(0), reg2.HoldBlobs(0)
			defer release()
			defer release2()

			done := make(chan error, 2)
			for _, ref := range []string{javaRef, rubyRef} {
				go func() {
					_, err := c.Layer(context.Background(), volumeattrs.Library{Image: ref})
					done <- err
				}()
			}
			// mutate.Extract reads the top layer first: a download has started once the
			// registry was asked for the image's payload (top) layer.
			payload := func(img v1.Image) v1.Hash {
				ls := must[[]v1.Layer](t)(img.Layers())
				return must[v1.Hash](t)(ls[len(ls)-1].Digest())
			}
			started := func() int {
				n := 0
				n += min(1, reg.BlobFetches(payload(javaImg)))
				n += min(1, reg2.BlobFetches(payload(rubyImg)))
				return n
			}
			waitUntil(t, 5*time.Second, func() bool { return started() >= parallel })
			// Give a download beyond the bound time to start, if the bound failed to hold it.
			time.Sleep(200 * time.Millisecond)
			if got := started(); got != parallel {
				t.Errorf("%d downloads running at once, want %d", got, parallel)
			}
			release()
			release2()
			for range 2 {
				if err := <-done; err != nil {
					t.Errorf("Layer: %v", err)
				}
			}
		})
	}
}

func TestSlowFirstDownloadReturnsInProgress(t *testing.T) {
	reg := libimages.Start(t)
	image, img := pushLibrary(t, reg, "dotnet", "v3.0.0")
	c := newCache(t, Config{}, reg)
	release := reg.HoldBlobs(100)
	defer release()

	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	_, err := c.Layer(ctx, volumeattrs.Library{Image: image})
	if !errors.Is(err, library.ErrDownloadInProgress) {
		t.Fatalf("Layer with a short budget = %v, want ErrDownloadInProgress", err)
	}
	checkMessage(t, err, image, "in the background")
	release()
	layer, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if err != nil {
		t.Fatalf("retry: %v", err)
	}
	equalTrees(t, nodeplugintest.ReadTree(t, layer.Dir), libimages.LibraryFiles("dotnet", "v3.0.0"))
	if _, maxLayer, _ := reg.ImageFetches("datadog/dd-lib-dotnet-init", img); maxLayer != 1 {
		t.Errorf("layers fetched up to %d times, want 1: the retry must reuse the background download", maxLayer)
	}
}

func TestRegistryOutage(t *testing.T) {
	reg := libimages.Start(t)
	cached, _ := pushLibrary(t, reg, "java", "v1.0.0")
	uncached, _ := pushLibrary(t, reg, "java", "v9.9.9")
	store := filepath.Join(t.TempDir(), "store")
	// A tiny TTL: every publish of a tag asks the registry.
	cfg := Config{StoreDir: store, TagTTL: time.Nanosecond}
	c := newCache(t, cfg, reg)
	first, err := c.Layer(t.Context(), volumeattrs.Library{Image: cached})
	if err != nil {
		t.Fatal(err)
	}
	pinned := reg.Repo("datadog/dd-lib-java-init") + "@" + first.Digest
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}

	got, err := c.Layer(t.Context(), volumeattrs.Library{Image: cached})
	if err != nil || got != first {
		t.Fatalf("cached tag during an outage = %v, %v; want %v", got, err, first)
	}
	if n := metricValue(t, c.store.metrics.staleServed); n != 1 {
		t.Errorf("stale_served = %v, want 1", n)
	}
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: pinned}); err != nil {
		t.Errorf("cached digest during an outage: %v", err)
	}
	_, err = c.Layer(t.Context(), volumeattrs.Library{Image: uncached})
	if !errors.Is(err, library.ErrRegistryUnavailable) {
		t.Fatalf("uncached tag during an outage = %v, want ErrRegistryUnavailable", err)
	}
	checkMessage(t, err, uncached, "not cached on this node", "connection refused")

	// After a restart, still during the outage, the remembered tag is served.
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c2 := newCache(t, cfg, reg)
	got, err = c2.Layer(t.Context(), volumeattrs.Library{Image: cached})
	if err != nil || got != first {
		t.Errorf("cached tag after a restart during an outage = %v, %v; want %v", got, err, first)
	}
}

func TestDigestReferenceNeverAsksTheRegistry(t *testing.T) {
	reg := libimages.Start(t)
	img := must[v1.Image](t)(libimages.Library("php", "v1"))
	pinned := must[string](t)(reg.Push("datadog/dd-lib-php-init", "v1", img))
	c := newCache(t, Config{TagTTL: time.Nanosecond}, reg)
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: pinned}); err != nil {
		t.Fatal(err)
	}
	reg.ResetCounts()
	for _, ref := range []string{pinned, strings.Replace(pinned, "@", ":v1@", 1)} {
		if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: ref}); err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
	}
	if n := len(reg.Requests()); n != 0 {
		t.Errorf("cached digest references made %d registry requests: %v", n, reg.Requests())
	}
}

func TestTagTTL(t *testing.T) {
	reg := libimages.Start(t)
	v1img := must[v1.Image](t)(libimages.Library("ruby", "one"))
	v2img := must[v1.Image](t)(libimages.Library("ruby", "two"))
	repo := "datadog/dd-lib-ruby-init"
	must[string](t)(reg.Push(repo, "latest-1", v1img))
	image := reg.Repo(repo) + ":latest-1"
	const ttl = 5 * time.Minute
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCache(t, Config{TagTTL: ttl, Clock: clk}, reg)
	first, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if err != nil {
		t.Fatal(err)
	}
	// The tag moves; within the TTL the old digest is still served without asking.
	must[string](t)(reg.Push(repo, "latest-1", v2img))
	clk.Step(ttl - time.Second)
	if got, err := c.Layer(t.Context(), volumeattrs.Library{Image: image}); err != nil || got.Digest != first.Digest {
		t.Errorf("within the TTL: %v, %v; want digest %s", got, err, first.Digest)
	}
	if n := len(reg.Requests()); n != 0 {
		t.Errorf("%d registry requests within the TTL", n)
	}
	// Past the TTL the registry is asked. The fake clock never fires the wait for a slow
	// registry (revalidateWait), so the answer decides.
	clk.Step(time.Second)
	got, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if err != nil {
		t.Fatal(err)
	}
	want := must[v1.Hash](t)(v2img.Digest())
	if got.Digest != want.String() {
		t.Errorf("after the TTL: digest %s, want the moved tag's %s", got.Digest, want)
	}
	equalTrees(t, nodeplugintest.ReadTree(t, got.Dir), libimages.LibraryFiles("ruby", "two"))
}

func TestNotFound(t *testing.T) {
	reg := libimages.Start(t)
	image, _ := pushLibrary(t, reg, "java", "v1")
	c := newCache(t, Config{}, reg)
	for _, ref := range []string{
		strings.Replace(image, ":v1", ":v404", 1),
		reg.Repo("datadog/no-such-image") + ":v1",
		reg.Repo("datadog/dd-lib-java-init") + "@sha256:" + strings.Repeat("ab", 32),
	} {
		_, err := c.Layer(t.Context(), volumeattrs.Library{Image: ref})
		if !errors.Is(err, library.ErrImageNotFound) {
			t.Errorf("%s: %v, want ErrImageNotFound", ref, err)
			continue
		}
		if !strings.Contains(err.Error(), "check the library image and version") {
			t.Errorf("%s: message %q does not say what to do", ref, err)
		}
	}
}

func TestSourceMissing(t *testing.T) {
	reg := libimages.Start(t)
	image, _ := pushLibrary(t, reg, "java", "v1")
	c := newCache(t, Config{}, reg)
	_, err := c.Layer(t.Context(), volumeattrs.Library{Image: image, Source: "/no/such/dir"})
	if !errors.Is(err, library.ErrImageRejected) || !strings.Contains(err.Error(), "/no/such/dir") {
		t.Fatalf("Layer = %v, want ErrImageRejected naming /no/such/dir", err)
	}
	_, err = c.Layer(t.Context(), volumeattrs.Library{Image: image, Source: "/datadog-init/copy-lib.sh"})
	if !errors.Is(err, library.ErrImageRejected) || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("file as source = %v, want ErrImageRejected (not a directory)", err)
	}
	_, err = c.Layer(t.Context(), volumeattrs.Library{Image: image, Source: "/usr/bin/env"})
	if !errors.Is(err, library.ErrImageRejected) || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("symlink as source = %v, want ErrImageRejected (symlink)", err)
	}
}

func TestMultiPlatformIndex(t *testing.T) {
	reg := libimages.Start(t)
	other := "arm64"
	if libimages.NodeArch() == "arm64" {
		other = "amd64"
	}
	mine := must[v1.Image](t)(libimages.Library("java", "mine"))
	theirs := must[v1.Image](t)(libimages.ImageFor(v1.Platform{OS: "linux", Architecture: other}, must[[]v1.Layer](t)(must[v1.Image](t)(libimages.Library("java", "theirs")).Layers())...))
	idx := must[v1.ImageIndex](t)(libimages.Index(map[string]v1.Image{"linux/" + libimages.NodeArch(): mine, "linux/" + other: theirs}))
	pinned := must[string](t)(reg.PushIndex("datadog/dd-lib-java-init", "multi", idx))
	onlyOther := must[v1.ImageIndex](t)(libimages.Index(map[string]v1.Image{"linux/" + other: theirs}))
	must[string](t)(reg.PushIndex("datadog/dd-lib-java-init", "foreign", onlyOther))

	c := newCache(t, Config{}, reg)
	layer, err := c.Layer(t.Context(), volumeattrs.Library{Image: reg.Repo("datadog/dd-lib-java-init") + ":multi"})
	if err != nil {
		t.Fatal(err)
	}
	equalTrees(t, nodeplugintest.ReadTree(t, layer.Dir), libimages.LibraryFiles("java", "mine"))
	if want := must[v1.Hash](t)(mine.Digest()); layer.Digest != want.String() {
		t.Errorf("digest %s, want the platform image's %s", layer.Digest, want)
	}
	// The index digest maps to the cached platform image without the registry.
	reg.ResetCounts()
	if got, err := c.Layer(t.Context(), volumeattrs.Library{Image: pinned}); err != nil || got != layer {
		t.Errorf("by index digest: %v, %v; want %v", got, err, layer)
	}
	if n := len(reg.Requests()); n != 0 {
		t.Errorf("index digest of a cached image made %d requests", n)
	}
	_, err = c.Layer(t.Context(), volumeattrs.Library{Image: reg.Repo("datadog/dd-lib-java-init") + ":foreign"})
	if !errors.Is(err, library.ErrImageRejected) || !strings.Contains(err.Error(), "platform") {
		t.Errorf("index without this platform = %v, want ErrImageRejected naming the platform", err)
	}
}

func TestMirrors(t *testing.T) {
	source := libimages.Start(t)
	mirror := libimages.Start(t)
	img := must[v1.Image](t)(libimages.Library("python", "mirrored"))
	must[string](t)(source.Push("datadog/dd-lib-python-init", "v1", img))
	must[string](t)(mirror.Push("dd/dd-lib-python-init", "v1", img))
	onlySource := must[v1.Image](t)(libimages.Library("python", "source-only"))
	must[string](t)(source.Push("datadog/dd-lib-python-init", "v2", onlySource))
	mirrors := []Mirror{{Source: source.Addr() + "/datadog", Mirror: mirror.Addr() + "/dd"}}

	t.Run("mirror first", func(t *testing.T) {
		c := newCache(t, Config{Mirrors: mirrors}, source, mirror)
		if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: source.Repo("datadog/dd-lib-python-init") + ":v1"}); err != nil {
			t.Fatal(err)
		}
		if n := len(source.Requests()); n != 0 {
			t.Errorf("the source saw %d requests though the mirror had the image", n)
		}
		if m, l, _ := mirror.ImageFetches("dd/dd-lib-python-init", img); m != 1 || l != 1 {
			t.Errorf("mirror served manifest %d, layers up to %d times; want 1, 1", m, l)
		}
	})
	t.Run("falls back when the mirror lacks the image", func(t *testing.T) {
		c := newCache(t, Config{Mirrors: mirrors}, source, mirror)
		layer, err := c.Layer(t.Context(), volumeattrs.Library{Image: source.Repo("datadog/dd-lib-python-init") + ":v2"})
		if err != nil {
			t.Fatal(err)
		}
		equalTrees(t, nodeplugintest.ReadTree(t, layer.Dir), libimages.LibraryFiles("python", "source-only"))
	})
	t.Run("falls back when the mirror is down", func(t *testing.T) {
		down := libimages.NewRegistry()
		if err := down.Start(); err != nil {
			t.Fatal(err)
		}
		addr := down.Addr()
		_ = down.Stop()
		c := newCache(t, Config{Mirrors: []Mirror{{Source: source.Addr(), Mirror: addr}}, InsecureRegistries: []string{addr}}, source)
		if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: source.Repo("datadog/dd-lib-python-init") + ":v1"}); err != nil {
			t.Fatal(err)
		}
	})
}

func TestPullSecretDir(t *testing.T) {
	reg := libimages.Start(t)
	image, _ := pushLibrary(t, reg, "java", "private")
	reg.RequireBasicAuth("puller", "s3cret")

	secrets := t.TempDir()
	c := newCache(t, Config{PullSecretDir: secrets}, reg)
	_, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if !errors.Is(err, library.ErrRegistryUnavailable) || !strings.Contains(err.Error(), "--pull-secret-dir") {
		t.Fatalf("without credentials = %v, want ErrRegistryUnavailable pointing at --pull-secret-dir", err)
	}
	// A secret mounted the way kubelet mounts it: a ..data symlink and a key symlink.
	dir := filepath.Join(secrets, "regcred")
	data := filepath.Join(dir, "..2025_01_01")
	if err := os.MkdirAll(data, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`{"auths":{%q:{"auth":"cHVsbGVyOnMzY3JldA=="}}}`, reg.Addr())
	if err := os.WriteFile(filepath.Join(data, ".dockerconfigjson"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..2025_01_01", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..data/.dockerconfigjson", filepath.Join(dir, ".dockerconfigjson")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: image}); err != nil {
		t.Fatalf("with the mounted secret: %v", err)
	}
}

func TestGeneratedFiles(t *testing.T) {
	c := newCache(t, Config{})
	files := map[string]string{volumeattrs.PreloadFile: libref.LauncherPath + "\n"}
	dir, err := c.GeneratedFiles(files)
	if err != nil {
		t.Fatal(err)
	}
	equalTrees(t, nodeplugintest.ReadTree(t, dir), files)
	fi, err := os.Stat(filepath.Join(dir, volumeattrs.PreloadFile))
	if err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("mode = %v (%v), want 0644", fi.Mode(), err)
	}
	if again, err := c.GeneratedFiles(map[string]string{volumeattrs.PreloadFile: libref.LauncherPath + "\n"}); err != nil || again != dir {
		t.Errorf("same content = %s, %v; want the same dir %s", again, err, dir)
	}
	other, err := c.GeneratedFiles(map[string]string{volumeattrs.PreloadFile: "/other.so\n"})
	if err != nil || other == dir {
		t.Errorf("different content = %s, %v; want another dir", other, err)
	}
	for _, bad := range []map[string]string{
		nil,
		{"../etc/passwd": "x"},
		{"/etc/passwd": "x"},
		{"a/./b": "x"},
		{"a": "x", "a/b": "y"},
		{"big": strings.Repeat("x", maxGeneratedBytes+1)},
	} {
		if _, err := c.GeneratedFiles(bad); err == nil {
			t.Errorf("GeneratedFiles(%v) succeeded, want an error", bad)
		}
	}
}

func TestInvalidLibrary(t *testing.T) {
	c := newCache(t, Config{})
	for _, lib := range []volumeattrs.Library{
		{Image: "no-tag-or-digest"},
		{Image: "example.invalid/x:v1", Source: "relative/dir"},
		{Image: "example.invalid/x:v1", Source: "/a/../b"},
		{Image: "example.invalid/x:v1", Target: "../escape"},
		{Image: "example.invalid/x:v1", Target: "/abs"},
	} {
		if _, err := c.Layer(t.Context(), lib); !errors.Is(err, library.ErrImageRejected) {
			t.Errorf("Layer(%+v) = %v, want ErrImageRejected", lib, err)
		}
	}
}

func TestMetricsRegistered(t *testing.T) {
	reg := prometheus.NewRegistry()
	newCache(t, Config{Registerer: reg})
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() != "result" && l.GetName() != "reason" {
					t.Errorf("metric %s has label %s: only bounded enums are allowed", mf.GetName(), l.GetName())
				}
			}
		}
	}
	for _, want := range []string{"apm_csi_cache_hits_total", "apm_csi_cache_misses_total", "apm_csi_cache_downloads_total",
		"apm_csi_cache_download_seconds", "apm_csi_cache_downloaded_bytes_total", "apm_csi_cache_bytes",
		"apm_csi_cache_libraries", "apm_csi_cache_libraries_in_use", "apm_csi_cache_evictions_total"} {
		if !names[want] {
			t.Errorf("metric %s not registered", want)
		}
	}
	// A second cache on the same registry is a configuration error, reported, not a panic.
	if _, err := New(Config{StoreDir: filepath.Join(t.TempDir(), "s"), Registerer: reg}); err == nil {
		t.Errorf("a second cache registering the same metrics must fail")
	}
}

func TestPrefetch(t *testing.T) {
	reg := libimages.Start(t)
	image, _ := pushLibrary(t, reg, "python", "v4")
	pinned := must[string](t)(reg.Push("datadog/dd-lib-java-init", "v4", must[v1.Image](t)(libimages.Library("java", "v4"))))
	// The prefetches are over when each has logged its result: the libraries gauge alone
	// rises before a prefetch's download has handed its entry back, and a Layer call in that
	// window joins the download instead of hitting the cache.
	var log syncBuffer
	c := newCache(t, Config{Prefetch: []string{image, pinned}, Logger: slog.New(slog.NewJSONHandler(&log, nil))}, reg)
	waitUntil(t, 10*time.Second, func() bool { return strings.Count(log.String(), `"msg":"prefetched library"`) >= 2 })
	if n := metricValue(t, c.store.metrics.libraries); n != 2 {
		t.Fatalf("%v libraries cached after Start, want the 2 prefetched", n)
	}
	// The first pod finds them ready, even with the registry gone.
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{image, pinned} {
		if _, err := c.Layer(t.Context(), volumeattrs.Library{Image: ref}); err != nil {
			t.Errorf("%s after prefetch: %v", ref, err)
		}
	}
	if hits := metricValue(t, c.store.metrics.hits); hits != 2 {
		t.Errorf("hits = %v, want 2", hits)
	}
}

// TestSlowRegistryServesTheLastKnownDigest: past a tag's TTL the registry is asked again, but a
// registry that does not answer keeps no pod waiting longer than revalidateWait: the tag's
// last known digest is served meanwhile. The wait is on the cache's clock, so the test
// advances it instead of sleeping.
func TestSlowRegistryServesTheLastKnownDigest(t *testing.T) {
	reg := libimages.Start(t)
	image, _ := pushLibrary(t, reg, "php", "v1")
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCache(t, Config{TagTTL: time.Minute, Clock: clk}, reg)
	first, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
	if err != nil {
		t.Fatal(err)
	}
	// The registry's address now accepts connections and never answers.
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", reg.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { _ = conn.Close() })
		}
	}()
	clk.Step(time.Minute)
	type result struct {
		layer library.Layer
		err   error
	}
	done := make(chan result, 1)
	go func() {
		l, err := c.Layer(t.Context(), volumeattrs.Library{Image: image})
		done <- result{l, err}
	}()
	// Once the publish waits for the registry's answer, its wait runs out.
	if !waitUntil(t, 10*time.Second, clk.HasWaiters) {
		t.Fatal("the publish never waited for the registry")
	}
	select {
	case r := <-done:
		t.Fatalf("the publish did not wait for the registry: %v, %v", r.layer, r.err)
	default:
	}
	// Step until the publish returns: a timer of the finished download may still be among
	// the waiters when the publish's own wait starts.
	var r result
	if !waitUntil(t, 10*time.Second, func() bool {
		clk.Step(revalidateWait)
		select {
		case r = <-done:
			return true
		default:
			return false
		}
	}) {
		t.Fatal("the publish kept waiting for a silent registry past revalidateWait")
	}
	if r.err != nil || r.layer != first {
		t.Fatalf("publish with a silent registry = %v, %v; want the last known %v", r.layer, r.err, first)
	}
	if n := metricValue(t, c.store.metrics.staleServed); n != 1 {
		t.Errorf("stale_served = %v, want 1", n)
	}
}
