// Package configreload keeps the webhook's configuration in step with its file without a
// restart. The file is normally a ConfigMap key mounted as a directory: kubelet writes a new
// version into a fresh directory and swaps the ..data symlink, so the file changes in one step.
// The Source watches the directory (fsnotify, plus a periodic re-read in case an event is
// missed), parses and validates a new version completely, and only then publishes the new
// mutator with one atomic pointer store: a request reads the pointer once and decides with one
// configuration, never a mix. An invalid version is refused with a log line, a Warning Event on
// the webhook's pod and a metric, and the configuration in force stays.
package configreload

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/mutation"
)

// Event reasons.
const (
	ReasonLoaded   = "ConfigLoaded"
	ReasonRejected = "ConfigRejected"
)

// DefaultInterval is how often the file is read again even without a file event.
const DefaultInterval = 10 * time.Second

// Source is the configuration in force and, when it comes from a file, the watch on it.
type Source struct {
	path            string
	systemNamespace string
	// Client creates the Events about rejected versions; nil records none.
	Client client.Client
	// Pod is the webhook's pod, which the Events are about; no Events without its name.
	Pod Pod
	// Interval defaults to DefaultInterval.
	Interval time.Duration
	Log      *slog.Logger

	current atomic.Pointer[mutation.Mutator]
	mu      sync.Mutex
	// seen is the last content read (loaded or rejected), so that an unchanged file is not
	// parsed, logged or reported again.
	seen []byte
}

// Pod names the webhook's pod.
type Pod struct{ Namespace, Name string }

// Static returns a Source that always serves cfg (no file).
func Static(cfg *config.Config, systemNamespace string) *Source {
	s := &Source{systemNamespace: systemNamespace}
	s.publish(cfg)
	return s
}

// Load reads the file at path and returns a Source serving it. An invalid file is an error:
// at start there is no configuration to keep.
func Load(path, systemNamespace string) (*Source, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read webhook configuration: %w", err)
	}
	cfg, err := config.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s := &Source{path: path, systemNamespace: systemNamespace, seen: data}
	s.publish(cfg)
	return s, nil
}

func (s *Source) publish(cfg *config.Config) {
	hash := cfg.Hash()
	s.current.Store(mutation.New(cfg, s.systemNamespace, mutation.WithConfigHash(hash)))
	setInfo(hash)
}

// Mutator is the mutator of the configuration in force. Read it once per decision.
func (s *Source) Mutator() *mutation.Mutator { return s.current.Load() }

// Config is the configuration in force.
func (s *Source) Config() *config.Config { return s.Mutator().Config() }

// Hash is the hash of the configuration in force.
func (s *Source) Hash() string { return s.Mutator().ConfigHash() }

// Reload reads the file again and, when its content changed and is valid, puts it in force.
// It returns the error that made it refuse a new version (nil when loaded or unchanged).
func (s *Source) Reload(ctx context.Context) error {
	if s.path == "" {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	data, err := os.ReadFile(s.path)
	if err != nil {
		// Between two symlink swaps, or the ConfigMap key removed: keep what is in force and
		// try again at the next event or tick. Reported once per distinct failure.
		msg := []byte("\x00read error: " + err.Error())
		if bytes.Equal(msg, s.seen) {
			return nil
		}
		s.seen = msg
		err = fmt.Errorf("read webhook configuration %s: %w", s.path, err)
		s.reject(ctx, msg, err)
		return err
	}
	if bytes.Equal(data, s.seen) {
		return nil
	}
	s.seen = data
	cfg, err := config.Parse(data)
	if err == nil {
		err = compatible(s.Config(), cfg)
	}
	if err != nil {
		s.reject(ctx, data, err)
		return err
	}
	old := s.Hash()
	s.publish(cfg)
	reloadsTotal.WithLabelValues(resultLoaded).Inc()
	s.logger().Info("webhook configuration reloaded", "file", s.path, "hash", s.Hash(), "previousHash", old,
		"mode", cfg.Mode, "layout", cfg.EffectiveLayout(), "languages", cfg.LanguageNames())
	return nil
}

// compatible refuses changes that only a restart can apply.
func compatible(old, next *config.Config) error {
	if old.DriverName != next.DriverName {
		return fmt.Errorf("webhook configuration: driverName: changed from %s to %s, which needs a restart (the webhook watches the CSIDriver by name from its start): roll the webhook Deployment", old.DriverName, next.DriverName)
	}
	return nil
}

func (s *Source) reject(ctx context.Context, data []byte, err error) {
	reloadsTotal.WithLabelValues(resultRejected).Inc()
	s.logger().Error("webhook configuration not reloaded; the previous one stays in force", "file", s.path,
		"hash", s.Hash(), "err", err)
	if s.Client == nil || s.Pod.Name == "" {
		return
	}
	sum := sha256.Sum256(data)
	note := fmt.Sprintf("%s was not loaded, configuration %s stays in force: %v", s.path, s.Hash(), err)
	if len(note) > 1024 {
		note = note[:1021] + "..."
	}
	ev := &eventsv1.Event{
		// One Event per refused content and pod: a re-read of the same file does not repeat it.
		ObjectMeta:          metav1.ObjectMeta{Name: s.Pod.Name + ".apm-csi-config." + hex.EncodeToString(sum[:])[:12], Namespace: s.Pod.Namespace},
		EventTime:           metav1.NewMicroTime(time.Now()),
		ReportingController: names.WebhookBinary,
		ReportingInstance:   s.Pod.Name,
		Action:              "Reload",
		Reason:              ReasonRejected,
		Type:                corev1.EventTypeWarning,
		Note:                note,
		Regarding:           corev1.ObjectReference{APIVersion: "v1", Kind: "Pod", Namespace: s.Pod.Namespace, Name: s.Pod.Name},
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := s.Client.Create(ctx, ev); err != nil && !apierrors.IsAlreadyExists(err) {
		s.logger().Warn("cannot record the Event about the refused configuration", "err", err)
	}
}

// Start watches the file's directory until ctx ends (a manager.Runnable). Every replica
// watches its own mount, so it runs without leader election.
func (s *Source) Start(ctx context.Context) error {
	if s.path == "" {
		<-ctx.Done()
		return nil
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch the webhook configuration: %w", err)
	}
	defer w.Close()
	// The directory, not the file: kubelet replaces the ..data symlink the file resolves
	// through, which a watch on the file itself would not see.
	if err := w.Add(filepath.Dir(s.path)); err != nil {
		return fmt.Errorf("watch the webhook configuration directory %s: %w", filepath.Dir(s.path), err)
	}
	interval := s.Interval
	if interval <= 0 {
		interval = DefaultInterval
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	// A change between Load and the watch.
	_ = s.Reload(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-w.Events:
			if !ok {
				return errors.New("configuration watch closed")
			}
			_ = s.Reload(ctx)
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("configuration watch closed")
			}
			s.logger().Warn("configuration watch error; the file is still read every interval", "err", err, "interval", interval)
		case <-tick.C:
			_ = s.Reload(ctx)
		}
	}
}

// NeedLeaderElection: every replica serves requests with its own configuration.
func (s *Source) NeedLeaderElection() bool { return false }

func (s *Source) logger() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}
