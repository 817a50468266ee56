package registration

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// TestKubeletHandshake plays kubelet's side of the registration over a real unix socket.
func TestKubeletHandshake(t *testing.T) {
	dir := t.TempDir()
	sock := SocketPath(dir, "csi.apm-csi.io")
	if sock != filepath.Join(dir, "plugins_registry", "csi.apm-csi.io-reg.sock") {
		t.Fatalf("socket path %s", sock)
	}
	sock = filepath.Join(dir, "reg.sock") // keep under the unix socket path length limit
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	s := New("csi.apm-csi.io", "/var/lib/kubelet/plugins/csi.apm-csi.io/csi.sock", slog.New(slog.NewTextHandler(&logs, nil)))
	srv := NewGRPCServer(s)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	defer func() {
		srv.Stop()
		if err := <-served; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			t.Error(err)
		}
	}()

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := registerapi.NewRegistrationClient(conn)
	info, err := c.GetInfo(context.Background(), &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != registerapi.CSIPlugin || info.Name != "csi.apm-csi.io" || info.Endpoint != "/var/lib/kubelet/plugins/csi.apm-csi.io/csi.sock" || len(info.SupportedVersions) == 0 {
		t.Fatalf("GetInfo = %+v", info)
	}
	if _, err := c.NotifyRegistrationStatus(context.Background(), &registerapi.RegistrationStatus{PluginRegistered: false, Error: "version mismatch"}); err != nil {
		t.Fatal(err)
	}
	if ok, msg := s.Registered(); ok || msg != "version mismatch" {
		t.Fatalf("Registered() = %t %q", ok, msg)
	}
	if !strings.Contains(logs.String(), "version mismatch") {
		t.Fatalf("refusal not logged: %s", logs.String())
	}
	if _, err := c.NotifyRegistrationStatus(context.Background(), &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if ok, _ := s.Registered(); !ok {
		t.Fatal("registration not recorded")
	}
}
