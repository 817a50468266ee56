// Package server wires the pod mutator into a controller-runtime manager: the cache it reads
// from, the webhook path, the Event recorder and the readiness checks. The binary and the
// integration tests share it, so the tests run the webhook exactly as deployed.
package server

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/fields"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	ctrladmission "sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/webhook/admission"
	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/mutation"
)

// readyzWait bounds how long a readiness probe waits for the informers; a synced cache
// answers at once.
const readyzWait = 2 * time.Second

// Options configure the webhook.
type Options struct {
	Config *config.Config
	// Namespace is where apm-csi runs; it is never mutated.
	Namespace string
	Log       *slog.Logger
}

// CacheByObject limits what the manager caches for the webhook: every Namespace (their labels
// and annotations steer SSI; a cluster has few) and only the one CSIDriver it checks, both
// without managedFields, which the webhook never reads.
func CacheByObject(cfg *config.Config) map[client.Object]cache.ByObject {
	return map[client.Object]cache.ByObject{
		&corev1.Namespace{}: {Transform: cache.TransformStripManagedFields()},
		&storagev1.CSIDriver{}: {
			Field:     fields.OneTermEqualSelector("metadata.name", cfg.DriverName),
			Transform: cache.TransformStripManagedFields(),
		},
	}
}

// Register adds the pod mutator to mgr, starts its informers with the manager (rather than
// on the first admission request, which would then wait for a full list), and adds the health
// and readiness checks.
func Register(ctx context.Context, mgr manager.Manager, opts Options) (*admission.PodMutator, error) {
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	for _, obj := range []client.Object{&corev1.Namespace{}, &storagev1.CSIDriver{}} {
		if _, err := mgr.GetCache().GetInformer(ctx, obj); err != nil {
			return nil, err
		}
	}
	h := &admission.PodMutator{
		Mutator:   mutation.New(opts.Config, opts.Namespace),
		Reader:    mgr.GetClient(),
		APIReader: mgr.GetAPIReader(),
		Recorder:  mgr.GetEventRecorder(names.WebhookBinary),
		Log:       log,
	}
	mgr.GetWebhookServer().Register(admission.Path, &ctrladmission.Webhook{Handler: h})

	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return nil, err
	}
	if err := mgr.AddReadyzCheck("webhook-server", mgr.GetWebhookServer().StartedChecker()); err != nil {
		return nil, err
	}
	// Not ready before the namespaces are cached: a decision made without them would skip
	// every pod of an SSI namespace.
	if err := mgr.AddReadyzCheck("informers", func(req *http.Request) error {
		ctx, cancel := context.WithTimeout(req.Context(), readyzWait)
		defer cancel()
		if !mgr.GetCache().WaitForCacheSync(ctx) {
			return errors.New("informers not synced")
		}
		return nil
	}); err != nil {
		return nil, err
	}
	return h, nil
}
