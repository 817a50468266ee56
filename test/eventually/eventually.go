// Package eventually waits, in tests and their harnesses, for state that another goroutine,
// process or controller brings about. It polls a check until the check holds or a timeout
// passes (apimachinery's wait.PollUntilContextTimeout does the polling), and on timeout says
// what was awaited and what the check observed last, so that a failed wait explains itself.
package eventually

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
)

// Check reports whether the awaited state holds: nil when it does, otherwise an error that
// describes the state it observed (the timeout message shows the last one). Return Stop(err)
// to end the wait at once, when the state can no longer come (a process exited, a pod failed).
type Check func(ctx context.Context) error

// True is the Check of a condition that cannot describe what it observed; prefer a Check that
// says what it saw.
func True(cond func() bool) Check {
	return func(context.Context) error {
		if !cond() {
			return errStillFalse
		}
		return nil
	}
}

var errStillFalse = errors.New("the condition still does not hold")

// Stop marks err as final: the wait ends with it instead of polling on.
func Stop(err error) error { return &stopError{err} }

type stopError struct{ err error }

func (s *stopError) Error() string { return s.err.Error() }
func (s *stopError) Unwrap() error { return s.err }

// Wait calls check at once and then every interval until it returns nil. It returns an error
// naming what was awaited when timeout passes (with the last state check observed), when check
// returns a Stop error, or when ctx ends.
func Wait(ctx context.Context, timeout, interval time.Duration, what string, check Check) error {
	last := errors.New("not checked yet")
	err := wait.PollUntilContextTimeout(ctx, interval, timeout, true, func(ctx context.Context) (bool, error) {
		last = check(ctx)
		if stop, ok := errors.AsType[*stopError](last); ok {
			return false, stop
		}
		return last == nil, nil
	})
	switch {
	case err == nil:
		return nil
	case !wait.Interrupted(err):
		return fmt.Errorf("waiting for %s: %w", what, err)
	case ctx.Err() != nil:
		return fmt.Errorf("waiting for %s: %w (last observed: %v)", what, context.Cause(ctx), last)
	default:
		return fmt.Errorf("timed out after %s waiting for %s; last observed: %w", timeout, what, last)
	}
}

// Require is Wait that fails tb with Wait's error.
func Require(tb testing.TB, ctx context.Context, timeout, interval time.Duration, what string, check Check) {
	tb.Helper()
	if err := Wait(ctx, timeout, interval, what, check); err != nil {
		tb.Fatal(err)
	}
}
