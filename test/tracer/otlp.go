package tracer

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// OTelSpan is one span an OpenTelemetry SDK exported over OTLP/HTTP.
type OTelSpan struct {
	TraceID, SpanID, ParentID string
	// Service is the resource's service.name.
	Service string
	Name    string
	Kind    tracepb.Span_SpanKind
	// Scope is the instrumentation scope (e.g. @opentelemetry/instrumentation-http).
	Scope string
	// Attributes are the span's attributes with string, int and bool values as text.
	Attributes map[string]string
}

// OTLPIntake is a small stand-in for an OpenTelemetry Collector's OTLP/HTTP receiver: it
// decodes ExportTraceServiceRequest bodies from POST /v1/traces (application/x-protobuf, the
// SDKs' default, or application/json) with the OTLP protobuf types, keeps the spans, and
// answers an empty ExportTraceServiceResponse. Metrics and logs are accepted and dropped.
type OTLPIntake struct {
	srv *http.Server
	ln  net.Listener

	mu      sync.Mutex
	spans   []OTelSpan
	errors  []string
	changed chan struct{}
}

// StartOTLPIntake listens on addr (host:port; port 0 picks one) and serves until Close.
func StartOTLPIntake(addr string) (*OTLPIntake, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("OTLP intake: %w", err)
	}
	in := &OTLPIntake{ln: ln, changed: make(chan struct{})}
	in.srv = &http.Server{Handler: in, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = in.srv.Serve(ln) }()
	return in, nil
}

// Endpoint is the value for OTEL_EXPORTER_OTLP_ENDPOINT.
func (in *OTLPIntake) Endpoint() string { return "http://" + in.ln.Addr().String() }

// Close stops the intake.
func (in *OTLPIntake) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return in.srv.Shutdown(ctx)
}

// Spans returns a copy of every span received.
func (in *OTLPIntake) Spans() []OTelSpan {
	in.mu.Lock()
	defer in.mu.Unlock()
	return slices.Clone(in.spans)
}

// Errors returns why requests could not be decoded.
func (in *OTLPIntake) Errors() []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	return slices.Clone(in.errors)
}

// WaitForSpans waits until at least one received span matches and returns all that match.
func (in *OTLPIntake) WaitForSpans(ctx context.Context, match func(OTelSpan) bool) ([]OTelSpan, error) {
	got, err := waitForMatch(ctx, in.received, match)
	if err != nil {
		return nil, fmt.Errorf("no matching span among %d received (decode errors: %v): %w", len(in.Spans()), in.Errors(), err)
	}
	return got, nil
}

// received returns the spans received so far and a channel closed when more arrive.
func (in *OTLPIntake) received() ([]OTelSpan, <-chan struct{}) {
	in.mu.Lock()
	defer in.mu.Unlock()
	return slices.Clone(in.spans), in.changed
}

// ServeHTTP implements the OTLP/HTTP receiver.
func (in *OTLPIntake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxPayload))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	jsonBody := strings.HasPrefix(r.Header.Get("Content-Type"), "application/json")
	switch r.URL.Path {
	case "/v1/traces":
	case "/v1/metrics", "/v1/logs":
		// Accepted and dropped: an empty body is a valid Export*ServiceResponse in both encodings.
		respond(w, jsonBody, &collectortrace.ExportTraceServiceResponse{})
		return
	default:
		http.NotFound(w, r)
		return
	}
	req := &collectortrace.ExportTraceServiceRequest{}
	if jsonBody {
		err = protojson.Unmarshal(body, req)
	} else {
		err = proto.Unmarshal(body, req)
	}
	if err != nil {
		in.mu.Lock()
		in.errors = append(in.errors, err.Error())
		in.mu.Unlock()
		http.Error(w, "cannot decode ExportTraceServiceRequest", http.StatusBadRequest)
		return
	}
	var spans []OTelSpan
	for _, rs := range req.GetResourceSpans() {
		service := attrString(rs.GetResource().GetAttributes(), "service.name")
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				attrs := map[string]string{}
				for _, kv := range s.GetAttributes() {
					attrs[kv.GetKey()] = anyValueString(kv.GetValue())
				}
				spans = append(spans, OTelSpan{
					TraceID: hex.EncodeToString(s.GetTraceId()), SpanID: hex.EncodeToString(s.GetSpanId()), ParentID: hex.EncodeToString(s.GetParentSpanId()),
					Service: service, Name: s.GetName(), Kind: s.GetKind(), Scope: ss.GetScope().GetName(), Attributes: attrs,
				})
			}
		}
	}
	in.mu.Lock()
	in.spans = append(in.spans, spans...)
	close(in.changed)
	in.changed = make(chan struct{})
	in.mu.Unlock()
	respond(w, jsonBody, &collectortrace.ExportTraceServiceResponse{})
}

func respond(w http.ResponseWriter, jsonBody bool, m proto.Message) {
	var data []byte
	var err error
	if jsonBody {
		w.Header().Set("Content-Type", "application/json")
		data, err = protojson.Marshal(m)
	} else {
		w.Header().Set("Content-Type", "application/x-protobuf")
		data, err = proto.Marshal(m)
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	_, _ = w.Write(data)
}

func attrString(kvs []*commonpb.KeyValue, key string) string {
	for _, kv := range kvs {
		if kv.GetKey() == key {
			return anyValueString(kv.GetValue())
		}
	}
	return ""
}

func anyValueString(v *commonpb.AnyValue) string {
	switch x := v.GetValue().(type) {
	case *commonpb.AnyValue_StringValue:
		return x.StringValue
	case *commonpb.AnyValue_IntValue:
		return fmt.Sprint(x.IntValue)
	case *commonpb.AnyValue_BoolValue:
		return fmt.Sprint(x.BoolValue)
	case *commonpb.AnyValue_DoubleValue:
		return fmt.Sprint(x.DoubleValue)
	}
	return ""
}
