package framework

import (
	"context"
	"fmt"
	"path/filepath"
	"time"
)

// Webhook TLS modes of the chart (value webhook.tls.mode).
const (
	TLSModeCertManager  = "cert-manager"
	TLSModeSelfManaged  = "self-managed"
	WebhookTLSSecret    = WebhookName + "-tls"
	WebhookPort         = 9443
	webhookTLSModeValue = "webhook.tls.mode"
)

// HelmPath is the helm binary the deployment was installed with.
func (d *Deployment) HelmPath() string { return d.helm }

// SetWebhookTLSMode upgrades the release to the given webhook TLS mode, keeping every other
// value, and waits until the API server calls the webhook again.
func (d *Deployment) SetWebhookTLSMode(ctx context.Context, mode string) error {
	d.logf("helm upgrade %s --set %s=%s", Release, webhookTLSModeValue, mode)
	if out, err := d.Helm(ctx, "upgrade", Release, filepath.Join(d.Opts.RepoRoot, chartDir), "--namespace", Namespace,
		"--reuse-values", "--set", webhookTLSModeValue+"="+mode, "--wait", "--timeout", "5m"); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	waitCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	return d.WaitWebhookServing(waitCtx)
}
