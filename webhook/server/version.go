package server

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/version"
	"sigs.k8s.io/controller-runtime/pkg/manager"
)

// Intervals of ServerVersion: a failed read is retried soon, a good one refreshed now and
// then, so that an API server upgrade is seen without restarting the webhook.
const (
	versionRetry   = 5 * time.Second
	versionRefresh = 10 * time.Minute
)

// VersionReader is the part of a discovery client ServerVersion uses.
type VersionReader interface {
	ServerVersion() (*version.Info, error)
}

// ServerVersion keeps the API server's version (GET /version, which every authenticated
// client may read: no RBAC rule needed), read when the manager starts and refreshed
// periodically. Image volumes are on by default from Kubernetes 1.35; before that an image
// volume would be dropped by the API server and the pod refused.
type ServerVersion struct {
	Discovery VersionReader
	Log       *slog.Logger
	current   atomic.Pointer[string]
}

var _ manager.LeaderElectionRunnable = (*ServerVersion)(nil)

// NeedLeaderElection is false: every replica serves admission requests.
func (s *ServerVersion) NeedLeaderElection() bool { return false }

// Get returns the last version read (gitVersion, e.g. v1.35.2), or "".
func (s *ServerVersion) Get() string {
	if v := s.current.Load(); v != nil {
		return *v
	}
	return ""
}

// Start reads the version until ctx ends.
func (s *ServerVersion) Start(ctx context.Context) error {
	for {
		wait := versionRefresh
		info, err := s.Discovery.ServerVersion()
		switch {
		case err != nil:
			s.Log.Warn("cannot read the API server version; retrying", "err", err, "retryIn", versionRetry)
			wait = versionRetry
		default:
			v := info.GitVersion
			if old := s.Get(); old != v {
				s.Log.Info("API server version", "version", v, "previous", old)
			}
			s.current.Store(&v)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}
