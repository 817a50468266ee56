package librarycache

import (
	"archive/tar"
	"bytes"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
	"github.com/apm-csi/apm-csi/test/libimages"
)

// stepsTar is an uncompressed layer shaped like a tracer library: 3,000 small source files
// in a few deep directories and two large binaries (about 20 MB in all).
func stepsTar(b *testing.B) []byte {
	b.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	dirs := []string{"opt/datadog/lib/node_modules/dd-trace/src/", "opt/datadog/lib/node_modules/@datadog/pprof/out/", "opt/datadog/lib/node_modules/lodash/"}
	seen := map[string]bool{}
	write := func(h *tar.Header, body []byte) {
		if err := tw.WriteHeader(h); err != nil {
			b.Fatal(err)
		}
		if _, err := tw.Write(body); err != nil {
			b.Fatal(err)
		}
	}
	for _, d := range dirs {
		p := ""
		for _, c := range strings.Split(strings.TrimSuffix(d, "/"), "/") {
			p += c + "/"
			if !seen[p] {
				seen[p] = true
				write(&tar.Header{Typeflag: tar.TypeDir, Name: p, Mode: 0o755, ModTime: mtime}, nil)
			}
		}
	}
	for n := range 3000 {
		body := make([]byte, 512+rng.IntN(8<<10))
		for i := range body {
			body[i] = 'a' + byte(rng.IntN(26))
		}
		write(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%sf%05d.js", dirs[n%len(dirs)], n), Mode: 0o644, Size: int64(len(body)), ModTime: mtime}, body)
	}
	for n, size := range []int{4 << 20, 2 << 20} {
		body := make([]byte, size)
		for i := range body {
			body[i] = byte(rng.Uint32())
		}
		write(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%sbin-%d.node", dirs[0], n), Mode: 0o755, Size: int64(size), ModTime: mtime}, body)
	}
	if err := tw.Close(); err != nil {
		b.Fatal(err)
	}
	return buf.Bytes()
}

// BenchmarkColdSteps measures, one after another on the same library-shaped layer, what the
// cold path does besides downloading: the plugin's confined extraction (against a plain
// extraction of the same tar), the hardlink view a library placed below the volume root gets,
// and the store flush (syncfs) that makes the entry durable. Each step reports its median
// in milliseconds.
//
//	go test -run '^$' -bench ColdSteps -benchtime 5x ./nodeplugin/librarycache/
func BenchmarkColdSteps(b *testing.B) {
	layer := stepsTar(b)
	c, err := New(Config{StoreDir: filepath.Join(b.TempDir(), "store"), Logger: slog.New(slog.DiscardHandler), Registerer: prometheus.NewRegistry(), AllowedRepositories: []string{"registry.example"}})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	steps := map[string][]time.Duration{}
	timed := func(name string, fn func() error) {
		start := time.Now()
		if err := fn(); err != nil {
			b.Fatalf("%s: %v", name, err)
		}
		steps[name] = append(steps[name], time.Since(start))
	}
	for i := range b.N {
		tmp, err := c.store.mkTemp("steps")
		if err != nil {
			b.Fatal(err)
		}
		plain := filepath.Join(c.store.dir, tmp, "plain")
		if err := os.Mkdir(plain, 0o755); err != nil {
			b.Fatal(err)
		}
		rootRel := path.Join(tmp, "root")
		if err := c.store.root.Mkdir(rootRel, 0o755); err != nil {
			b.Fatal(err)
		}
		unix.Sync()
		order := []func(){
			func() {
				timed("plain-extract", func() error { return libimages.PlainExtract(bytes.NewReader(layer), plain) })
			},
			func() {
				timed("extract", func() error {
					_, err := extract.Extract(b.Context(), bytes.NewReader(layer), filepath.Join(c.store.dir, rootRel), extract.Options{PreserveOwnership: os.Geteuid() == 0})
					return err
				})
			},
		}
		if i%2 == 1 {
			slices.Reverse(order)
		}
		for _, run := range order {
			run()
		}
		timed("view", func() error {
			_, err := c.store.farm(path.Join(rootRel, "opt/datadog/lib"), path.Join(tmp, "view"))
			return err
		})
		timed("syncfs", c.store.syncStore)
		if err := c.store.root.RemoveAll(tmp); err != nil {
			b.Fatal(err)
		}
	}
	for name, d := range steps {
		slices.Sort(d)
		b.ReportMetric(float64(d[len(d)/2].Microseconds())/1000, name+"-ms")
	}
}
