// Package bench measures what apm-csi changes for instrumented pods on the local single-node
// cluster (test/localcluster): pod start-up, node disk and memory, registry traffic, admission
// latency and the node plugin's publish latency, against the uninstrumented floor and the
// classic init-container injection. `make bench` runs cmd/apm-csi-bench, which writes
// docs/benchmarks.md and docs/benchmarks.png.
package bench

import (
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"path"
	"strings"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/test/images"
)

// Library is one image of the benchmark's library set.
type Library struct {
	// Name is the language (java, js, python) or "injector".
	Name string
	// Package is the Datadog image name: dd-lib-<lang>-init or apm-inject.
	Package string
	Image   v1.Image
	// Files and Bytes describe the payload (regular files, their total size).
	Files int
	Bytes int64
	// Compressed is what a pull fetches: manifest, config and compressed layers.
	Compressed int64
}

// payloadSpec shapes one library's payload: many small text-like files (sources, metadata,
// compressible like real ones) and a few large incompressible ones (jars, shared objects).
type payloadSpec struct {
	name, pkg string
	small     int   // number of small files
	smallMax  int   // their largest size (sizes are uniform in [smallMax/16, smallMax])
	large     []int // sizes of the large files
	largeExt  string
	dirs      []string // directories the small files are spread over
	smallExt  string
}

// Specs of the library set: about 150 MB of files over four images, in the proportions of
// Datadog's images (a big Java agent jar, a Node.js node_modules tree of thousands of small
// files with native add-ons, a Python package with extension modules, the injector's
// launcher and process binaries).
var librarySpecs = []payloadSpec{
	{name: "java", pkg: libref.PackageName("java"), small: 400, smallMax: 8 << 10, large: []int{38 << 20, 3 << 20}, largeExt: ".jar",
		dirs: []string{"shared/META-INF", "shared/datadog/trace", "continuous-profiler", "inst/datadog/trace/instrumentation"}, smallExt: ".classdata"},
	{name: "js", pkg: libref.PackageName("js"), small: 5000, smallMax: 10 << 10, large: []int{6 << 20, 4 << 20, 2 << 20}, largeExt: ".node",
		dirs: []string{"node_modules/dd-trace/packages/dd-trace/src", "node_modules/dd-trace/packages/datadog-instrumentations/src", "node_modules/@datadog/pprof/out", "node_modules/protobufjs/src", "node_modules/lodash"}, smallExt: ".js"},
	{name: "python", pkg: libref.PackageName("python"), small: 3000, smallMax: 10 << 10, large: []int{10 << 20, 6 << 20, 4 << 20}, largeExt: ".so",
		dirs: []string{"ddtrace/contrib", "ddtrace/internal", "ddtrace/appsec", "ddtrace/profiling", "wrapt", "envier"}, smallExt: ".py"},
	{name: "injector", pkg: libref.InjectorPackage, small: 150, smallMax: 8 << 10, large: []int{24 << 20, 2 << 20}, largeExt: ".bin",
		dirs: []string{"inject/ld", "inject/conf", "inject/lib"}, smallExt: ".conf"},
}

// words make the small files compress like source code does (about 3-4x).
var words = strings.Fields(`function return const var let if else for while import from export default class new this
	self def async await try except raise yield lambda None True False null undefined require module exports
	span tracer trace context propagation header sampling priority service env version datadog http client
	server request response error status code payload buffer stream config options instrumentation plugin`)

// files builds the payload of spec under dir, deterministically from seed.
func (s payloadSpec) files(dir string, seed uint64) (out []images.File, n int, total int64) {
	rng := rand.New(rand.NewPCG(seed, uint64(len(s.name))))
	for i := 0; i < s.small; i++ {
		size := s.smallMax/16 + rng.IntN(s.smallMax-s.smallMax/16)
		var b strings.Builder
		for b.Len() < size {
			b.WriteString(words[rng.IntN(len(words))])
			if rng.IntN(12) == 0 {
				fmt.Fprintf(&b, "(%d);\n", rng.IntN(100000))
			} else {
				b.WriteByte(' ')
			}
		}
		data := []byte(b.String()[:size])
		d := s.dirs[i%len(s.dirs)]
		p := path.Join(dir, d, fmt.Sprintf("m%03d", i/50), fmt.Sprintf("f%05d%s", i, s.smallExt))
		out = append(out, images.File{Path: p, Data: data, Mode: 0o644})
		n++
		total += int64(size)
	}
	cc := rand.NewChaCha8([32]byte{byte(seed), byte(len(s.name)), 7})
	for i, size := range s.large {
		data := make([]byte, size)
		_, _ = cc.Read(data)
		mode := 0o644
		if s.largeExt != ".jar" {
			mode = 0o755
		}
		out = append(out, images.File{Path: path.Join(dir, fmt.Sprintf("%s-%d%s", s.name, i, s.largeExt)), Data: data, Mode: fs.FileMode(mode)})
		n++
		total += int64(size)
	}
	return out, n, total
}

// BuildLibrarySet builds the four images (java, js, python, injector) in Datadog's layouts,
// each with a busybox userland so that init-container mode can run its copy commands in them.
// prefix is the registry and repository prefix (e.g. 127.0.0.1:40000/datadoghq) and tag their
// version.
func BuildLibrarySet(ctx context.Context, prefix, tag string) ([]Library, error) {
	userland, _, err := images.BusyboxUserland(ctx, images.DebianBusybox)
	if err != nil {
		return nil, err
	}
	out := make([]Library, len(librarySpecs))
	errs := make([]error, len(librarySpecs))
	var wg sync.WaitGroup
	for i, s := range librarySpecs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var files []images.File
			var n int
			var total int64
			if s.name == "injector" {
				src := libref.InjectorSource
				files, n, total = s.files(path.Join(src, tag), uint64(i+1))
				// ld.so.preload names stable/inject/launcher.preload.so.
				files = append(files,
					images.File{Path: path.Join(src, tag, "inject", "launcher.preload.so"), Data: []byte("\x7fELF launcher"), Mode: 0o755},
					images.File{Path: path.Join(src, "stable"), Symlink: tag})
			} else {
				files, n, total = s.files(libref.LibrarySource, uint64(i+1))
				files = append(files, images.File{Path: "/datadog-init/copy-lib.sh", Data: []byte("#!/bin/sh\ncp -r /datadog-init/package/. \"$1\"\n"), Mode: 0o755})
			}
			img, err := images.Build(images.Spec{
				Ref:   prefix + "/" + s.pkg + ":" + tag,
				Files: append(append([]images.File(nil), userland...), files...),
				Labels: map[string]string{
					images.LabelDescription: "apm-csi benchmark library (synthetic " + s.name + ")",
				},
			})
			if err != nil {
				errs[i] = fmt.Errorf("building %s: %w", s.name, err)
				return
			}
			c, err := pullSize(img)
			if err != nil {
				errs[i] = err
				return
			}
			out[i] = Library{Name: s.name, Package: s.pkg, Image: img, Files: n, Bytes: total, Compressed: c}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Variant returns img with one more label: a different manifest digest over the same layers.
// The node plugin's cache is keyed by manifest digest, so a variant is a cache miss that
// downloads and extracts every layer again: a cold node for that pod.
func Variant(img v1.Image, variant string) (v1.Image, error) {
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	if cfg.Config.Labels == nil {
		cfg.Config.Labels = map[string]string{}
	}
	cfg.Config.Labels["io.apm-csi.bench.variant"] = variant
	return mutate.ConfigFile(img, cfg)
}

// pullSize is the bytes a registry client fetches for img: manifest, config blob, layers.
func pullSize(img v1.Image) (int64, error) {
	m, err := img.RawManifest()
	if err != nil {
		return 0, err
	}
	c, err := img.RawConfigFile()
	if err != nil {
		return 0, err
	}
	total := int64(len(m) + len(c))
	layers, err := img.Layers()
	if err != nil {
		return 0, err
	}
	for _, l := range layers {
		sz, err := l.Size()
		if err != nil {
			return 0, err
		}
		total += sz
	}
	return total, nil
}

// BlobSizes maps every blob digest of imgs (config and layers) to its size, to turn the
// registry's request log into bytes.
func BlobSizes(imgs ...v1.Image) (map[string]int64, error) {
	out := map[string]int64{}
	for _, img := range imgs {
		cd, err := img.ConfigName()
		if err != nil {
			return nil, err
		}
		c, err := img.RawConfigFile()
		if err != nil {
			return nil, err
		}
		out[cd.String()] = int64(len(c))
		layers, err := img.Layers()
		if err != nil {
			return nil, err
		}
		for _, l := range layers {
			d, err := l.Digest()
			if err != nil {
				return nil, err
			}
			sz, err := l.Size()
			if err != nil {
				return nil, err
			}
			out[d.String()] = sz
		}
	}
	return out, nil
}
