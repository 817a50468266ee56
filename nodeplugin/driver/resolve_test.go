package driver

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
	"github.com/apm-csi/apm-csi/nodeplugin/library/librarytest"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// heldStore makes the fake store's LayerFor for image block until released (or its context
// ends), and reports every call's start on started.
func heldStore(f *fixture, held string) (started <-chan string, release func()) {
	ch := make(chan string, 16)
	gate := make(chan struct{})
	f.store.Before(func(ctx context.Context, image string) error {
		ch <- image
		if image != held {
			return nil
		}
		select {
		case <-gate:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", image, ctx.Err())
		}
	})
	return ch, func() { close(gate) }
}

func TestPublishFetchesAVolumesLibrariesConcurrently(t *testing.T) {
	f := newFixture(t)
	started, release := heldStore(f, "r.local/a:v1")
	done := make(chan error, 1)
	go func() {
		_, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", f.target("pod-a"), libraryAttrs("r.local/a:v1", "r.local/b:v1")))
		done <- err
	}()
	seen := map[string]bool{}
	for len(seen) < 2 {
		select {
		case img := <-started:
			seen[img] = true
		case err := <-done:
			t.Fatalf("publish ended (%v) before both libraries were requested: %v", err, seen)
		case <-time.After(10 * time.Second):
			t.Fatalf("the second library was not requested while the first was held: requested %v", seen)
		}
	}
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestPublishFailsFastOnAFinalLibraryError(t *testing.T) {
	f := newFixture(t)
	_, release := heldStore(f, "r.local/slow:v1")
	defer release()
	f.store.FailWith("r.local/missing:v1", fmt.Errorf("manifest unknown: %w", library.ErrImageNotFound))
	done := make(chan error, 1)
	go func() {
		_, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", f.target("pod-a"), libraryAttrs("r.local/slow:v1", "r.local/missing:v1")))
		done <- err
	}()
	select {
	case err := <-done:
		wantCode(t, err, codes.NotFound, "r.local/missing:v1")
	case <-time.After(10 * time.Second):
		t.Fatal("publish waited for the held library although another one does not exist")
	}
	if f.m.Len() != 0 || len(f.d.Records()) != 0 {
		t.Fatal("a failed publish left state behind")
	}
}

func TestPublishReturnsAFinalErrorOverARetryableOne(t *testing.T) {
	for _, order := range [][]string{{"r.local/busy:v1", "r.local/denied:v1"}, {"r.local/denied:v1", "r.local/busy:v1"}} {
		t.Run(order[0], func(t *testing.T) {
			f := newFixture(t)
			f.store.FailWith("r.local/busy:v1", fmt.Errorf("pulling: %w", library.ErrDownloadInProgress))
			f.store.FailWith("r.local/denied:v1", fmt.Errorf("%w: not in the allowed repositories", library.ErrImageNotAllowed))
			_, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", f.target("pod-a"), libraryAttrs(order...)))
			wantCode(t, err, codes.PermissionDenied, "r.local/denied:v1")
		})
	}
}

func TestPublishKeepsLayerOrderWhateverFinishesFirst(t *testing.T) {
	f := newFixture(t)
	images := []string{"r.local/a:v1", "r.local/b:v1", "r.local/c:v1", "r.local/d:v1"}
	// The first library finishes last.
	started, release := heldStore(f, images[0])
	go func() {
		// Release the first library once every library was asked for (or, should they be
		// asked one after another, after a while).
		timeout := time.After(5 * time.Second)
		for n := 0; n < len(images); n++ {
			select {
			case <-started:
			case <-timeout:
				release()
				return
			}
		}
		release()
	}()
	attrs := libraryAttrs(images...)
	attrs["preload"] = "/opt/lib.so"
	spec, err := volumeattrs.Parse(attrs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.d.NodePublishVolume(context.Background(), f.publishReq("vol-1", f.target("pod-a"), attrs)); err != nil {
		t.Fatal(err)
	}
	recs := f.d.Records()
	if len(recs) != 1 {
		t.Fatalf("records = %d, want 1", len(recs))
	}
	got := recs[0].Layers
	if len(got) != len(images)+1 {
		t.Fatalf("layers = %v, want preload + %d libraries", got, len(images))
	}
	if filepath.Base(filepath.Dir(got[0].Dir)) != "generated" {
		t.Fatalf("top layer = %s, want the generated preload file", got[0].Dir)
	}
	for i, lib := range spec.Libraries {
		want, err := librarytest.New(f.store.Root).LayerFor(context.Background(), "", lib)
		if err != nil {
			t.Fatal(err)
		}
		if got[i+1].Dir != want.Dir {
			t.Fatalf("layer %d = %s, want %s's %s", i+1, got[i+1].Dir, lib.Image, want.Dir)
		}
	}
}
