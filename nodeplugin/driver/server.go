package driver

import (
	"log/slog"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
)

// NewGRPCServer returns a gRPC server with the driver's Identity and Node services and request
// logging.
func NewGRPCServer(d *Driver, log *slog.Logger) *grpc.Server {
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(LoggingInterceptor(log)))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterNodeServer(srv, d)
	return srv
}
