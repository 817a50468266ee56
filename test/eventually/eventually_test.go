package eventually

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestWaitReturnsOnceTheCheckHolds(t *testing.T) {
	calls := 0
	err := Wait(t.Context(), time.Minute, time.Millisecond, "the third call", func(context.Context) error {
		calls++
		if calls < 3 {
			return fmt.Errorf("call %d", calls)
		}
		return nil
	})
	if err != nil || calls != 3 {
		t.Fatalf("Wait = %v after %d calls, want nil after 3", err, calls)
	}
}

func TestWaitTimeoutNamesWhatWasAwaitedAndTheLastObservedState(t *testing.T) {
	calls := 0
	err := Wait(t.Context(), 50*time.Millisecond, time.Millisecond, "the pod to be Ready", func(context.Context) error {
		calls++
		return fmt.Errorf("phase Pending (check %d)", calls)
	})
	if err == nil {
		t.Fatal("Wait of a check that never holds returned nil")
	}
	want := fmt.Sprintf("timed out after 50ms waiting for the pod to be Ready; last observed: phase Pending (check %d)", calls)
	if err.Error() != want {
		t.Fatalf("Wait = %q, want %q", err, want)
	}
}

func TestWaitStopsAtOnceOnAStopError(t *testing.T) {
	exited := errors.New("exit status 2")
	calls := 0
	err := Wait(t.Context(), time.Minute, time.Millisecond, "the server to answer", func(context.Context) error {
		calls++
		return Stop(fmt.Errorf("the server exited: %w", exited))
	})
	if calls != 1 || !errors.Is(err, exited) || !strings.Contains(err.Error(), "waiting for the server to answer: the server exited") {
		t.Fatalf("Wait = %v after %d calls, want the stop error after 1", err, calls)
	}
}

func TestWaitEndsWithItsContext(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	err := Wait(ctx, time.Minute, time.Millisecond, "a cancelled wait", func(context.Context) error {
		cancel()
		return errors.New("still waiting")
	})
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "last observed: still waiting") {
		t.Fatalf("Wait = %v, want context.Canceled with the last observed state", err)
	}
}

func TestTrueHoldsWhenTheConditionIsTrue(t *testing.T) {
	ok := false
	check := True(func() bool { return ok })
	if err := check(t.Context()); err == nil {
		t.Fatal("True of a false condition = nil")
	}
	ok = true
	if err := check(t.Context()); err != nil {
		t.Fatalf("True of a true condition = %v", err)
	}
}
