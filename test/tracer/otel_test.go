package tracer

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/apm-csi/apm-csi/test/testenv"
)

func TestOTLPIntakeDecodesProtobufAndJSON(t *testing.T) {
	in, err := StartOTLPIntake("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	req := &collectortrace.ExportTraceServiceRequest{ResourceSpans: []*tracepb.ResourceSpans{{
		Resource: &resourcepb.Resource{Attributes: []*commonpb.KeyValue{{Key: "service.name", Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: "svc"}}}}},
		ScopeSpans: []*tracepb.ScopeSpans{{
			Scope: &commonpb.InstrumentationScope{Name: "scope"},
			Spans: []*tracepb.Span{{TraceId: bytes.Repeat([]byte{1}, 16), SpanId: bytes.Repeat([]byte{2}, 8), Name: "GET", Kind: tracepb.Span_SPAN_KIND_SERVER,
				Attributes: []*commonpb.KeyValue{{Key: "http.status_code", Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_IntValue{IntValue: 200}}}}}},
		}},
	}}}
	pb, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	js, err := protojson.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		ctype string
		body  []byte
		want  int
	}{
		{"application/x-protobuf", pb, http.StatusOK},
		{"application/json", js, http.StatusOK},
		{"application/x-protobuf", []byte("\xff\xff not protobuf"), http.StatusBadRequest},
	} {
		resp, err := http.Post(in.Endpoint()+"/v1/traces", c.ctype, bytes.NewReader(c.body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%s: status %d, want %d", c.ctype, resp.StatusCode, c.want)
		}
	}
	spans := in.Spans()
	if len(spans) != 2 {
		t.Fatalf("got %d spans, want one per valid request: %+v", len(spans), spans)
	}
	for _, s := range spans {
		if s.Service != "svc" || s.Kind != tracepb.Span_SPAN_KIND_SERVER || s.Scope != "scope" || s.Attributes["http.status_code"] != "200" ||
			s.TraceID != strings.Repeat("01", 16) || s.SpanID != strings.Repeat("02", 8) {
			t.Errorf("decoded span %+v", s)
		}
	}
	if len(in.Errors()) != 1 {
		t.Errorf("decode errors %v, want the one bad body", in.Errors())
	}
}

// extractDir writes the files below dir (an absolute path in the image, e.g. /autoinstrumentation)
// of img's flattened filesystem into dst, as the operator's init container's cp does.
func extractDir(t *testing.T, img v1.Image, dir, dst string) {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	prefix := strings.TrimPrefix(dir, "/") + "/"
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		rel, ok := strings.CutPrefix(strings.TrimPrefix(h.Name, "./"), prefix)
		if !ok || rel == "" || strings.Contains(rel, "..") {
			continue
		}
		p := filepath.Join(dst, rel)
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, 0o755)
		case tar.TypeReg:
			if err = os.MkdirAll(filepath.Dir(p), 0o755); err == nil {
				var f *os.File
				if f, err = os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644); err == nil {
					_, err = io.Copy(f, tr)
					f.Close()
				}
			}
		case tar.TypeSymlink:
			if err = os.MkdirAll(filepath.Dir(p), 0o755); err == nil {
				err = os.Symlink(h.Linkname, p)
			}
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestRealOTelNodeReportsToOTLPIntake: the image's /autoinstrumentation, copied as the
// operator's init container copies it and required as the operator's NODE_OPTIONS requires it,
// makes the demo server export its HTTP spans over OTLP/HTTP (protobuf) to the intake.
func TestRealOTelNodeReportsToOTLPIntake(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	node, err := FindNode(ctx)
	if err != nil {
		testenv.Missing(t, "%v", err)
	}
	dir, err := InstallOTelNode(ctx, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	img, err := OTelNodeImage(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	files := imageFiles(t, img)
	for _, want := range []string{"autoinstrumentation/autoinstrumentation.js", "autoinstrumentation/register.js",
		"autoinstrumentation/node_modules/@opentelemetry/sdk-node/package.json", "bin/cp"} {
		if !files[want] {
			t.Errorf("the image lacks %s", want)
		}
	}
	copied := t.TempDir()
	extractDir(t, img, OTelSource, copied)

	intake, err := StartOTLPIntake("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer intake.Close()
	base, stop := startDemoServer(ctx, t, node.Binary, append(OTelTestEnv("otel-unit", intake.Endpoint()),
		"NODE_OPTIONS= --require "+filepath.Join(copied, OTelEntryPoint))...)
	defer stop()
	waitForServer(t, func() error {
		resp, err := http.Get(base + "/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET / answered %s", resp.Status)
		}
		return nil
	})
	waitCtx, waitCancel := context.WithTimeout(ctx, time.Minute)
	defer waitCancel()
	got, err := intake.WaitForSpans(waitCtx, func(s OTelSpan) bool {
		return s.Service == "otel-unit" && s.Kind == tracepb.Span_SPAN_KIND_CLIENT && strings.HasSuffix(s.Attributes["url.full"]+s.Attributes["http.url"], "/backend")
	})
	if err != nil {
		t.Fatal(err)
	}
	var parent *OTelSpan
	all := intake.Spans()
	for i := range all {
		if all[i].SpanID == got[0].ParentID && all[i].TraceID == got[0].TraceID {
			parent = &all[i]
		}
	}
	if parent == nil || parent.Kind != tracepb.Span_SPAN_KIND_SERVER {
		t.Errorf("client span %+v has no server parent among the received spans %+v", got[0], all)
	}
	t.Logf("%d spans received; client span %s (%s) from %s", len(all), got[0].Name, got[0].SpanID, got[0].Scope)
}
