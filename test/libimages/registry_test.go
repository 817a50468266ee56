package libimages

import (
	"io"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

func TestClassify(t *testing.T) {
	tests := []struct {
		method, path string
		want         Request
	}{
		{"GET", "/v2/", Request{Method: "GET", Kind: "other"}},
		{"HEAD", "/v2/datadog/dd-lib-java-init/manifests/v1", Request{Method: "HEAD", Kind: "manifest", Repo: "datadog/dd-lib-java-init", Ref: "v1"}},
		{"GET", "/v2/a/b/c/blobs/sha256:abc", Request{Method: "GET", Kind: "blob", Repo: "a/b/c", Ref: "sha256:abc"}},
		{"POST", "/v2/a/blobs/uploads/", Request{Method: "POST", Kind: "other"}},
	}
	for _, tt := range tests {
		got := classify(&http.Request{Method: tt.method, URL: &url.URL{Path: tt.path}})
		if got != tt.want {
			t.Errorf("classify(%s %s) = %+v, want %+v", tt.method, tt.path, got, tt.want)
		}
	}
}

// TestRegistryCountsStopsAndHolds checks the behaviours the cache tests rely on: exactly
// one pull counts as one manifest and one fetch per layer, Stop refuses connections and Start
// comes back on the same address with the same content, HoldBlobs stalls downloads.
func TestRegistryCountsStopsAndHolds(t *testing.T) {
	r := Start(t)
	img, err := Library("java", "v1")
	if err != nil {
		t.Fatal(err)
	}
	pinned, err := r.Push("datadog/dd-lib-java-init", "v1", img)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(r.Requests()); n != 0 {
		t.Errorf("push requests were counted: %d", n)
	}
	pull := func() error {
		ref, err := name.ParseReference(pinned)
		if err != nil {
			return err
		}
		img, err := remote.Image(ref)
		if err != nil {
			return err
		}
		layers, err := img.Layers()
		if err != nil {
			return err
		}
		for _, l := range layers {
			rc, err := l.Compressed()
			if err != nil {
				return err
			}
			_, err = io.Copy(io.Discard, rc)
			rc.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}
	if err := pull(); err != nil {
		t.Fatal(err)
	}
	m, l, err := r.ImageFetches("datadog/dd-lib-java-init", img)
	if err != nil || m != 1 || l != 1 {
		t.Errorf("ImageFetches = %d, %d, %v; want 1, 1", m, l, err)
	}

	addr := r.Addr()
	if err := r.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := pull(); err == nil {
		t.Errorf("pull from a stopped registry succeeded")
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	if r.Addr() != addr {
		t.Errorf("restarted on %s, want %s", r.Addr(), addr)
	}
	if err := pull(); err != nil {
		t.Errorf("pull after restart: %v", err)
	}

	release := r.HoldBlobs(10)
	done := make(chan error, 1)
	go func() { done <- pull() }()
	select {
	case err := <-done:
		t.Fatalf("pull finished while blobs were held: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	release()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("pull after release: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("pull still stalled after release")
	}
}
