package tracer

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/apm-csi/apm-csi/test/eventually"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// enc is a small msgpack encoder for building payloads in tests. It always uses the widest
// forms for some values and the compact ones for others, to cover both in the decoder.
type enc struct{ bytes.Buffer }

func (e *enc) str(s string) *enc {
	switch n := len(s); {
	case n < 32:
		e.WriteByte(0xa0 | byte(n))
	case n < 256:
		e.Write([]byte{0xd9, byte(n)})
	default:
		e.WriteByte(0xda)
		_ = binary.Write(e, binary.BigEndian, uint16(n))
	}
	e.WriteString(s)
	return e
}

func (e *enc) uint64(v uint64) *enc {
	e.WriteByte(0xcf)
	_ = binary.Write(e, binary.BigEndian, v)
	return e
}

func (e *enc) int(v int64) *enc {
	switch {
	case v >= 0 && v < 128:
		e.WriteByte(byte(v))
	case v < 0 && v >= -32:
		e.WriteByte(byte(int8(v)))
	default:
		e.WriteByte(0xd3)
		_ = binary.Write(e, binary.BigEndian, v)
	}
	return e
}

func (e *enc) float(v float64) *enc {
	e.WriteByte(0xcb)
	_ = binary.Write(e, binary.BigEndian, math.Float64bits(v))
	return e
}

func (e *enc) array(n int) *enc {
	if n < 16 {
		e.WriteByte(0x90 | byte(n))
	} else {
		e.WriteByte(0xdc)
		_ = binary.Write(e, binary.BigEndian, uint16(n))
	}
	return e
}

func (e *enc) mapHeader(n int) *enc {
	if n < 16 {
		e.WriteByte(0x80 | byte(n))
	} else {
		e.WriteByte(0xde)
		_ = binary.Write(e, binary.BigEndian, uint16(n))
	}
	return e
}

func TestMsgpackScalars(t *testing.T) {
	cases := []struct {
		in   []byte
		want any
	}{
		{[]byte{0xc0}, nil},
		{[]byte{0xc3}, true},
		{[]byte{0xc2}, false},
		{[]byte{0x7f}, int64(127)},
		{[]byte{0xff}, int64(-1)},
		{[]byte{0xcc, 0xff}, uint64(255)},
		{[]byte{0xcd, 0x01, 0x00}, uint64(256)},
		{[]byte{0xd0, 0x80}, int64(-128)},
		{[]byte{0xd1, 0xff, 0x00}, int64(-256)},
		{[]byte{0xd2, 0xff, 0xff, 0xff, 0xfe}, int64(-2)},
		{[]byte{0xca, 0x3f, 0xc0, 0x00, 0x00}, 1.5},
		{[]byte{0xa3, 'a', 'b', 'c'}, "abc"},
		{[]byte{0xc4, 0x02, 0x01, 0x02}, []byte{1, 2}},
		{[]byte{0xd4, 0x01, 0x02}, nil},             // fixext 1: skipped
		{[]byte{0xc7, 0x02, 0x05, 0x01, 0x02}, nil}, // ext 8: skipped
		{[]byte{0x92, 0x01, 0xa1, 'x'}, []any{int64(1), "x"}},
		{[]byte{0x81, 0xa1, 'k', 0xc3}, map[any]any{"k": true}},
	}
	for _, c := range cases {
		got, err := decodeMsgpack(c.in)
		if err != nil {
			t.Errorf("% x: %v", c.in, err)
			continue
		}
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("% x: got %#v, want %#v", c.in, got, c.want)
		}
	}
}

func TestMsgpackRejectsBadInput(t *testing.T) {
	deep := bytes.Repeat([]byte{0x91}, maxMsgpackDepth+2)
	for name, in := range map[string][]byte{
		"empty":              {},
		"truncated string":   {0xa5, 'a'},
		"truncated uint32":   {0xce, 0x00},
		"forged array size":  {0xdd, 0xff, 0xff, 0xff, 0xff},
		"forged map size":    {0xdf, 0x7f, 0xff, 0xff, 0xff, 0x01},
		"trailing bytes":     {0x01, 0x02},
		"reserved type byte": {0xc1},
		"array map key":      {0x81, 0x90, 0x01},
		"nested too deeply":  deep,
	} {
		if v, err := decodeMsgpack(in); err == nil {
			t.Errorf("%s: decoded %#v, want an error", name, v)
		}
	}
}

// v04Payload encodes traces of spans in the v0.4 format, the way dd-trace-js writes them.
func v04Payload(traces [][]Span) []byte {
	e := &enc{}
	e.array(len(traces))
	for _, tr := range traces {
		e.array(len(tr))
		for _, s := range tr {
			e.mapHeader(12)
			e.str("trace_id").uint64(s.TraceID)
			e.str("span_id").uint64(s.SpanID)
			e.str("parent_id").uint64(s.ParentID)
			e.str("name").str(s.Name)
			e.str("resource").str(s.Resource)
			e.str("service").str(s.Service)
			e.str("type").str(s.Type)
			e.str("error").int(s.Error)
			e.str("start").int(s.Start)
			e.str("duration").int(s.Duration)
			keys := sortedKeys(s.Meta)
			e.str("meta").mapHeader(len(keys))
			for _, k := range keys {
				e.str(k).str(s.Meta[k])
			}
			mkeys := make([]string, 0, len(s.Metrics))
			for k := range s.Metrics {
				mkeys = append(mkeys, k)
			}
			sort.Strings(mkeys)
			e.str("metrics").mapHeader(len(mkeys))
			for _, k := range mkeys {
				e.str(k).float(s.Metrics[k])
			}
		}
	}
	return e.Bytes()
}

func sortedKeys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// v05Payload encodes the same spans in the v0.5 format (string table + 12-element arrays).
func v05Payload(traces [][]Span) []byte {
	var table []string
	index := map[string]int64{}
	idx := func(s string) int64 {
		if i, ok := index[s]; ok {
			return i
		}
		index[s] = int64(len(table))
		table = append(table, s)
		return index[s]
	}
	body := &enc{}
	body.array(len(traces))
	for _, tr := range traces {
		body.array(len(tr))
		for _, s := range tr {
			body.array(12)
			body.int(idx(s.Service)).int(idx(s.Name)).int(idx(s.Resource))
			body.uint64(s.TraceID).uint64(s.SpanID).uint64(s.ParentID)
			body.int(s.Start).int(s.Duration).int(s.Error)
			keys := sortedKeys(s.Meta)
			body.mapHeader(len(keys))
			for _, k := range keys {
				body.int(idx(k)).int(idx(s.Meta[k]))
			}
			body.mapHeader(len(s.Metrics))
			for k, v := range s.Metrics {
				body.int(idx(k)).float(v)
			}
			body.int(idx(s.Type))
		}
	}
	e := &enc{}
	e.array(2).array(len(table))
	for _, s := range table {
		e.str(s)
	}
	e.Write(body.Bytes())
	return e.Bytes()
}

func sampleTraces() [][]Span {
	root := Span{TraceID: 1<<63 + 5, SpanID: 7, Service: "checkout", Name: "web.request", Resource: "GET /", Type: "web",
		Start: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano(), Duration: 1500000,
		Meta: map[string]string{"http.method": "GET", "span.kind": "server"}, Metrics: map[string]float64{"_sampling_priority_v1": 1}}
	child := root
	child.SpanID, child.ParentID, child.Name, child.Resource, child.Type, child.Error = 8, 7, "http.request", "GET", "http", 1
	child.Meta = map[string]string{"span.kind": "client"}
	child.Metrics = map[string]float64{}
	other := Span{TraceID: 2, SpanID: 9, Service: "worker", Name: "job", Resource: "job", Start: -1, Duration: 3,
		Meta: map[string]string{}, Metrics: map[string]float64{}}
	return [][]Span{{root, child}, {other}}
}

func TestIntakeDecodesBothFormats(t *testing.T) {
	in, err := StartIntake("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	want := sampleTraces()
	for _, p := range []struct {
		path string
		body []byte
	}{{"/v0.4/traces", v04Payload(want)}, {"/v0.5/traces", v05Payload(want)}} {
		req, _ := http.NewRequest(http.MethodPut, in.URL()+p.path, bytes.NewReader(p.body))
		req.Header.Set("Content-Type", "application/msgpack")
		req.Header.Set("Datadog-Meta-Lang", "nodejs")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !json.Valid(body) {
			t.Fatalf("%s: %d %s", p.path, resp.StatusCode, body)
		}
	}
	got := in.Spans()
	var flat []Span
	for _, tr := range want {
		flat = append(flat, tr...)
	}
	if len(got) != 2*len(flat) {
		t.Fatalf("got %d spans, want %d", len(got), 2*len(flat))
	}
	for i, s := range got {
		if w := flat[i%len(flat)]; !reflect.DeepEqual(s, w) {
			t.Errorf("span %d:\n got %+v\nwant %+v", i, s, w)
		}
	}
	if svc := in.Services(); !reflect.DeepEqual(svc, []string{"checkout", "worker"}) {
		t.Errorf("services %v", svc)
	}
	reqs := in.Requests()
	if len(reqs) != 2 || reqs[0].Spans != 3 || reqs[0].Tracer != "nodejs" {
		t.Errorf("requests %+v", reqs)
	}
}

func TestIntakeAnswers(t *testing.T) {
	in, err := StartIntake("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	for _, c := range []struct {
		method, path string
		body         []byte
		status       int
	}{
		{http.MethodPut, "/v0.4/traces", []byte{0xc1}, http.StatusBadRequest},
		{http.MethodPut, "/v0.4/traces", []byte{0x81, 0xa1, 'k', 0x01}, http.StatusBadRequest}, // a map, not traces
		{http.MethodGet, "/v0.4/traces", nil, http.StatusMethodNotAllowed},
		{http.MethodPost, "/telemetry/proxy/api/v2/apmtelemetry", []byte("{}"), http.StatusAccepted},
		{http.MethodGet, "/info", nil, http.StatusNotFound},
	} {
		req, _ := http.NewRequest(c.method, in.URL()+c.path, bytes.NewReader(c.body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.status {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, resp.StatusCode, c.status)
		}
	}
	if n := len(in.Spans()); n != 0 {
		t.Errorf("%d spans recorded from bad payloads", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := in.WaitForSpans(ctx, func(Span) bool { return true }); err == nil {
		t.Error("WaitForSpans succeeded without spans")
	}
}

func TestParseLdd(t *testing.T) {
	out := []byte(`	linux-vdso.so.1 (0x00007ffd)
	libnode.so.108 => /lib/x86_64-linux-gnu/libnode.so.108 (0x00007f8f)
	libstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f8e)
	/lib64/ld-linux-x86-64.so.2 (0x00007f8f)
`)
	got, err := parseLdd(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/lib/x86_64-linux-gnu/libnode.so.108", "/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib64/ld-linux-x86-64.so.2"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
	if _, err := parseLdd([]byte("\tlibfoo.so.1 => not found\n")); err == nil {
		t.Error("a missing library was not reported")
	}
}

// TestRealTracerReportsToIntake runs the demo server on this machine's Node.js with the real
// dd-trace loaded the way the direct layout loads it (NODE_OPTIONS=--require=<lib>/init) and
// checks that the intake receives and decodes its spans. It also checks the image builders.
func TestRealTracerReportsToIntake(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	node, err := FindNode(ctx)
	if err != nil {
		testenv.Missing(t, "%v", err)
	}
	t.Logf("node %s (%s) at %s", node.Version, node.Package, node.Binary)
	lib, err := InstallDDTrace(ctx, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	intake, err := StartIntake("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer intake.Close()

	base, stop := startDemoServer(ctx, t, node.Binary,
		"NODE_OPTIONS=--require="+filepath.Join(lib, InitModule),
		"DD_SERVICE=tracer-unit",
		"DD_ENV=test",
		"DD_TRACE_AGENT_URL="+intake.URL(),
		"DD_INSTRUMENTATION_TELEMETRY_ENABLED=false",
		"DD_REMOTE_CONFIGURATION_ENABLED=false",
		"DD_TRACE_FLUSH_INTERVAL=200",
	)
	defer stop()

	var info map[string]any
	waitForServer(t, func() error {
		resp, err := http.Get(base + "/tracer")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		return json.NewDecoder(resp.Body).Decode(&info)
	})
	if info["loaded"] != true || info["version"] != DDTraceVersion || !strings.HasPrefix(info["from"].(string), lib) {
		t.Fatalf("tracer not loaded from %s: %v", lib, info)
	}
	resp, err := http.Get(base + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()

	waitCtx, waitCancel := context.WithTimeout(ctx, time.Minute)
	defer waitCancel()
	spans, err := intake.WaitForSpans(waitCtx, func(s Span) bool {
		return s.Service == "tracer-unit" && s.Meta["span.kind"] == "client" && s.Meta["http.url"] != ""
	})
	if err != nil {
		t.Fatal(err)
	}
	// The client span of GET / -> /backend has a server span as parent in the same trace.
	var parent *Span
	all := intake.Spans()
	for i := range all {
		if all[i].SpanID == spans[0].ParentID && all[i].TraceID == spans[0].TraceID {
			parent = &all[i]
		}
	}
	if parent == nil || parent.Meta["span.kind"] != "server" {
		t.Errorf("client span %+v has no server parent in the received spans", spans[0])
	}
	if reqs := intake.Requests(); !strings.Contains(reqs[len(reqs)-1].Tracer, "nodejs") {
		t.Errorf("requests do not identify the tracer: %+v", reqs)
	}
	t.Logf("spans received:\n%s", FormatSpans(all))
}

func TestImages(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	node, err := FindNode(ctx)
	if err != nil {
		testenv.Missing(t, "%v", err)
	}
	lib, err := InstallDDTrace(ctx, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	img, err := LibraryImage(ctx, lib)
	if err != nil {
		t.Fatal(err)
	}
	files := imageFiles(t, img)
	for _, want := range []string{
		"datadog-init/copy-lib.sh",
		"datadog-init/package/node_modules/dd-trace/init.js",
		"datadog-init/package/node_modules/dd-trace/package.json",
		"bin/sh",
	} {
		if _, ok := files[want]; !ok {
			t.Errorf("library image lacks %s", want)
		}
	}
	app, err := AppImage(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	appImg, err := tarballImage(app, AppRef)
	if err != nil {
		t.Fatal(err)
	}
	appFiles := imageFiles(t, appImg)
	if _, ok := appFiles["usr/bin/node"]; !ok {
		t.Error("app image lacks usr/bin/node")
	}
	for f := range appFiles {
		if strings.Contains(f, "dd-trace") {
			t.Errorf("app image contains a tracer file %s", f)
		}
	}
	cfg, err := appImg.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Config.User != fmt.Sprintf("%d:%d", AppUID, AppUID) {
		t.Errorf("app image user %q", cfg.Config.User)
	}
}

// startDemoServer runs serverJS with node on a free loopback port, with env added to this
// process's environment, and returns its base URL and a function that stops it (and logs its
// output when the test has failed).
func startDemoServer(ctx context.Context, t *testing.T, node string, env ...string) (string, func()) {
	t.Helper()
	server := filepath.Join(t.TempDir(), "server.js")
	if err := os.WriteFile(server, serverJS, 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cmd := exec.CommandContext(ctx, node, server)
	cmd.Env = append(append(os.Environ(), fmt.Sprintf("PORT=%d", port)), env...)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("http://127.0.0.1:%d", port), func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("server output:\n%s", logs.String())
		}
	}
}

// waitForServer calls try every 200ms until it succeeds, and fails the test with try's last
// error when a minute has passed.
func waitForServer(t *testing.T, try func() error) {
	t.Helper()
	eventually.Require(t, t.Context(), time.Minute, 200*time.Millisecond, "the server to answer", func(context.Context) error {
		return try()
	})
}

func tarballImage(file, ref string) (v1.Image, error) {
	tag, err := name.NewTag(ref)
	if err != nil {
		return nil, err
	}
	return tarball.ImageFromPath(file, &tag)
}

// imageFiles lists the paths in an image's layers.
func imageFiles(t *testing.T, img v1.Image) map[string]bool {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			out[strings.TrimSuffix(h.Name, "/")] = true
		}
		rc.Close()
	}
	return out
}
