package library

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// coldLibs are the payloads of the cold-publish benchmark: four libraries of realistic size,
// each many small compressible files (sources) and a few large incompressible ones (jars,
// shared objects).
var coldLibs = []struct {
	name         string
	small        int
	large        []int
	largeExt     string
	smallExtDirs []string
}{
	{"java", 400, []int{14 << 20, 3 << 20}, ".jar", []string{"shared/META-INF", "inst/datadog/trace"}},
	{"js", 3000, []int{4 << 20, 2 << 20}, ".node", []string{"node_modules/dd-trace/src", "node_modules/@datadog/pprof/out", "node_modules/lodash"}},
	{"python", 2000, []int{6 << 20, 3 << 20}, ".so", []string{"ddtrace/contrib", "ddtrace/internal", "wrapt"}},
	{"php", 1000, []int{8 << 20}, ".so", []string{"dd-trace-php/src", "dd-trace-php/bridge"}},
}

var coldWords = strings.Fields(`function return const var let if else for while import from export default class new this
	self def async await try except raise yield lambda span tracer trace context propagation header sampling
	priority service env version datadog http client server request response error status code payload`)

// coldLayer builds one library's payload layer under prefix (below the library source).
func coldLayer(i int, prefix string) (v1.Layer, int, error) {
	l := coldLibs[i]
	rng := rand.New(rand.NewPCG(uint64(i+1), 7))
	src := strings.TrimPrefix(libref.LibrarySource, "/") + "/"
	entries := []libimages.Entry{libimages.Dir("datadog-init/", 0o755), libimages.Dir(src, 0o755)}
	if prefix != "" {
		entries = append(entries, libimages.Dir(src+prefix+"/", 0o755))
		src += prefix + "/"
	}
	seen := map[string]bool{}
	for _, d := range l.smallExtDirs {
		parts := strings.Split(d, "/")
		for k := range parts {
			if dir := src + strings.Join(parts[:k+1], "/") + "/"; !seen[dir] {
				seen[dir] = true
				entries = append(entries, libimages.Dir(dir, 0o755))
			}
		}
	}
	for n := range l.small {
		size := 512 + rng.IntN(8<<10)
		var b strings.Builder
		for b.Len() < size {
			b.WriteString(coldWords[rng.IntN(len(coldWords))])
			b.WriteByte(" \n;("[rng.IntN(4)])
		}
		d := l.smallExtDirs[n%len(l.smallExtDirs)]
		entries = append(entries, libimages.File(fmt.Sprintf("%s%s/f%05d.txt", src, d, n), b.String(), 0o644))
	}
	for n, size := range l.large {
		data := make([]byte, size)
		for j := 0; j+8 <= len(data); j += 8 {
			v := rng.Uint64()
			for k := range 8 {
				data[j+k] = byte(v >> (8 * k))
			}
		}
		entries = append(entries, libimages.File(fmt.Sprintf("%sbin-%d%s", src, n, l.largeExt), string(data), 0o755))
	}
	layer, err := libimages.Layer(entries...)
	return layer, l.small + len(l.large), err
}

// coldSet is the benchmark's images, pushed to a registry that lives as long as the process.
var coldSet struct {
	once    sync.Once
	reg     *libimages.Registry
	libs    []v1.Image // one single-layer image per library
	layered v1.Image   // one image with the four payloads as four layers
	files   int
	bytes   int64
	err     error
}

func coldImages(b *testing.B) {
	b.Helper()
	coldSet.once.Do(func() {
		coldSet.err = func() error {
			var stack []v1.Layer
			for i := range coldLibs {
				l, n, err := coldLayer(i, "")
				if err != nil {
					return err
				}
				img, err := libimages.Image(l)
				if err != nil {
					return err
				}
				coldSet.libs = append(coldSet.libs, img)
				coldSet.files += n
				size, err := l.Size()
				if err != nil {
					return err
				}
				coldSet.bytes += size
				sl, _, err := coldLayer(i, coldLibs[i].name)
				if err != nil {
					return err
				}
				stack = append(stack, sl)
			}
			var err error
			if coldSet.layered, err = libimages.Image(stack...); err != nil {
				return err
			}
			coldSet.reg = libimages.NewRegistry()
			if err := coldSet.reg.Start(); err != nil {
				return err
			}
			for i, img := range coldSet.libs {
				if _, err := coldSet.reg.Push("datadog/dd-lib-"+coldLibs[i].name+"-init", "cold", img); err != nil {
					return err
				}
			}
			_, err = coldSet.reg.Push("datadog/layered", "cold", coldSet.layered)
			return err
		}()
	})
	if coldSet.err != nil {
		b.Fatal(coldSet.err)
	}
}

// throttledBody delays a response body so that every body through one proxy shares one
// bandwidth limit: a node's link to its registry.
type throttledBody struct {
	io.ReadCloser
	limit *rate.Limiter
}

func (b *throttledBody) Read(p []byte) (int, error) {
	if burst := b.limit.Burst(); len(p) > burst {
		p = p[:burst]
	}
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		if werr := b.limit.WaitN(context.Background(), n); werr != nil && err == nil {
			err = werr
		}
	}
	return n, err
}

// startThrottle serves the registry at addr through a proxy limited to bitsPerSecond in total;
// it returns the proxy's host:port.
func startThrottle(b *testing.B, addr string, bitsPerSecond float64) string {
	b.Helper()
	limit := rate.NewLimiter(rate.Limit(bitsPerSecond/8), 32<<10)
	target := &url.URL{Scheme: "http", Host: addr}
	proxy := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(target); r.Out.Host = addr },
		ModifyResponse: func(resp *http.Response) error {
			resp.Body = &throttledBody{ReadCloser: resp.Body, limit: limit}
			return nil
		},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: proxy}
	go func() { _ = srv.Serve(ln) }()
	b.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

// BenchmarkColdVolume measures what the first pod on a node waits for: the cold publish of
// a volume with four libraries (the webhook's layout) by a plugin with a fresh store, and of
// a volume of one four-layer image, against plain go-containerregistry pulls of the same
// images extracted into a directory (remote.Image + mutate.Extract + tar), one after another
// and all four at once. The arms are interleaved in every iteration and rotate which goes
// first; every iteration is cold (fresh store, fresh directories). Medians are reported, and
// the ratio of the four-library volume to the parallel plain pull. The "Limited" variant puts
// a 100 Mbit/s proxy (shared by all connections) between the registry and its clients. The
// "3slots" arm is the four-library volume with --max-parallel-downloads=3 (two per
// registry), the default before it became 8.
//
//	go test -run '^$' -bench ColdVolume -benchtime 5x ./test/integration/library/
func BenchmarkColdVolume(b *testing.B) {
	b.Run("Loopback", func(b *testing.B) { benchColdVolume(b, 0) })
	b.Run("Limited100Mbit", func(b *testing.B) { benchColdVolume(b, 100e6) })
}

func benchColdVolume(b *testing.B, bitsPerSecond float64) {
	coldImages(b)
	addr := coldSet.reg.Addr()
	if bitsPerSecond > 0 {
		addr = startThrottle(b, addr, bitsPerSecond)
	}
	var refs []string
	for _, l := range coldLibs {
		refs = append(refs, addr+"/datadog/dd-lib-"+l.name+"-init:cold")
	}
	layered := addr + "/datadog/layered:cold"
	base := b.TempDir()

	volume := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary}
	for i, ref := range refs {
		volume.Libraries = append(volume.Libraries, volumeattrs.Library{Image: ref, Source: libref.LibrarySource, Target: libref.LanguageTarget(coldLibs[i].name)})
	}
	oneImage := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary, Libraries: []volumeattrs.Library{{Image: layered, Source: libref.LibrarySource, Target: libref.LanguageTarget("all")}}}

	publish := func(spec *volumeattrs.Spec, downloads int) func(int) time.Duration {
		return func(i int) time.Duration {
			opts := options{registry: coldSet.reg, downloads: downloads}
			opts.trust.AllowedRepositories = []string{addr}
			opts.trust.InsecureRegistries = []string{addr}
			p := startPlugin(b, opts)
			pod := fmt.Sprintf("pod-%d", i)
			target := p.Target(pod, "apm")
			attrs := nodeplugintest.Ephemeral(spec.Attributes(), pod)
			unix.Sync()
			start := time.Now()
			err := p.Publish("csi-"+pod, target, attrs, false)
			d := time.Since(start)
			if err != nil {
				b.Fatal(err)
			}
			p.MustUnpublish("csi-"+pod, target)
			p.Stop()
			_ = os.RemoveAll(p.store)
			return d
		}
	}
	plain := func(parallel bool) func(int) time.Duration {
		return func(i int) time.Duration {
			dir := filepath.Join(base, fmt.Sprintf("plain-%d", i))
			unix.Sync()
			start := time.Now()
			var g errgroup.Group
			if !parallel {
				g.SetLimit(1)
			}
			for n, ref := range refs {
				g.Go(func() error { return libimages.PlainPull(ref, filepath.Join(dir, coldLibs[n].name)) })
			}
			err := g.Wait()
			d := time.Since(start)
			if err != nil {
				b.Fatal(err)
			}
			_ = os.RemoveAll(dir)
			return d
		}
	}
	arms := []struct {
		name string
		run  func(int) time.Duration
		took []time.Duration
	}{
		{name: "plugin-4lib", run: publish(volume, 0)},
		{name: "plugin-4lib-3slots", run: publish(volume, 3)},
		{name: "plugin-4layer", run: publish(oneImage, 0)},
		{name: "plain-seq", run: plain(false)},
		{name: "plain-par", run: plain(true)},
	}
	b.ResetTimer()
	for i := range b.N {
		for k := range arms {
			a := &arms[(i+k)%len(arms)]
			a.took = append(a.took, a.run(i))
		}
	}
	b.StopTimer()
	medians := map[string]float64{}
	for _, a := range arms {
		slices.Sort(a.took)
		medians[a.name] = a.took[len(a.took)/2].Seconds()
		b.ReportMetric(medians[a.name], a.name+"-s")
	}
	b.ReportMetric(medians["plugin-4lib"]/medians["plain-par"], "ratio-4lib/par")
	b.ReportMetric(medians["plugin-4lib-3slots"]/medians["plain-par"], "ratio-4lib3/par")
	b.Logf("%d files, %d compressed bytes in 4 images", coldSet.files, coldSet.bytes)
}
