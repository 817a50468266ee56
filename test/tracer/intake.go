package tracer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// Span is one span as a tracer reported it to the agent API.
type Span struct {
	TraceID  uint64
	SpanID   uint64
	ParentID uint64
	Service  string
	Name     string
	Resource string
	Type     string
	// Start is in nanoseconds since the Unix epoch, Duration in nanoseconds.
	Start    int64
	Duration int64
	Error    int64
	Meta     map[string]string
	Metrics  map[string]float64
}

// Request is one request the intake received, in arrival order.
type Request struct {
	Method string
	Path   string
	// Status is what the intake answered.
	Status int
	// Spans is the number of spans decoded from a trace payload.
	Spans int
	// Tracer identifies the sender (Datadog-Meta-Lang, -Lang-Version, -Tracer-Version headers).
	Tracer string
	// Error is why a trace payload could not be decoded.
	Error string
	Time  time.Time
}

// maxPayload bounds one request body.
const maxPayload = 64 << 20

// Intake is a small stand-in for the Datadog Agent's trace API: it accepts the trace
// endpoints tracers send to (/v0.4/traces and /v0.5/traces, msgpack), decodes the spans and
// keeps them for the test to inspect. Telemetry and stats are accepted and counted; other
// paths (/info, remote configuration) answer 404, which tracers treat as an agent without
// those features.
type Intake struct {
	srv *http.Server
	ln  net.Listener

	mu       sync.Mutex
	spans    []Span
	requests []Request
	changed  chan struct{}
}

// StartIntake listens on addr (host:port; port 0 picks a free one) and serves until Close.
func StartIntake(addr string) (*Intake, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("trace intake: %w", err)
	}
	in := &Intake{ln: ln, changed: make(chan struct{})}
	in.srv = &http.Server{Handler: in, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = in.srv.Serve(ln) }()
	return in, nil
}

// Addr is the host:port the intake listens on.
func (in *Intake) Addr() string { return in.ln.Addr().String() }

// URL is the value for DD_TRACE_AGENT_URL.
func (in *Intake) URL() string { return "http://" + in.Addr() }

// Close stops the intake.
func (in *Intake) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return in.srv.Shutdown(ctx)
}

// Spans returns a copy of every span received so far.
func (in *Intake) Spans() []Span {
	in.mu.Lock()
	defer in.mu.Unlock()
	return slices.Clone(in.spans)
}

// Requests returns a copy of every request received so far.
func (in *Intake) Requests() []Request {
	in.mu.Lock()
	defer in.mu.Unlock()
	return slices.Clone(in.requests)
}

// Services returns the distinct services of the spans received, sorted.
func (in *Intake) Services() []string {
	seen := map[string]bool{}
	for _, s := range in.Spans() {
		seen[s.Service] = true
	}
	var out []string
	for s := range seen {
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

// WaitForSpans waits until at least one received span matches and returns all that match.
func (in *Intake) WaitForSpans(ctx context.Context, match func(Span) bool) ([]Span, error) {
	found, err := waitForMatch(ctx, in.received, match)
	if err != nil {
		return nil, fmt.Errorf("no matching span received (%d spans of services %v in %d requests): %w",
			len(in.Spans()), in.Services(), len(in.Requests()), err)
	}
	return found, nil
}

// received returns the spans received so far and a channel closed when more arrive.
func (in *Intake) received() ([]Span, <-chan struct{}) {
	in.mu.Lock()
	defer in.mu.Unlock()
	return slices.Clone(in.spans), in.changed
}

// waitForMatch waits until at least one received span matches and returns all that match;
// received returns the spans so far and a channel closed when more arrive. The error is the
// context's.
func waitForMatch[S any](ctx context.Context, received func() ([]S, <-chan struct{}), match func(S) bool) ([]S, error) {
	for {
		spans, changed := received()
		var found []S
		for _, s := range spans {
			if match(s) {
				found = append(found, s)
			}
		}
		if len(found) > 0 {
			return found, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-changed:
		}
	}
}

// ServeHTTP implements the agent endpoints.
func (in *Intake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	req := Request{Method: r.Method, Path: r.URL.Path, Time: time.Now(), Tracer: tracerID(r.Header)}
	var spans []Span
	switch {
	case r.URL.Path == "/v0.4/traces" || r.URL.Path == "/v0.5/traces":
		if r.Method != http.MethodPut && r.Method != http.MethodPost {
			req.Status = http.StatusMethodNotAllowed
			break
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, maxPayload+1))
		if err == nil && len(body) > maxPayload {
			err = errors.New("payload too large")
		}
		if err == nil {
			if r.URL.Path == "/v0.4/traces" {
				spans, err = decodeV04(body)
			} else {
				spans, err = decodeV05(body)
			}
		}
		if err != nil {
			req.Status, req.Error = http.StatusBadRequest, err.Error()
			break
		}
		req.Status, req.Spans = http.StatusOK, len(spans)
	case strings.HasPrefix(r.URL.Path, "/telemetry/") || r.URL.Path == "/v0.6/stats" || strings.HasPrefix(r.URL.Path, "/evp_proxy/"):
		_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, maxPayload))
		req.Status = http.StatusAccepted
	default:
		req.Status = http.StatusNotFound
	}

	in.mu.Lock()
	in.spans = append(in.spans, spans...)
	in.requests = append(in.requests, req)
	close(in.changed)
	in.changed = make(chan struct{})
	in.mu.Unlock()

	switch req.Status {
	case http.StatusOK:
		w.Header().Set("Content-Type", "application/json")
		// The agent's answer: sampling rates by service; an empty map keeps the defaults.
		_, _ = io.WriteString(w, `{"rate_by_service":{}}`)
	case http.StatusBadRequest:
		http.Error(w, req.Error, req.Status)
	default:
		w.WriteHeader(req.Status)
	}
}

func tracerID(h http.Header) string {
	var parts []string
	for _, k := range []string{"Datadog-Meta-Lang", "Datadog-Meta-Lang-Version", "Datadog-Meta-Tracer-Version"} {
		if v := h.Get(k); v != "" {
			parts = append(parts, v)
		}
	}
	return strings.Join(parts, " ")
}

// decodeV04 reads the v0.4 format: an array of traces, each an array of span maps.
func decodeV04(body []byte) ([]Span, error) {
	v, err := decodeMsgpack(body)
	if err != nil {
		return nil, err
	}
	traces, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("v0.4 payload is a %T, want an array of traces", v)
	}
	var out []Span
	for i, t := range traces {
		spans, ok := t.([]any)
		if !ok {
			return nil, fmt.Errorf("trace %d is a %T, want an array of spans", i, t)
		}
		for j, s := range spans {
			m, ok := s.(map[any]any)
			if !ok {
				return nil, fmt.Errorf("trace %d span %d is a %T, want a map", i, j, s)
			}
			out = append(out, spanFromMap(m))
		}
	}
	return out, nil
}

func spanFromMap(m map[any]any) Span {
	s := Span{Meta: map[string]string{}, Metrics: map[string]float64{}}
	str := func(k string) string { v, _ := m[k].(string); return v }
	s.Service, s.Name, s.Resource, s.Type = str("service"), str("name"), str("resource"), str("type")
	s.TraceID, _ = asUint64(m["trace_id"])
	s.SpanID, _ = asUint64(m["span_id"])
	s.ParentID, _ = asUint64(m["parent_id"])
	s.Start, _ = asInt64(m["start"])
	s.Duration, _ = asInt64(m["duration"])
	s.Error, _ = asInt64(m["error"])
	if meta, ok := m["meta"].(map[any]any); ok {
		for k, v := range meta {
			ks, _ := k.(string)
			vs, _ := v.(string)
			s.Meta[ks] = vs
		}
	}
	if metrics, ok := m["metrics"].(map[any]any); ok {
		for k, v := range metrics {
			ks, _ := k.(string)
			s.Metrics[ks], _ = asFloat64(v)
		}
	}
	return s
}

// decodeV05 reads the v0.5 format: [string table, traces], each span a 12-element array whose
// strings are indices into the table.
func decodeV05(body []byte) ([]Span, error) {
	v, err := decodeMsgpack(body)
	if err != nil {
		return nil, err
	}
	top, ok := v.([]any)
	if !ok || len(top) != 2 {
		return nil, errors.New("v0.5 payload is not [string table, traces]")
	}
	table, ok := top[0].([]any)
	if !ok {
		return nil, errors.New("v0.5 string table is not an array")
	}
	traces, ok := top[1].([]any)
	if !ok {
		return nil, errors.New("v0.5 traces are not an array")
	}
	lookup := func(x any) (string, error) {
		i, ok := asUint64(x)
		if !ok || i >= uint64(len(table)) {
			return "", fmt.Errorf("bad string table index %v", x)
		}
		s, _ := table[i].(string)
		return s, nil
	}
	var out []Span
	for i, t := range traces {
		spans, ok := t.([]any)
		if !ok {
			return nil, fmt.Errorf("trace %d is not an array", i)
		}
		for j, sv := range spans {
			f, ok := sv.([]any)
			if !ok || len(f) != 12 {
				return nil, fmt.Errorf("trace %d span %d is not a 12-element array", i, j)
			}
			s := Span{Meta: map[string]string{}, Metrics: map[string]float64{}}
			for k, dst := range map[int]*string{0: &s.Service, 1: &s.Name, 2: &s.Resource, 11: &s.Type} {
				if *dst, err = lookup(f[k]); err != nil {
					return nil, fmt.Errorf("trace %d span %d: %w", i, j, err)
				}
			}
			s.TraceID, _ = asUint64(f[3])
			s.SpanID, _ = asUint64(f[4])
			s.ParentID, _ = asUint64(f[5])
			s.Start, _ = asInt64(f[6])
			s.Duration, _ = asInt64(f[7])
			s.Error, _ = asInt64(f[8])
			if meta, ok := f[9].(map[any]any); ok {
				for k, v := range meta {
					ks, err1 := lookup(k)
					vs, err2 := lookup(v)
					if err := errors.Join(err1, err2); err != nil {
						return nil, fmt.Errorf("trace %d span %d meta: %w", i, j, err)
					}
					s.Meta[ks] = vs
				}
			}
			if metrics, ok := f[10].(map[any]any); ok {
				for k, v := range metrics {
					ks, err := lookup(k)
					if err != nil {
						return nil, fmt.Errorf("trace %d span %d metrics: %w", i, j, err)
					}
					s.Metrics[ks], _ = asFloat64(v)
				}
			}
			out = append(out, s)
		}
	}
	return out, nil
}

// FormatSpans renders spans as a table for logs and the demo, one line per span.
func FormatSpans(spans []Span) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-20s %-16s %-14s %-32s %10s  %s\n", "TRACE", "SPAN", "SERVICE", "NAME / RESOURCE", "DURATION", "TAGS")
	for _, s := range spans {
		tags := []string{}
		for _, k := range []string{"http.method", "http.status_code", "http.url", "span.kind", "language"} {
			if v, ok := s.Meta[k]; ok {
				tags = append(tags, k+"="+v)
			}
		}
		name := s.Name
		if s.Resource != "" && s.Resource != s.Name {
			name += " " + s.Resource
		}
		fmt.Fprintf(&b, "%-20d %-16x %-14s %-32s %10s  %s\n", s.TraceID, s.SpanID, s.Service, truncate(name, 32),
			time.Duration(s.Duration).Round(time.Microsecond), strings.Join(tags, " "))
	}
	return b.String()
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-1] + "…"
}
