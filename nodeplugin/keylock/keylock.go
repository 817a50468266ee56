// Package keylock serialises work per key (a volume id, a target path) while letting different
// keys run in parallel. Unlike k8s.io/utils/keymutex, which hashes keys onto a fixed set of
// mutexes (so unrelated volumes can wait on each other) and cannot give up, a waiter here
// returns when its context ends, so a call that its client abandoned does not queue forever.
package keylock

import (
	"context"
	"sync"
)

// Locks is a set of per-key locks. The zero value is ready to use; a Locks must not be copied
// after first use.
type Locks struct {
	mu   sync.Mutex
	held map[string]*entry
}

// entry is one key's lock: a token channel of capacity one, and how many holders and waiters
// refer to it, so that it is dropped when the last one leaves.
type entry struct {
	token chan struct{}
	refs  int
}

// Lock takes the locks of keys in order and returns the function that releases them all.
// Callers must always pass keys in the same order (e.g. volume id, then target), so that two
// calls cannot deadlock. If ctx ends first, the locks already taken are released and ctx's
// error is returned.
func (l *Locks) Lock(ctx context.Context, keys ...string) (unlock func(), err error) {
	var taken []string
	release := func() {
		for i := len(taken) - 1; i >= 0; i-- {
			l.unlockOne(taken[i])
		}
	}
	for _, k := range keys {
		if err := l.lockOne(ctx, k); err != nil {
			release()
			return nil, err
		}
		taken = append(taken, k)
	}
	return release, nil
}

func (l *Locks) lockOne(ctx context.Context, key string) error {
	l.mu.Lock()
	if l.held == nil {
		l.held = map[string]*entry{}
	}
	e := l.held[key]
	if e == nil {
		e = &entry{token: make(chan struct{}, 1)}
		l.held[key] = e
	}
	e.refs++
	l.mu.Unlock()
	select {
	case e.token <- struct{}{}:
		return nil
	case <-ctx.Done():
		l.drop(key, e)
		return ctx.Err()
	}
}

func (l *Locks) unlockOne(key string) {
	l.mu.Lock()
	e := l.held[key]
	l.mu.Unlock()
	<-e.token
	l.drop(key, e)
}

func (l *Locks) drop(key string, e *entry) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e.refs--; e.refs == 0 {
		delete(l.held, key)
	}
}
