// Package registration serves kubelet's plugin registration API on
// <kubelet-dir>/plugins_registry/<driver>-reg.sock, which is what the node-driver-registrar
// sidecar otherwise does: kubelet finds the socket, asks GetInfo for the driver's name and CSI
// endpoint, and reports the outcome through NotifyRegistrationStatus.
package registration

import (
	"context"
	"log/slog"
	"path/filepath"
	"sync"

	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// SupportedVersions are the CSI spec versions kubelet may use with the driver.
var SupportedVersions = []string{"1.0.0"}

// SocketPath returns where kubelet looks for the registration socket of driverName.
func SocketPath(kubeletDir, driverName string) string {
	return filepath.Join(kubeletDir, "plugins_registry", driverName+"-reg.sock")
}

// Server implements registerapi.RegistrationServer.
type Server struct {
	registerapi.UnimplementedRegistrationServer

	driverName string
	// endpoint is the CSI socket path as kubelet sees it on the host.
	endpoint string
	log      *slog.Logger

	mu         sync.Mutex
	registered bool
	lastError  string
}

// New returns a registration server announcing the CSI driver driverName at endpoint (a path).
func New(driverName, endpoint string, log *slog.Logger) *Server {
	return &Server{driverName: driverName, endpoint: endpoint, log: log}
}

// GetInfo implements registerapi.RegistrationServer.
func (s *Server) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.driverName,
		Endpoint:          s.endpoint,
		SupportedVersions: SupportedVersions,
	}, nil
}

// NotifyRegistrationStatus implements registerapi.RegistrationServer. A refusal is logged with
// kubelet's reason; kubelet retries registration itself when the socket is recreated, so the
// plugin keeps serving rather than exiting.
func (s *Server) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	s.mu.Lock()
	s.registered, s.lastError = st.GetPluginRegistered(), st.GetError()
	s.mu.Unlock()
	if st.GetPluginRegistered() {
		s.log.Info("registered with kubelet", "driver", s.driverName, "endpoint", s.endpoint)
	} else {
		s.log.Error("kubelet refused the plugin registration", "driver", s.driverName, "err", st.GetError())
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// Registered reports kubelet's last registration verdict and its error, if any.
func (s *Server) Registered() (bool, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.registered, s.lastError
}

// NewGRPCServer returns a gRPC server serving s.
func NewGRPCServer(s *Server) *grpc.Server {
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, s)
	return srv
}
