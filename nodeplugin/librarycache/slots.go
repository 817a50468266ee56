package librarycache

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/utils/clock"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
)

// downloadSlots bounds concurrent downloads: at most total at once, and at most perHost from
// one registry host, so a slow or stalled registry cannot take every slot and starve the
// others. Waiting for a slot is bounded too: past the wait the caller gets an error naming
// what holds the slots, and kubelet retries the mount.
type downloadSlots struct {
	total, perHost int
	clock          clock.Clock

	mu      sync.Mutex
	busy    map[string]int
	n       int
	changed chan struct{}
}

func newDownloadSlots(total, perHost int, clk clock.Clock) *downloadSlots {
	return &downloadSlots{total: total, perHost: perHost, clock: clk, busy: map[string]int{}, changed: make(chan struct{})}
}

// acquire takes a slot for a download of what from host, waiting at most wait. The returned release
// gives it back.
func (s *downloadSlots) acquire(ctx context.Context, host, what string, wait time.Duration) (func(), error) {
	var timer clock.Timer
	for {
		s.mu.Lock()
		if s.n < s.total && s.busy[host] < s.perHost {
			s.n++
			s.busy[host]++
			s.mu.Unlock()
			if timer != nil {
				timer.Stop()
			}
			var once sync.Once
			return func() { once.Do(func() { s.release(host) }) }, nil
		}
		changed := s.changed
		reason := s.reasonLocked(host)
		s.mu.Unlock()
		if timer == nil {
			timer = s.clock.NewTimer(wait)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			timer.Stop()
			return nil, ctx.Err()
		case <-timer.C():
			return nil, fail(library.ErrDownloadSlotsBusy, "its download did not start within %s (--download-slot-wait): %s", wait, reason)
		}
	}
}

// waitIdle returns once no download holds a slot, after at most limit, or when ctx ends.
func (s *downloadSlots) waitIdle(ctx context.Context, clk clock.Clock, limit time.Duration) {
	var timer clock.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		s.mu.Lock()
		n, changed := s.n, s.changed
		s.mu.Unlock()
		if n == 0 {
			return
		}
		if timer == nil {
			timer = clk.NewTimer(limit)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		case <-timer.C():
			return
		}
	}
}

func (s *downloadSlots) release(host string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n--
	if s.busy[host]--; s.busy[host] <= 0 {
		delete(s.busy, host)
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// reasonLocked says why a download from host cannot start now.
func (s *downloadSlots) reasonLocked(host string) string {
	if s.busy[host] >= s.perHost && s.n < s.total {
		return fmt.Sprintf("registry %s already has %d downloads running, the most one registry may have (--max-downloads-per-registry)", host, s.busy[host])
	}
	var parts []string
	for _, h := range slices.Sorted(maps.Keys(s.busy)) {
		parts = append(parts, fmt.Sprintf("%s (%d)", h, s.busy[h]))
	}
	return fmt.Sprintf("all %d download slots are busy with downloads from %s (--max-parallel-downloads)", s.total, strings.Join(parts, ", "))
}

// registryHost is the registry part of a repository ("127.0.0.1:5000/datadog/x" gives
// "127.0.0.1:5000").
func registryHost(repo string) string {
	host, _, _ := strings.Cut(repo, "/")
	return host
}
