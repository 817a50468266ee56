// Package certs is the webhook's self-managed TLS mode for clusters without cert-manager: it
// keeps a CA and a serving certificate in a Secret, writes the serving pair to the directory
// the webhook server reads (controller-runtime's certwatcher reloads it), puts the CA bundle
// into the MutatingWebhookConfiguration, and renews both before they expire.
//
// Every replica runs it. They agree through the Secret: the first to create it wins (the others
// get AlreadyExists and read it), and renewals are optimistic updates, so a replica that loses a
// race reads the winner's certificate on its next pass instead of overwriting it.
package certs

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"
)

// Keys of the Secret.
const (
	// KeyCABundle holds the current CA first, then older CAs that have not expired, so that a
	// caBundle taken from it trusts serving certificates of either during a CA rotation.
	KeyCABundle = "ca.crt"
	KeyCAKey    = "ca.key"
	KeyCert     = corev1.TLSCertKey
	KeyKey      = corev1.TLSPrivateKeyKey
)

// Default lifetimes. Both are renewed with a third of their lifetime left.
const (
	DefaultCAValidity   = 5 * 365 * 24 * time.Hour
	DefaultCertValidity = 365 * 24 * time.Hour
	// maxRecheck bounds the time between two passes even when nothing is due, so that a
	// caBundle overwritten while a watch was down is put back.
	maxRecheck = time.Hour
)

// SelfManaged keeps the webhook's serving certificate.
type SelfManaged struct {
	// Client reads and writes the Secret and the webhook configuration directly (uncached).
	Client            client.Client
	Namespace         string
	SecretName        string
	ServiceName       string
	WebhookConfigName string
	// CertDir receives tls.crt and tls.key.
	CertDir string
	// Reload, when set, is called after the files changed (certwatcher.ReadCertificate), so
	// the server uses the new certificate at once instead of at the watcher's next poll.
	Reload       func() error
	CAValidity   time.Duration
	CertValidity time.Duration
	Now          func() time.Time
	Log          *slog.Logger
}

// DNSNames are the names the API server uses to reach the webhook service.
func (s *SelfManaged) DNSNames() []string {
	svc, ns := s.ServiceName, s.Namespace
	return []string{svc + "." + ns + ".svc", svc + "." + ns + ".svc.cluster.local", svc + "." + ns, svc}
}

// Ensure makes the Secret, the files and the caBundle current, and returns when the next
// renewal is due.
func (s *SelfManaged) Ensure(ctx context.Context) (time.Time, error) {
	now := s.now()
	secret := &corev1.Secret{}
	err := s.Client.Get(ctx, types.NamespacedName{Namespace: s.Namespace, Name: s.SecretName}, secret)
	exists := err == nil
	if err != nil && !apierrors.IsNotFound(err) {
		return time.Time{}, fmt.Errorf("read secret %s/%s: %w", s.Namespace, s.SecretName, err)
	}

	data, changed, err := s.renew(secret.Data, now)
	if err != nil {
		return time.Time{}, err
	}
	if changed {
		secret.Data = data
		if exists {
			err = s.Client.Update(ctx, secret)
		} else {
			secret.ObjectMeta = metav1.ObjectMeta{Namespace: s.Namespace, Name: s.SecretName,
				Labels: map[string]string{"app.kubernetes.io/managed-by": "apm-csi-webhook"}}
			secret.Type = corev1.SecretTypeTLS
			err = s.Client.Create(ctx, secret)
		}
		if err != nil {
			// Another replica won the race: its certificate is taken on the next pass.
			return time.Time{}, fmt.Errorf("store secret %s/%s: %w", s.Namespace, s.SecretName, err)
		}
		s.logger().Info("stored webhook serving certificate", "secret", s.SecretName, "namespace", s.Namespace)
	}
	if err := s.writeFiles(data); err != nil {
		return time.Time{}, err
	}
	if err := s.patchCABundle(ctx, data[KeyCABundle]); err != nil {
		return time.Time{}, err
	}
	cert, _ := parseCertificates(data[KeyCert])
	ca, _ := parseCertificates(data[KeyCABundle])
	due := renewalTime(cert[0])
	if caDue := renewalTime(ca[0]); caDue.Before(due) {
		due = caDue
	}
	return due, nil
}

// renew returns the Secret data with a CA and serving certificate that are valid and not due
// for renewal, and whether it changed.
func (s *SelfManaged) renew(data map[string][]byte, now time.Time) (map[string][]byte, bool, error) {
	ca, err := parseKeyPair(data[KeyCABundle], data[KeyCAKey])
	var bundle []*x509.Certificate
	if err == nil {
		bundle, _ = parseCertificates(data[KeyCABundle])
	}
	changed := false
	if err != nil || !now.Before(renewalTime(ca.cert)) {
		next, err := newCA("apm-csi-webhook-ca", now, s.caValidity())
		if err != nil {
			return nil, false, err
		}
		bundle = append([]*x509.Certificate{next.cert}, bundle...)
		ca, changed = next, true
	}
	// Drop CAs that expired: nothing they signed is valid any more.
	pruned := slices.DeleteFunc(slices.Clone(bundle), func(c *x509.Certificate) bool { return !now.Before(c.NotAfter) })
	if len(pruned) != len(bundle) {
		changed = true
	}

	serving, err := parseKeyPair(data[KeyCert], data[KeyKey])
	if err != nil || !servingCertValid(serving.cert, ca.cert, s.DNSNames(), now) {
		serving, err = newServingCert(ca, s.DNSNames(), now, s.certValidity())
		if err != nil {
			return nil, false, err
		}
		changed = true
	}
	if !changed {
		return data, false, nil
	}
	return map[string][]byte{
		KeyCABundle: encodeCertificates(pruned),
		KeyCAKey:    ca.keyPEM,
		KeyCert:     serving.certPEM,
		KeyKey:      serving.keyPEM,
	}, true, nil
}

// writeFiles puts the serving pair where the webhook server reads it, each file replaced
// atomically, and only when it differs, so that an unchanged pass does not trigger a reload.
func (s *SelfManaged) writeFiles(data map[string][]byte) error {
	if err := os.MkdirAll(s.CertDir, 0o700); err != nil {
		return err
	}
	changed := false
	// Key first: a watcher that reads between the two renames sees a mismatched pair, rejects
	// it and keeps serving the old certificate until the second rename.
	for _, name := range []string{KeyKey, KeyCert} {
		p := filepath.Join(s.CertDir, name)
		if old, err := os.ReadFile(p); err == nil && bytes.Equal(old, data[name]) {
			continue
		}
		tmp, err := os.CreateTemp(s.CertDir, "."+name+"-*")
		if err != nil {
			return err
		}
		_, werr := tmp.Write(data[name])
		cerr := tmp.Close()
		if err := errors.Join(werr, cerr); err != nil {
			os.Remove(tmp.Name())
			return fmt.Errorf("write %s: %w", p, err)
		}
		if err := os.Rename(tmp.Name(), p); err != nil {
			os.Remove(tmp.Name())
			return err
		}
		changed = true
	}
	if changed && s.Reload != nil {
		return s.Reload()
	}
	return nil
}

// patchCABundle sets caBundle on every webhook of the configuration. A configuration that is
// not installed yet is not an error: its creation triggers another pass.
func (s *SelfManaged) patchCABundle(ctx context.Context, bundle []byte) error {
	cfg := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := s.Client.Get(ctx, types.NamespacedName{Name: s.WebhookConfigName}, cfg); err != nil {
		if apierrors.IsNotFound(err) {
			s.logger().Warn("MutatingWebhookConfiguration not found; caBundle will be set when it is created", "name", s.WebhookConfigName)
			return nil
		}
		return fmt.Errorf("read MutatingWebhookConfiguration %s: %w", s.WebhookConfigName, err)
	}
	changed := false
	for i := range cfg.Webhooks {
		if !bytes.Equal(cfg.Webhooks[i].ClientConfig.CABundle, bundle) {
			cfg.Webhooks[i].ClientConfig.CABundle = bundle
			changed = true
		}
	}
	if !changed {
		return nil
	}
	if err := s.Client.Update(ctx, cfg); err != nil {
		return fmt.Errorf("update caBundle of MutatingWebhookConfiguration %s: %w", s.WebhookConfigName, err)
	}
	s.logger().Info("updated caBundle", "mutatingWebhookConfiguration", s.WebhookConfigName)
	return nil
}

// Reconcile runs Ensure and asks to run again when renewal is due.
func (s *SelfManaged) Reconcile(ctx context.Context, _ reconcile.Request) (reconcile.Result, error) {
	due, err := s.Ensure(ctx)
	if err != nil {
		return reconcile.Result{}, err
	}
	return reconcile.Result{RequeueAfter: min(max(due.Sub(s.now()), time.Second), maxRecheck)}, nil
}

// SetupWithManager runs Reconcile whenever the Secret or the webhook configuration changes
// (someone re-applies the manifest without a caBundle, deletes the Secret) and when renewal is
// due. The manager's cache must be limited to those two objects (see CacheByObject).
func (s *SelfManaged) SetupWithManager(mgr manager.Manager) error {
	key := reconcile.Request{NamespacedName: types.NamespacedName{Namespace: s.Namespace, Name: s.SecretName}}
	toKey := func(context.Context, client.Object) []reconcile.Request { return []reconcile.Request{key} }
	return builder.ControllerManagedBy(mgr).
		Named("webhook-certificates").
		WatchesRawSource(source.Kind(mgr.GetCache(), client.Object(&corev1.Secret{}), handler.EnqueueRequestsFromMapFunc(toKey))).
		WatchesRawSource(source.Kind(mgr.GetCache(), client.Object(&admissionregistrationv1.MutatingWebhookConfiguration{}), handler.EnqueueRequestsFromMapFunc(toKey))).
		Complete(s)
}

// CacheByObject limits the manager's cache to the Secret and the webhook configuration this
// controller watches, so that the webhook neither caches nor needs to list other Secrets.
func (s *SelfManaged) CacheByObject() map[client.Object]cache.ByObject {
	return map[client.Object]cache.ByObject{
		&corev1.Secret{}: {
			Namespaces: map[string]cache.Config{s.Namespace: {}},
			Field:      fields.OneTermEqualSelector("metadata.name", s.SecretName),
		},
		&admissionregistrationv1.MutatingWebhookConfiguration{}: {
			Field: fields.OneTermEqualSelector("metadata.name", s.WebhookConfigName),
		},
	}
}

func (s *SelfManaged) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

func (s *SelfManaged) caValidity() time.Duration {
	if s.CAValidity > 0 {
		return s.CAValidity
	}
	return DefaultCAValidity
}

func (s *SelfManaged) certValidity() time.Duration {
	if s.CertValidity > 0 {
		return s.CertValidity
	}
	return DefaultCertValidity
}

func (s *SelfManaged) logger() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}
