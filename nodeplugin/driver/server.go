package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// SocketPath returns the file system path of a unix endpoint: "unix:///p", "unix:/p" or "/p".
func SocketPath(endpoint string) (string, error) {
	p := endpoint
	if rest, ok := strings.CutPrefix(endpoint, "unix://"); ok {
		p = rest
	} else if rest, ok := strings.CutPrefix(endpoint, "unix:"); ok {
		p = rest
	}
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("endpoint %q: want unix:///absolute/path.sock", endpoint)
	}
	return filepath.Clean(p), nil
}

// ListenUnix listens on a unix socket, creating its directory and removing a stale socket left
// by a previous run. It refuses to remove anything at that path that is not a socket.
func ListenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, err
	case fi.Mode()&fs.ModeSocket == 0:
		return nil, fmt.Errorf("%s exists and is not a socket; remove it or choose another endpoint", path)
	default:
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
		}
	}
	return net.Listen("unix", path)
}

// NewGRPCServer returns a gRPC server with the driver's Identity and Node services and request
// logging.
func NewGRPCServer(d *Driver, log *slog.Logger) *grpc.Server {
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(LoggingInterceptor(log)))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterNodeServer(srv, d)
	return srv
}

// Shutdown stops srv gracefully: no new calls, in-flight ones finish. After timeout, remaining
// calls are cancelled; each one then frees what it allocated before returning.
func Shutdown(srv *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(timeout):
		srv.Stop()
		<-done
	}
}

// LoggingInterceptor logs every call with its duration and gRPC code, and the fields of
// publish/unpublish requests. Volume attributes are logged with kubelet's service account
// tokens removed and other secrets masked; the requests' secrets fields are never logged.
// Probe and other frequent identity calls log at debug level.
func LoggingInterceptor(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := handler(ctx, req)
		attrs := []any{"method", info.FullMethod, "code", status.Code(err).String(), "duration", time.Since(start)}
		level := slog.LevelDebug
		switch r := req.(type) {
		case *csi.NodePublishVolumeRequest:
			level = slog.LevelInfo
			va := r.GetVolumeContext()
			attrs = append(attrs, "volume", r.GetVolumeId(), "target", r.GetTargetPath(), "readonly", r.GetReadonly(), "attributes", redactAttributes(va))
			if name := va[attrPodName]; name != "" {
				attrs = append(attrs, "pod", va[attrPodNamespace]+"/"+name)
			}
		case *csi.NodeUnpublishVolumeRequest:
			level = slog.LevelInfo
			attrs = append(attrs, "volume", r.GetVolumeId(), "target", r.GetTargetPath())
		}
		if err != nil {
			attrs = append(attrs, "error", status.Convert(err).Message())
			if level < slog.LevelInfo {
				level = slog.LevelInfo
			}
		}
		log.Log(ctx, level, "csi call", attrs...)
		return resp, err
	}
}
