package driver

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/apm-csi/apm-csi/nodeplugin/grpcserver"
)

// loggedRecord is one log record as a recorder saw it, its attributes by key.
type loggedRecord struct {
	level slog.Level
	msg   string
	attrs map[string]any
}

// recorder is a slog.Handler that keeps every record, at every level.
type recorder struct {
	mu      *sync.Mutex
	records *[]loggedRecord
	with    []slog.Attr
}

func newRecorder() *recorder { return &recorder{mu: &sync.Mutex{}, records: &[]loggedRecord{}} }

func (h *recorder) Enabled(context.Context, slog.Level) bool { return true }

func (h *recorder) Handle(_ context.Context, r slog.Record) error {
	rec := loggedRecord{level: r.Level, msg: r.Message, attrs: map[string]any{}}
	for _, a := range h.with {
		rec.attrs[a.Key] = a.Value.Any()
	}
	r.Attrs(func(a slog.Attr) bool {
		rec.attrs[a.Key] = a.Value.Any()
		return true
	})
	h.mu.Lock()
	defer h.mu.Unlock()
	*h.records = append(*h.records, rec)
	return nil
}

func (h *recorder) WithAttrs(attrs []slog.Attr) slog.Handler {
	c := *h
	c.with = append(slices.Clip(h.with), attrs...)
	return &c
}

func (h *recorder) WithGroup(string) slog.Handler { return h }

// take returns the records kept so far and forgets them.
func (h *recorder) take() []loggedRecord {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := *h.records
	*h.records = nil
	return out
}

func withLogger(log *slog.Logger) fixtureOption { return func(c *Config) { c.Logger = log } }

// serve runs the driver's gRPC server, logging to log, on a socket in a temp dir and returns
// a Node client of it.
func (f *fixture) serve(t *testing.T, log *slog.Logger) csi.NodeClient {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "csi.sock")
	lis, err := grpcserver.ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewGRPCServer(f.d, log)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Stop()
		if err := <-served; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			t.Error(err)
		}
	})
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return csi.NewNodeClient(conn)
}

// callLogged runs handler on req through LoggingInterceptor, as the gRPC server does, and
// returns every record logged meanwhile and the call's error, the driver's own included (the
// fixture logs to h).
func callLogged[Req, Resp any](t *testing.T, h *recorder, method string, handler func(context.Context, Req) (Resp, error), req Req) ([]loggedRecord, error) {
	t.Helper()
	h.take()
	_, err := LoggingInterceptor(slog.New(h))(context.Background(), req, &grpc.UnaryServerInfo{FullMethod: method},
		func(ctx context.Context, req any) (any, error) { return handler(ctx, req.(Req)) })
	return h.take(), err
}

func TestEachCSICallIsLoggedOnce(t *testing.T) {
	h := newRecorder()
	f := newFixture(t, withLogger(slog.New(h)))
	node := f.serve(t, slog.New(h))
	target := f.target("pod-uid-1")
	attrs := hostdirAttrs("data")
	attrs[attrPodUID] = "pod-uid-1"

	h.take()
	if _, err := node.NodePublishVolume(context.Background(), f.publishReq("vol-1", target, attrs)); err != nil {
		t.Fatal(err)
	}
	records := h.take()
	if len(records) != 1 {
		t.Fatalf("one NodePublishVolume logged %d records, want 1: %+v", len(records), records)
	}
	rec := records[0]
	want := map[string]any{
		"method":     "/csi.v1.Node/NodePublishVolume",
		"code":       "OK",
		"volumeID":   "vol-1",
		"targetPath": target,
		"pod":        "app",
		"namespace":  "default",
		"podUID":     "pod-uid-1",
		"volumeType": "hostdir",
	}
	if rec.msg != "csi call" || rec.level != slog.LevelInfo {
		t.Fatalf("record %q at %v, want \"csi call\" at INFO", rec.msg, rec.level)
	}
	for k, v := range want {
		if rec.attrs[k] != v {
			t.Errorf("%s = %v, want %v (record %v)", k, rec.attrs[k], v, rec.attrs)
		}
	}
	if _, ok := rec.attrs["duration"]; !ok {
		t.Errorf("no duration in %v", rec.attrs)
	}

	t.Run("a library volume's record names its libraries", func(t *testing.T) {
		h.take()
		if _, err := node.NodePublishVolume(context.Background(), f.publishReq("vol-2", f.target("pod-uid-2"), libraryAttrs("registry.test/java:1", "registry.test/python:2"))); err != nil {
			t.Fatal(err)
		}
		records := h.take()
		if len(records) != 1 {
			t.Fatalf("logged %d records, want 1: %+v", len(records), records)
		}
		if got, _ := records[0].attrs["library"].([]string); !slices.Equal(got, []string{"registry.test/java:1", "registry.test/python:2"}) {
			t.Fatalf("library = %v", records[0].attrs["library"])
		}
	})

	t.Run("a library volume's unpublish names its libraries from the record", func(t *testing.T) {
		h.take()
		if _, err := node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-2", TargetPath: f.target("pod-uid-2")}); err != nil {
			t.Fatal(err)
		}
		records := h.take()
		if len(records) != 1 {
			t.Fatalf("logged %d records, want 1: %+v", len(records), records)
		}
		if got, _ := records[0].attrs["library"].([]string); !slices.Equal(got, []string{"registry.test/java:1", "registry.test/python:2"}) {
			t.Fatalf("library = %v", records[0].attrs["library"])
		}
	})

	t.Run("a failed call's one record carries the message kubelet shows", func(t *testing.T) {
		h.take()
		_, err := node.NodePublishVolume(context.Background(), f.publishReq("vol-3", f.target("pod-uid-3"), hostdirAttrs("undeclared")))
		records := h.take()
		if len(records) != 1 {
			t.Fatalf("logged %d records, want 1: %+v", len(records), records)
		}
		if records[0].attrs["code"] != "InvalidArgument" || records[0].attrs["err"] == nil || records[0].level != slog.LevelWarn {
			t.Fatalf("record of a refused publish (%v): %v at %v", err, records[0].attrs, records[0].level)
		}
	})

	t.Run("unpublish logs once with the pod of the record", func(t *testing.T) {
		h.take()
		if _, err := node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: target}); err != nil {
			t.Fatal(err)
		}
		records := h.take()
		if len(records) != 1 {
			t.Fatalf("one NodeUnpublishVolume logged %d records, want 1: %+v", len(records), records)
		}
		for k, v := range map[string]any{"method": "/csi.v1.Node/NodeUnpublishVolume", "code": "OK", "volumeID": "vol-1", "targetPath": target, "pod": "app", "namespace": "default", "podUID": "pod-uid-1"} {
			if records[0].attrs[k] != v {
				t.Errorf("%s = %v, want %v", k, records[0].attrs[k], v)
			}
		}
	})
}

func TestTokensAndSecretsReachNeitherLogsNorRecords(t *testing.T) {
	f := newFixture(t)
	var logs bytes.Buffer
	node := f.serve(t, slog.New(slog.NewJSONHandler(&logs, nil)))
	attrs := hostdirAttrs("data")
	attrs["csi.storage.k8s.io/serviceAccount.tokens"] = `{"aud":{"token":"eyJhbGciOiJSUzI1NiJ9.SECRET-TOKEN"}}`
	req := f.publishReq("vol-1", f.target("pod-a"), attrs)
	req.Secrets = map[string]string{"password": "SECRET-PASSWORD"}
	if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	out := logs.String() + f.logs.String()
	if strings.Contains(out, "SECRET") {
		t.Fatalf("a secret reached the logs: %s", out)
	}
	for _, want := range []string{`"volumeID":"vol-1"`, `"pod":"app"`, `"namespace":"default"`, `"code":"OK"`} {
		if !strings.Contains(logs.String(), want) {
			t.Fatalf("log lacks %s: %s", want, logs.String())
		}
	}
	rec := f.d.Records()[0]
	if _, ok := rec.Attributes["csi.storage.k8s.io/serviceAccount.tokens"]; ok {
		t.Fatal("the state record kept the service account tokens")
	}
	var data []byte
	files, _ := os.ReadDir(f.d.store.Dir())
	for _, e := range files {
		b, _ := os.ReadFile(filepath.Join(f.d.store.Dir(), e.Name()))
		data = append(data, b...)
	}
	if !strings.Contains(string(data), rec.Key()) {
		t.Fatalf("the record is not in the state dir %s", f.d.store.Dir())
	}
	if strings.Contains(string(data), "SECRET") {
		t.Fatal("a secret reached the state dir")
	}
}
