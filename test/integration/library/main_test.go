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
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/apm-csi/apm-csi/nodeplugin/driver"
	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/nodeplugin/mounter"
	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// options configure a plugin; zero values take the cache's and driver's defaults.
type options struct {
	// budget is the driver's PublishDownloadBudget.
	budget time.Duration
	// grace is the cache's GC grace period.
	grace time.Duration
	// tagTTL is how long the cache trusts a tag.
	tagTTL time.Duration
}

// plugin is a running node plugin: driver + library cache + gRPC server, over a temporary
// kubelet dir and state dir, as apm-csi-node's main wires them.
type plugin struct {
	t       testing.TB
	opts    options
	root    string
	kubelet string
	state   string
	store   string
	sock    string
	log     *slog.Logger

	cache *librarycache.Cache
	drv   *driver.Driver
	srv   *grpc.Server
	conn  *grpc.ClientConn
	node  csi.NodeClient
}

// startPlugin starts a plugin whose directories live in a fresh temporary dir. At cleanup it
// stops the plugin and fails the test if any mount is left under that dir.
func startPlugin(t testing.TB, opts options) *plugin {
	t.Helper()
	testenv.RequireRoot(t)
	root := t.TempDir()
	p := &plugin{
		t:       t,
		opts:    opts,
		root:    root,
		kubelet: filepath.Join(root, "kubelet"),
		state:   filepath.Join(root, "state"),
		store:   filepath.Join(root, "state", "store"),
		sock:    filepath.Join(root, "csi.sock"),
		log:     slog.New(slog.DiscardHandler),
	}
	if testing.Verbose() {
		p.log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	// Registered before stop, so it runs after it: the leak check sees the final state.
	t.Cleanup(func() { unmountUnder(t, root) })
	p.start()
	t.Cleanup(p.stop)
	return p
}

// start opens the cache and the driver over the plugin's state dir and serves them, in the
// order main.go does: cache New+Start, driver New, gRPC server, Reconcile.
func (p *plugin) start() {
	p.t.Helper()
	cache, err := librarycache.New(librarycache.Config{
		StoreDir:      p.store,
		GCGracePeriod: p.opts.grace,
		TagTTL:        p.opts.tagTTL,
		Logger:        p.log,
		Registerer:    prometheus.NewRegistry(),
	})
	if err != nil {
		p.t.Fatalf("library cache: %v", err)
	}
	if err := cache.Start(context.Background()); err != nil {
		p.t.Fatalf("library cache start: %v", err)
	}
	d, err := driver.New(driver.Config{
		NodeID:                "node-1",
		KubeletDir:            p.kubelet,
		StateDir:              p.state,
		Mounter:               mounter.New(),
		Libraries:             cache,
		PublishDownloadBudget: p.opts.budget,
		Logger:                p.log,
	})
	if err != nil {
		p.t.Fatal(err)
	}
	lis, err := driver.ListenUnix(p.sock)
	if err != nil {
		p.t.Fatal(err)
	}
	p.cache, p.drv = cache, d
	p.srv = driver.NewGRPCServer(d, p.log)
	go p.srv.Serve(lis)
	if err := d.Reconcile(context.Background()); err != nil {
		p.t.Fatal(err)
	}
	p.conn, err = grpc.NewClient("unix://"+p.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		p.t.Fatal(err)
	}
	p.node = csi.NewNodeClient(p.conn)
}

// stop shuts the plugin down as SIGTERM does: the server drains, the cache is closed (its
// lock released). Mounts stay, as they do when a DaemonSet pod is replaced.
func (p *plugin) stop() {
	if p.srv == nil {
		return
	}
	p.conn.Close()
	driver.Shutdown(p.srv, 5*time.Second)
	if err := p.cache.Close(); err != nil {
		p.t.Errorf("closing the library cache: %v", err)
	}
	p.srv = nil
}

func (p *plugin) restart() {
	p.t.Helper()
	p.stop()
	p.start()
}

// gc runs the cache's garbage collector with the driver's view of what is in use, as the
// binary does every --gc-interval.
func (p *plugin) gc() {
	p.t.Helper()
	if err := p.cache.GC(context.Background(), p.drv.LibrariesInUse); err != nil {
		p.t.Fatalf("GC: %v", err)
	}
}

// target returns the path kubelet would pass for CSI volume `volume` of pod uid, creating its
// parent as kubelet does.
func (p *plugin) target(uid, volume string) string {
	dir := filepath.Join(p.kubelet, "pods", uid, "volumes", "kubernetes.io~csi", volume)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		p.t.Fatal(err)
	}
	return filepath.Join(dir, "mount")
}

func publishRequest(volumeID, target string, attrs map[string]string, readonly bool) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{
		VolumeId:   volumeID,
		TargetPath: target,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		VolumeContext: attrs,
		Readonly:      readonly,
	}
}

// publish calls NodePublishVolume with a kubelet-like deadline.
func (p *plugin) publish(volumeID, target string, attrs map[string]string, readonly bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, err := p.node.NodePublishVolume(ctx, publishRequest(volumeID, target, attrs, readonly))
	return err
}

func (p *plugin) mustPublish(volumeID, target string, attrs map[string]string, readonly bool) {
	p.t.Helper()
	if err := p.publish(volumeID, target, attrs, readonly); err != nil {
		p.t.Fatalf("publish %s at %s: %v", volumeID, target, err)
	}
}

func (p *plugin) unpublish(volumeID, target string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := p.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target})
	return err
}

func (p *plugin) mustUnpublish(volumeID, target string) {
	p.t.Helper()
	if err := p.unpublish(volumeID, target); err != nil {
		p.t.Fatalf("unpublish %s at %s: %v", volumeID, target, err)
	}
}

// ephemeral adds what kubelet adds to an inline volume's attributes (podInfoOnMount).
func ephemeral(attrs map[string]string, pod string) map[string]string {
	out := maps.Clone(attrs)
	out["csi.storage.k8s.io/ephemeral"] = "true"
	out["csi.storage.k8s.io/pod.name"] = pod
	out["csi.storage.k8s.io/pod.namespace"] = "default"
	out["csi.storage.k8s.io/pod.uid"] = pod + "-uid"
	return out
}

// overlayDirs lists the per-volume upper/work dirs in the state dir.
func (p *plugin) overlayDirs() []string {
	return dirNames(p.t, filepath.Join(p.state, "overlays"))
}

// recordFiles lists the volume records on disk.
func (p *plugin) recordFiles() []string {
	return dirNames(p.t, filepath.Join(p.state, "volumes"))
}

// storeEntries lists the cache's entries ("images/<hex>", "views/<key>", "generated/<key>")
// and anything left in its tmp dir ("tmp/<name>").
func (p *plugin) storeEntries() []string {
	var out []string
	for _, sub := range []string{"images", "views", "generated", "tmp"} {
		for _, n := range dirNames(p.t, filepath.Join(p.store, sub)) {
			out = append(out, sub+"/"+n)
		}
	}
	return out
}

// assertNothingAllocated checks that no volume holds anything: no record, no overlay dir, and
// no mount under the kubelet dir.
func (p *plugin) assertNothingAllocated(t testing.TB) {
	t.Helper()
	if recs := p.drv.Records(); len(recs) != 0 {
		t.Errorf("driver still has %d records: %+v", len(recs), recs)
	}
	if files := p.recordFiles(); len(files) != 0 {
		t.Errorf("records left in the state dir: %q", files)
	}
	if dirs := p.overlayDirs(); len(dirs) != 0 {
		t.Errorf("overlay upper/work dirs left: %q", dirs)
	}
	if m := mountsUnder(t, p.kubelet); len(m) != 0 {
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

// lib is one image in the test registry.
type lib struct {
	repo  string // datadog/dd-lib-python-init
	tag   string
	image string // 127.0.0.1:port/datadog/dd-lib-python-init:tag
	img   v1.Image
}

// pushLanguage pushes a dd-lib-<lang>-init image in Datadog's layout.
func pushLanguage(t testing.TB, reg *libimages.Registry, lang, version string) lib {
	t.Helper()
	img, err := libimages.Library(lang, version)
	if err != nil {
		t.Fatal(err)
	}
	return push(t, reg, "datadog/"+libref.PackageName(lang), version, img)
}

// pushInjector pushes an apm-inject image.
func pushInjector(t testing.TB, reg *libimages.Registry, version string) lib {
	t.Helper()
	img, err := libimages.Injector(version)
	if err != nil {
		t.Fatal(err)
	}
	return push(t, reg, "datadog/"+libref.InjectorPackage, version, img)
}

func push(t testing.TB, reg *libimages.Registry, repo, tag string, img v1.Image) lib {
	t.Helper()
	if _, err := reg.Push(repo, tag, img); err != nil {
		t.Fatal(err)
	}
	return lib{repo: repo, tag: tag, image: reg.Repo(repo) + ":" + tag, img: img}
}

// injectorVolume is a pod's library volume in the injector layout, as the webhook writes it:
// apm-inject at its target, each language at opt/datadog/apm/library/<lang>, and the
// ld.so.preload file naming the launcher.
type injectorVolume struct {
	injector lib
	version  string // the injector's version
	langs    []string
	libs     map[string]lib // language -> image
	versions map[string]string
}

func (v injectorVolume) spec() *volumeattrs.Spec {
	spec := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Preload: libref.LauncherPath}
	spec.Libraries = append(spec.Libraries, volumeattrs.Library{Image: v.injector.image, Source: libref.InjectorSource, Target: libref.InjectorTarget})
	for _, lang := range v.langs {
		spec.Libraries = append(spec.Libraries, volumeattrs.Library{Image: v.libs[lang].image, Source: libref.LibrarySource, Target: libref.LanguageTarget(lang)})
	}
	return spec
}

func (v injectorVolume) attrs() map[string]string { return v.spec().Attributes() }

// files is what the pod must see in the volume.
func (v injectorVolume) files() map[string]string {
	want := map[string]string{volumeattrs.PreloadFile: libref.LauncherPath + "\n"}
	maps.Copy(want, prefixed(libref.InjectorTarget, libimages.InjectorFiles(v.version)))
	for _, lang := range v.langs {
		maps.Copy(want, prefixed(libref.LanguageTarget(lang), libimages.LibraryFiles(lang, v.versions[lang])))
	}
	return want
}

// all returns the images of the volume.
func (v injectorVolume) all() []lib {
	out := []lib{v.injector}
	for _, lang := range v.langs {
		out = append(out, v.libs[lang])
	}
	return out
}

// pushInjectorVolume pushes apm-inject and python and js libraries (three library images plus
// the generated preload file: four lower dirs in one overlay).
func pushInjectorVolume(t testing.TB, reg *libimages.Registry, version string) injectorVolume {
	t.Helper()
	v := injectorVolume{injector: pushInjector(t, reg, version), version: version, langs: []string{"python", "js"},
		libs: map[string]lib{}, versions: map[string]string{}}
	for _, lang := range v.langs {
		v.libs[lang] = pushLanguage(t, reg, lang, version)
		v.versions[lang] = version
	}
	return v
}

// readTree returns the regular files below dir (relative path -> content), following the
// symlinks that stay inside it as a process in the container would.
func readTree(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		switch {
		case d.Type().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out[rel] = string(b)
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if resolved := filepath.Join(filepath.Dir(p), target); !filepath.IsAbs(target) && strings.HasPrefix(resolved, dir+"/") {
				for k, v := range readTree(t, resolved) {
					out[filepath.Join(rel, k)] = v
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func prefixed(prefix string, files map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range files {
		out[filepath.Join(prefix, k)] = v
	}
	return out
}

func diffTrees(got, want map[string]string) string {
	var d []string
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if g, ok := got[k]; !ok {
			d = append(d, "missing "+k)
		} else if g != want[k] {
			d = append(d, fmt.Sprintf("%s = %q, want %q", k, g, want[k]))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(got)) {
		if _, ok := want[k]; !ok {
			d = append(d, "unexpected "+k)
		}
	}
	return strings.Join(d, "; ")
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

// entryAt returns the mount table entry mounted at path (the last one if stacked).
func entryAt(t testing.TB, path string) mounter.Entry {
	t.Helper()
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Fatal(err)
	}
	var found *mounter.Entry
	for i := range table {
		if table[i].MountPoint == path {
			found = &table[i]
		}
	}
	if found == nil {
		t.Fatalf("nothing mounted at %s", path)
	}
	return *found
}

// countMounts returns how many mounts are stacked on path.
func countMounts(t testing.TB, path string) int {
	t.Helper()
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range table {
		if e.MountPoint == path {
			n++
		}
	}
	return n
}

// mountsUnder returns the mounts whose mount point or layers are below root.
func mountsUnder(t testing.TB, root string) []string {
	t.Helper()
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range table {
		line := fmt.Sprintf("%s %s %s %s %s", e.MountPoint, e.FsType, e.Source, e.Root, strings.Join(e.SuperOptions, ","))
		if strings.Contains(line, root+"/") {
			out = append(out, line)
		}
	}
	return out
}

// unmountUnder detaches any mount a failed test left under root, deepest first, and reports
// it, so the temporary directory is removed without reaching into a lower dir.
func unmountUnder(t testing.TB, root string) {
	table, err := mounter.New().MountTable()
	if err != nil {
		t.Error(err)
		return
	}
	for i := len(table) - 1; i >= 0; i-- {
		if mp := table[i].MountPoint; strings.HasPrefix(mp, root+"/") {
			t.Errorf("mount left behind at %s", mp)
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				t.Errorf("unmount %s: %v", mp, err)
			}
		}
	}
}
