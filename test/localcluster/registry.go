package localcluster

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"k8s.io/apimachinery/pkg/util/wait"
)

// ServeRegistry serves an OCI distribution registry (go-containerregistry's pkg/registry) on
// addr, a loopback address, until ctx ends. Blobs are stored under dir; manifests and tags
// are kept in memory, so the registry's content lives as long as the process, which is as
// long as the cluster. Requests are logged to logw.
func ServeRegistry(ctx context.Context, addr, dir string, logw *log.Logger) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil || !isLoopback(host) {
		return fmt.Errorf("registry address %q must be a loopback host:port", addr)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return serveRegistryOn(ctx, l, dir, logw)
}

func serveRegistryOn(ctx context.Context, l net.Listener, dir string, logw *log.Logger) error {
	srv := &http.Server{
		Handler:           registry.New(registry.WithBlobHandler(registry.NewDiskBlobHandler(dir)), registry.Logger(logw)),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// waitRegistry polls the registry's /v2/ endpoint.
func waitRegistry(ctx context.Context, addr string) error {
	client := &http.Client{Timeout: 2 * time.Second}
	return poll(ctx, 100*time.Millisecond, func() (bool, error) {
		resp, err := client.Get("http://" + addr + "/v2/")
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
}

// poll calls check at once and then every interval until it reports done, returns an error,
// or ctx ends (then it returns ctx.Err()).
func poll(ctx context.Context, interval time.Duration, check func() (bool, error)) error {
	return wait.PollUntilContextCancel(ctx, interval, true, func(context.Context) (bool, error) { return check() })
}
