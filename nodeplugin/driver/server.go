package driver

import (
	"context"
	"log/slog"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// NewGRPCServer returns a gRPC server with the driver's Identity and Node services and request
// logging.
func NewGRPCServer(d *Driver, log *slog.Logger) *grpc.Server {
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(LoggingInterceptor(log)))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterNodeServer(srv, d)
	return srv
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
