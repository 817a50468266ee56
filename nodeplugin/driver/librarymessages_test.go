package driver

import (
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache"
	"github.com/apm-csi/apm-csi/test/libimages"
)

// TestLibraryErrorMessagesSayEachFactOnce publishes through the real library cache and an
// in-process registry, and checks the message kubelet shows in the pod's events: it names the
// image once, and says once that kubelet retries when the code is one kubelet retries (never
// for a final one).
func TestLibraryErrorMessagesSayEachFactOnce(t *testing.T) {
	reg := libimages.Start(t)
	down := libimages.Start(t)
	img, err := libimages.Library("java", "v1")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []*libimages.Registry{reg, down} {
		if _, err := r.Push("datadog/dd-lib-java-init", "v1", img); err != nil {
			t.Fatal(err)
		}
	}
	if err := down.Stop(); err != nil {
		t.Fatal(err)
	}
	cache, err := librarycache.New(librarycache.Config{
		StoreDir:            filepath.Join(t.TempDir(), "store"),
		AllowedRepositories: []string{reg.Addr(), down.Addr()},
		InsecureRegistries:  []string{reg.Addr(), down.Addr()},
		Logger:              slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cache.Close() })
	f := newFixture(t, func(c *Config) {
		c.Libraries = cache
		c.PublishDownloadBudget = 300 * time.Millisecond
	})

	tests := []struct {
		name  string
		image string
		hold  bool
		code  codes.Code
		says  string
	}{
		{name: "registry unreachable", image: down.Repo("datadog/dd-lib-java-init") + ":v1", code: codes.Unavailable, says: "connection refused"},
		{name: "still downloading", image: reg.Repo("datadog/dd-lib-java-init") + ":v1", hold: true, code: codes.Unavailable, says: "in the background"},
		{name: "no such tag", image: reg.Repo("datadog/dd-lib-java-init") + ":v404", code: codes.NotFound, says: "check the library image and version"},
		{name: "repository not allowed", image: "127.0.0.1:1/elsewhere/dd-lib-java-init:v1", code: codes.PermissionDenied, says: "--allowed-repository"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.hold {
				release := reg.HoldBlobs(0)
				defer release()
			}
			_, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-msg", f.target("pod-"+string(rune('a'+i))), libraryAttrs(tt.image)))
			msg := status.Convert(err).Message()
			t.Logf("%v: %s", status.Code(err), msg)
			if status.Code(err) != tt.code {
				t.Fatalf("code = %v (%q), want %v", status.Code(err), msg, tt.code)
			}
			if !strings.Contains(msg, tt.says) {
				t.Errorf("message %q does not say %q", msg, tt.says)
			}
			if n := strings.Count(msg, tt.image); n != 1 {
				t.Errorf("message %q names the image %d times, want once", msg, n)
			}
			hints := strings.Count(strings.ToLower(msg), "retr")
			want := 0
			if tt.code == codes.Unavailable || tt.code == codes.ResourceExhausted {
				want = 1
			}
			if hints != want {
				t.Errorf("message %q has %d retry hints, want %d", msg, hints, want)
			}
		})
	}
}
