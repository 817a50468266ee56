package keylock

import (
	"context"
	"errors"
	"runtime"
	"testing"
)

func mustLock(t *testing.T, l *Locks, keys ...string) func() {
	t.Helper()
	unlock, err := l.Lock(context.Background(), keys...)
	if err != nil {
		t.Fatalf("Lock(%q): %v", keys, err)
	}
	return unlock
}

// refs returns how many holders and waiters refer to key's lock.
func refs(l *Locks, key string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := l.held[key]; e != nil {
		return e.refs
	}
	return 0
}

func TestLocks(t *testing.T) {
	t.Run("a different key does not wait", func(t *testing.T) {
		var l Locks
		unlockA := mustLock(t, &l, "a")
		defer unlockA()
		mustLock(t, &l, "b")()
	})

	t.Run("a waiter on a held key returns its context's error and releases the keys it took", func(t *testing.T) {
		var l Locks
		unlockA := mustLock(t, &l, "a")
		defer unlockA()
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := l.Lock(ctx, "x", "a"); !errors.Is(err, context.Canceled) {
			t.Fatalf("Lock of a held key with an ended context: %v, want context.Canceled", err)
		}
		if n := refs(&l, "x"); n != 0 {
			t.Fatalf("key x still has %d references after the failed Lock", n)
		}
		mustLock(t, &l, "x")()
	})

	t.Run("a waiter gets the key once its holder releases it", func(t *testing.T) {
		var l Locks
		unlockA := mustLock(t, &l, "a")
		got, done := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(done)
			unlock, err := l.Lock(context.Background(), "a")
			if err != nil {
				t.Error(err)
				return
			}
			close(got)
			unlock()
		}()
		for refs(&l, "a") < 2 {
			runtime.Gosched()
		}
		select {
		case <-got:
			t.Fatal("the waiter took a key that is held")
		default:
		}
		unlockA()
		<-got
		<-done
	})

	t.Run("no entry is left once every holder and waiter is gone", func(t *testing.T) {
		var l Locks
		unlock := mustLock(t, &l, "a", "b")
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := l.Lock(ctx, "b"); !errors.Is(err, context.Canceled) {
			t.Fatalf("Lock of a held key with a cancelled context: %v, want %v", err, context.Canceled)
		}
		unlock()
		l.mu.Lock()
		defer l.mu.Unlock()
		if len(l.held) != 0 {
			t.Fatalf("lock entries leaked: %v", l.held)
		}
	})
}
