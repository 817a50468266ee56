// Package library holds the root-only end-to-end tests of library volumes: the CSI driver
// (nodeplugin/driver) with the real library cache (nodeplugin/librarycache) over a real OCI
// registry (test/libimages, on 127.0.0.1), real overlayfs and bind mounts under a temporary
// kubelet dir, every call made through the real gRPC server on a unix socket. Nothing is
// faked: what a pod would see is read through the mounts kubelet would hand it.
package library

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/nodeplugin/state"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// options configure a plugin; zero values take the cache's and driver's defaults.
type options struct {
	// budget is the driver's PublishDownloadBudget.
	budget time.Duration
	// grace is the cache's GC grace period.
	grace time.Duration
	// tagTTL is how long the cache trusts a tag.
	tagTTL time.Duration
	// clock is where the cache reads time (default the real clock); a fake one lets a test
	// pass the GC grace period without waiting it out.
	clock clock.Clock
	// downloads is the cache's --max-parallel-downloads.
	downloads int
	// stateDir replaces the plugin's state dir (default: a dir in the plugin's temporary root).
	stateDir string
	// writable is the --writable-layer-mechanism (default auto); defaultWritable and
	// maxWritable the --default-writable-layer and --max-writable-layer (default the driver's).
	writable                     writablelayer.Mechanism
	defaultWritable, maxWritable int64
	// registry is the test registry: an allowed repository, reached over plain HTTP as an
	// --insecure-registry.
	registry *libimages.Registry
	// trust is the rest of the cache's trust configuration (allowed repositories, insecure
	// registries, pull secrets and their scopes), added to what registry implies.
	trust librarycache.Config
}

// plugin is a running node plugin (nodeplugintest.Plugin) whose library store is the real
// library cache, over a temporary kubelet dir and state dir, as apm-csi-node's main wires
// them.
type plugin struct {
	*nodeplugintest.Plugin
	opts options
	// store is the cache's store dir.
	store string
	// cache is the running plugin's, replaced by each start.
	cache *librarycache.Cache
}

// startPlugin starts a plugin whose directories live in a fresh temporary dir. At cleanup it
// stops the plugin and fails the test if any mount is left under that dir.
func startPlugin(t testing.TB, opts options) *plugin {
	t.Helper()
	p := &plugin{opts: opts}
	p.Plugin = nodeplugintest.New(t, nodeplugintest.Config{
		Libraries:             p.openCache,
		PublishDownloadBudget: opts.budget,
		DrainTimeout:          5 * time.Second,
		WritableLayer:         opts.writable,
		DefaultWritableLimit:  opts.defaultWritable,
		MaxWritableLimit:      opts.maxWritable,
	})
	if opts.stateDir != "" {
		p.State = opts.stateDir
	}
	p.store = filepath.Join(p.State, "store")
	p.Start()
	return p
}

// openCache opens and starts the library cache over the plugin's store, as main.go does
// before it creates the driver; the plugin closes it when it stops (releasing its lock).
func (p *plugin) openCache() (library.Store, func() error, error) {
	allowed, insecure := p.opts.trust.AllowedRepositories, p.opts.trust.InsecureRegistries
	if p.opts.registry != nil {
		allowed = append([]string{p.opts.registry.Addr()}, allowed...)
		insecure = append([]string{p.opts.registry.Addr()}, insecure...)
	}
	releaseStore, err := mounter.OwnMount(p.store)
	if err != nil {
		return nil, nil, err
	}
	cache, err := librarycache.New(librarycache.Config{
		AllowedRepositories:  allowed,
		InsecureRegistries:   insecure,
		PullSecretDir:        p.opts.trust.PullSecretDir,
		PullSecretScopes:     p.opts.trust.PullSecretScopes,
		StoreDir:             p.store,
		GCGracePeriod:        p.opts.grace,
		TagTTL:               p.opts.tagTTL,
		Clock:                p.opts.clock,
		MaxParallelDownloads: p.opts.downloads,
		Logger:               p.Log,
		Registerer:           prometheus.NewRegistry(),
	})
	if err != nil {
		return nil, nil, errors.Join(fmt.Errorf("library cache: %w", err), releaseStore())
	}
	closeStore := func() error { return errors.Join(cache.Close(), releaseStore()) }
	if err := cache.Start(context.Background()); err != nil {
		return nil, nil, errors.Join(fmt.Errorf("library cache start: %w", err), closeStore())
	}
	p.cache = cache
	return cache, closeStore, nil
}

// gc runs the cache's garbage collector with the driver's view of what is in use, as the
// binary does every --gc-interval.
func (p *plugin) gc() {
	p.T.Helper()
	if err := p.cache.GC(context.Background(), p.Driver.LibrariesInUse); err != nil {
		p.T.Fatalf("GC: %v", err)
	}
}

// overlayDirs lists the per-volume upper/work dirs in the state dir.
func (p *plugin) overlayDirs() []string {
	return dirNames(p.T, filepath.Join(p.State, "overlays"))
}

// recordFiles lists the volume records on disk (volume id and target).
func (p *plugin) recordFiles() []string {
	recs, err := state.Read(p.State)
	if err != nil {
		p.T.Fatal(err)
	}
	var out []string
	for _, r := range recs {
		out = append(out, r.VolumeID+" at "+r.TargetPath)
	}
	return out
}

// storeEntries lists the cache's entries ("images/<hex>", "views/<key>", "generated/<key>")
// and anything left in its tmp dir ("tmp/<name>").
func (p *plugin) storeEntries() []string {
	var out []string
	for _, sub := range []string{"images", "views", "generated", "tmp"} {
		for _, n := range dirNames(p.T, filepath.Join(p.store, sub)) {
			out = append(out, sub+"/"+n)
		}
	}
	return out
}

// assertNothingAllocated checks that no volume holds anything: no record, no overlay dir, and
// no mount under the kubelet dir.
func (p *plugin) assertNothingAllocated(t testing.TB) {
	t.Helper()
	if recs := p.Driver.Records(); len(recs) != 0 {
		t.Errorf("driver still has %d records: %+v", len(recs), recs)
	}
	if files := p.recordFiles(); len(files) != 0 {
		t.Errorf("records left in the state dir: %q", files)
	}
	if dirs := p.overlayDirs(); len(dirs) != 0 {
		t.Errorf("overlay upper/work dirs left: %q", dirs)
	}
	if m := nodeplugintest.MountsUnder(t, p.Kubelet); len(m) != 0 {
		t.Errorf("mounts left under the kubelet dir: %q", m)
	}
}

func dirNames(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// injectorVolume is a pod's library volume in the injector layout, as the webhook writes it:
// apm-inject at its target, each language at opt/datadog/apm/library/<lang>, and the
// ld.so.preload file naming the launcher.
type injectorVolume struct {
	injector nodeplugintest.PushedImage
	version  string // the injector's version
	langs    []string
	libs     map[string]nodeplugintest.PushedImage // language -> image
	versions map[string]string
}

func (v injectorVolume) spec() *volumeattrs.Spec {
	spec := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Preload: libref.LauncherPath}
	spec.Libraries = append(spec.Libraries, volumeattrs.Library{Image: v.injector.Ref, Source: libref.InjectorSource, Target: libref.InjectorTarget})
	for _, lang := range v.langs {
		spec.Libraries = append(spec.Libraries, volumeattrs.Library{Image: v.libs[lang].Ref, Source: libref.LibrarySource, Target: libref.LanguageTarget(lang)})
	}
	return spec
}

func (v injectorVolume) attrs() map[string]string { return v.spec().Attributes() }

// files is what the pod must see in the volume.
func (v injectorVolume) files() map[string]string {
	want := map[string]string{volumeattrs.PreloadFile: libref.LauncherPath + "\n"}
	maps.Copy(want, nodeplugintest.Prefixed(libref.InjectorTarget, libimages.InjectorFiles(v.version)))
	for _, lang := range v.langs {
		maps.Copy(want, nodeplugintest.Prefixed(libref.LanguageTarget(lang), libimages.LibraryFiles(lang, v.versions[lang])))
	}
	return want
}

// all returns the images of the volume.
func (v injectorVolume) all() []nodeplugintest.PushedImage {
	out := []nodeplugintest.PushedImage{v.injector}
	for _, lang := range v.langs {
		out = append(out, v.libs[lang])
	}
	return out
}

// pushInjectorVolume pushes apm-inject and python and js libraries (three library images plus
// the generated preload file: four lower dirs in one overlay).
func pushInjectorVolume(t testing.TB, reg *libimages.Registry, version string) injectorVolume {
	t.Helper()
	v := injectorVolume{injector: nodeplugintest.PushInjector(t, reg, version), version: version, langs: []string{"python", "js"},
		libs: map[string]nodeplugintest.PushedImage{}, versions: map[string]string{}}
	for _, lang := range v.langs {
		v.libs[lang] = nodeplugintest.PushLibrary(t, reg, lang, version)
		v.versions[lang] = version
	}
	return v
}

// filesContaining returns the regular files below dir whose name or content contains marker.
func filesContaining(t testing.TB, dir, marker string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if strings.Contains(d.Name(), marker) {
			out = append(out, p)
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		b, err := io.ReadAll(f)
		if err != nil {
			return err
		}
		if bytes.Contains(b, []byte(marker)) {
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func writeFile(t testing.TB, p, content string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
