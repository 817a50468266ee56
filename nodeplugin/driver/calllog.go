package driver

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// callLog is what the one log record of a CSI call says beyond its request: the facts only the
// handler learns (the volume type and libraries, the effective read-only mode, a hostdir entry
// refused to the pod, why an unpublish did nothing). The handler attaches them; LoggingInterceptor
// logs them with the call. Handlers called without the interceptor (unit tests) get a nil
// callLog, whose methods do nothing.
type callLog struct {
	mu    sync.Mutex
	attrs []any
	level slog.Level
}

type callLogKey struct{}

// callLogFrom returns the call's log of ctx, or nil.
func callLogFrom(ctx context.Context) *callLog {
	c, _ := ctx.Value(callLogKey{}).(*callLog)
	return c
}

// add attaches key-value pairs to the call's log record.
func (c *callLog) add(kv ...any) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.attrs = append(c.attrs, kv...)
}

// atLeast raises the level of the call's log record to level: a call that succeeded but did
// nothing, or left something behind, is a warning or an error.
func (c *callLog) atLeast(level slog.Level) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.level = max(c.level, level)
}

// addLibraries attaches the images of a library volume, if spec has any.
func (c *callLog) addLibraries(spec *volumeattrs.Spec) {
	if c == nil || len(spec.Libraries) == 0 {
		return
	}
	images := make([]string, 0, len(spec.Libraries))
	for _, l := range spec.Libraries {
		images = append(images, l.Image)
	}
	c.add("library", images)
}

// podLogAttrs are the log keys of a pod: name, namespace and uid, those that are known.
func podLogAttrs(namespace, name, uid string) []any {
	var kv []any
	if name != "" {
		kv = append(kv, "pod", name)
	}
	if namespace != "" {
		kv = append(kv, "namespace", namespace)
	}
	if uid != "" {
		kv = append(kv, "podUID", uid)
	}
	return kv
}

// LoggingInterceptor logs every call once, when it returns: "csi call" with method, gRPC code,
// duration and, for publish and unpublish, volumeID, targetPath, the pod (pod, namespace,
// podUID) and what the handler attached (volumeType, library, readOnly, ...). A failed call
// carries err, the message kubelet shows. Volume attributes are logged with kubelet's service
// account tokens removed and other secrets masked; the requests' secrets fields are never
// logged. Successful identity and capability calls (Probe is frequent) log at debug level.
func LoggingInterceptor(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		call := &callLog{level: slog.LevelDebug}
		attrs := []any{"method", info.FullMethod}
		switch r := req.(type) {
		case *csi.NodePublishVolumeRequest:
			call.level = slog.LevelInfo
			va := r.GetVolumeContext()
			attrs = append(attrs, "volumeID", r.GetVolumeId(), "targetPath", r.GetTargetPath())
			attrs = append(attrs, podLogAttrs(va[attrPodNamespace], va[attrPodName], va[attrPodUID])...)
			attrs = append(attrs, "attributes", logAttributes(va))
		case *csi.NodeUnpublishVolumeRequest:
			call.level = slog.LevelInfo
			attrs = append(attrs, "volumeID", r.GetVolumeId(), "targetPath", r.GetTargetPath())
		}
		resp, err := handler(context.WithValue(ctx, callLogKey{}, call), req)
		attrs = append(attrs, "code", status.Code(err).String(), "duration", time.Since(start))
		call.mu.Lock()
		attrs = append(attrs, call.attrs...)
		level := call.level
		call.mu.Unlock()
		if err != nil {
			attrs = append(attrs, "err", status.Convert(err).Message())
			level = max(level, slog.LevelWarn)
		}
		log.Log(ctx, level, "csi call", attrs...)
		return resp, err
	}
}

// logAttributes are the volume attributes as logged: redacted, without the pod's name,
// namespace and uid (logged under their own keys).
func logAttributes(attrs map[string]string) map[string]string {
	out := redactAttributes(attrs)
	delete(out, attrPodName)
	delete(out, attrPodNamespace)
	delete(out, attrPodUID)
	return out
}
