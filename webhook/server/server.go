// Package server wires the pod mutator into a controller-runtime manager: the cache it reads
// from, the webhook path, the pod Event recorder and the readiness checks. The binary and the
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
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/discovery"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	ctrladmission "sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/apm-csi/apm-csi/webhook/admission"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/configreload"
	"github.com/apm-csi/apm-csi/webhook/drift"
	"github.com/apm-csi/apm-csi/webhook/podevents"
)

// readyzWait bounds how long a readiness probe waits for the informers; a synced cache
// answers at once.
const readyzWait = 2 * time.Second

// reachableAfter: without any admission request, a replica counts as reachable this long
// after it started (readiness, then the endpoints reaching every API server).
const reachableAfter = 2 * time.Minute

// Options configure the webhook.
type Options struct {
	// Config is the configuration when Source is nil (it is then never reloaded).
	Config *config.Config
	// Source, when set, is the configuration in force and its file watch (package
	// configreload); Config is then ignored.
	Source *configreload.Source
	// Namespace is where apm-csi runs; it is never mutated.
	Namespace string
	Log       *slog.Logger
	// Events configures the pod Event recorder (package podevents); its zero value records
	// Events with the defaults.
	Events podevents.Recorder
}

// CacheByObject limits what the manager caches for the webhook: every Namespace (their labels
// and annotations steer SSI; a cluster has few) and only the one CSIDriver it checks, both
// without managedFields, which the webhook never reads; and every Node, reduced to what the
// image-volume and auto modes read (name, labels, taints, status.nodeInfo), so that a large
// cluster's node images and conditions are not kept; and every Pod, metadata only, reduced to
// name, UID, creation time and the status annotation, for the pod Events.
func CacheByObject(cfg *config.Config) map[client.Object]cache.ByObject {
	return map[client.Object]cache.ByObject{
		&corev1.Namespace{}: {Transform: cache.TransformStripManagedFields()},
		&storagev1.CSIDriver{}: {
			Field:     fields.OneTermEqualSelector("metadata.name", cfg.DriverName),
			Transform: cache.TransformStripManagedFields(),
		},
		&corev1.Node{}: {Transform: slimNode},
		&corev1.Pod{}:  {Transform: slimPod},
	}
}

// slimPod keeps of a pod's metadata what the pod Events (podevents: name, UID, creation time,
// the status annotation) and the uninstrumented-pod check (drift: the labels that select a
// pod, the mirror-pod annotation) read.
func slimPod(obj any) (any, error) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return obj, nil
	}
	out, err := podevents.CacheTransform(obj)
	if err != nil {
		return out, err
	}
	slim := out.(*metav1.PartialObjectMetadata)
	for _, k := range []string{annotations.DatadogEnabled, annotations.Volumes} {
		if v, ok := m.GetLabels()[k]; ok {
			if slim.Labels == nil {
				slim.Labels = map[string]string{}
			}
			slim.Labels[k] = v
		}
	}
	if v, ok := m.GetAnnotations()[corev1.MirrorPodAnnotationKey]; ok {
		if slim.Annotations == nil {
			slim.Annotations = map[string]string{}
		}
		slim.Annotations[corev1.MirrorPodAnnotationKey] = v
	}
	return slim, nil
}

// slimNode keeps the part of a Node that decides whether it can serve image volumes to a pod.
func slimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	return &corev1.Node{
		TypeMeta: n.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{
			Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion, Labels: n.Labels,
		},
		Spec: corev1.NodeSpec{Taints: n.Spec.Taints, Unschedulable: n.Spec.Unschedulable},
		Status: corev1.NodeStatus{NodeInfo: corev1.NodeSystemInfo{
			KubeletVersion:          n.Status.NodeInfo.KubeletVersion,
			ContainerRuntimeVersion: n.Status.NodeInfo.ContainerRuntimeVersion,
			OperatingSystem:         n.Status.NodeInfo.OperatingSystem,
		}},
	}, nil
}

// Register adds the pod mutator to mgr, starts its informers with the manager (rather than
// on the first admission request, which would then wait for a full list), and adds the health
// and readiness checks.
func Register(ctx context.Context, mgr manager.Manager, opts Options) (*admission.PodMutator, error) {
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	for _, obj := range []client.Object{&corev1.Namespace{}, &storagev1.CSIDriver{}, &corev1.Node{}} {
		if _, err := mgr.GetCache().GetInformer(ctx, obj); err != nil {
			return nil, err
		}
	}
	dc, err := discovery.NewDiscoveryClientForConfig(mgr.GetConfig())
	if err != nil {
		return nil, err
	}
	sv := &ServerVersion{Discovery: dc, Log: log}
	if err := mgr.Add(sv); err != nil {
		return nil, err
	}
	src := opts.Source
	if src == nil {
		src = configreload.Static(opts.Config, opts.Namespace)
	}
	if src.Client == nil {
		src.Client = mgr.GetClient()
	}
	if src.Log == nil {
		src.Log = log
	}
	if err := mgr.Add(src); err != nil {
		return nil, err
	}
	h := &admission.PodMutator{
		Current:       src.Mutator,
		Reader:        mgr.GetClient(),
		APIReader:     mgr.GetAPIReader(),
		ServerVersion: sv.Get,
		Log:           log,
	}
	mgr.GetWebhookServer().Register(admission.Path, &ctrladmission.Webhook{Handler: h})

	rec := opts.Events
	rec.Client = mgr.GetClient()
	if rec.Log == nil {
		rec.Log = log
	}
	if err := rec.SetupWithManager(mgr); err != nil {
		return nil, err
	}

	// Owners are restarted only once the API server has sent this replica a pod (it reaches
	// the webhook through the Service), or after reachableAfter in a cluster that creates no
	// pod meanwhile.
	started := time.Now()
	dr := &drift.Reconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Decider: h, Log: log, LeaseNamespace: opts.Namespace,
		Reachable: func() bool { return h.Served() || time.Since(started) > reachableAfter }}
	if err := dr.SetupWithManager(mgr); err != nil {
		return nil, err
	}

	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return nil, err
	}
	if err := mgr.AddReadyzCheck("webhook-server", mgr.GetWebhookServer().StartedChecker()); err != nil {
		return nil, err
	}
	// Not ready before the API server's version is known: image-volume and auto modes would
	// fall back to init containers without it.
	if err := mgr.AddReadyzCheck("apiserver-version", func(*http.Request) error {
		if sv.Get() == "" {
			return errors.New("API server version not read yet")
		}
		return nil
	}); err != nil {
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
