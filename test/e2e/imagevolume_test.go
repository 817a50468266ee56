package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/libimages"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/mutation"
)

// Injection modes as the pod spec shows them (injectedMode).
const (
	modeCSI         = "csi"
	modeImageVolume = "image-volume"
	modeInit        = "init-container"
	modeNone        = "none"
)

// injectedMode says how the webhook delivered the libraries to p, from its spec: the CSI
// volume, apm-csi's image volumes, or init containers.
func injectedMode(p *corev1.Pod) string {
	if framework.LibraryVolume(p) != nil {
		return modeCSI
	}
	for _, v := range p.Spec.Volumes {
		if v.Image != nil && strings.HasPrefix(v.Name, mutation.ImageVolumePrefix) {
			return modeImageVolume
		}
	}
	if len(p.Spec.InitContainers) > 0 {
		return modeInit
	}
	return modeNone
}

// withMode sets the pod's injection-mode annotation.
func withMode(p *corev1.Pod, mode string) *corev1.Pod {
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	p.Annotations[annotations.InjectionMode] = mode
	return p
}

// checkImageVolumeInstrumented verifies what image-volume mode did to a pod in the direct
// layout: no CSI volume and no init container, the JavaScript library image as a read-only
// image volume mounted at /datadog-lib with a subPath, NODE_OPTIONS requiring dd-trace's init.
func checkImageVolumeInstrumented(t *testing.T, p *corev1.Pod, wantImage string) {
	t.Helper()
	if got := injectedMode(p); got != modeImageVolume {
		t.Fatalf("pod %s/%s was instrumented as %s, want %s (status %q)", p.Namespace, p.Name, got, modeImageVolume, p.Annotations[annotations.InjectionStatus])
	}
	if len(p.Spec.InitContainers) != 0 {
		t.Errorf("pod has init containers: %v", p.Spec.InitContainers)
	}
	var vol *corev1.Volume
	for i, v := range p.Spec.Volumes {
		if v.Image != nil && strings.HasPrefix(v.Name, mutation.ImageVolumePrefix) {
			vol = &p.Spec.Volumes[i]
		}
	}
	if vol.Image.Reference != wantImage {
		t.Errorf("image volume %s references %q, want %q", vol.Name, vol.Image.Reference, wantImage)
	}
	for _, c := range p.Spec.Containers {
		found := false
		for _, m := range c.VolumeMounts {
			if m.Name == vol.Name && m.MountPath == framework.LibraryMountPath {
				found = true
				if m.SubPath == "" || !m.ReadOnly {
					t.Errorf("container %s mounts %s at %s with subPath %q readOnly %v: want a subPath, read-only", c.Name, vol.Name, m.MountPath, m.SubPath, m.ReadOnly)
				}
			}
		}
		if !found {
			t.Errorf("container %s does not mount %s at %s: %+v", c.Name, vol.Name, framework.LibraryMountPath, c.VolumeMounts)
		}
		if n := strings.Count(framework.EnvValue(c, "NODE_OPTIONS"), nodeOptionsRequire); n != 1 {
			t.Errorf("container %s NODE_OPTIONS=%q: want %s exactly once", c.Name, framework.EnvValue(c, "NODE_OPTIONS"), nodeOptionsRequire)
		}
	}
	if s := p.Annotations[annotations.InjectionStatus]; !strings.HasPrefix(s, annotations.StatusInjected) {
		t.Errorf("%s = %q, want %s...", annotations.InjectionStatus, s, annotations.StatusInjected)
	}
}

// The real tracer from image volumes: the demo app, whose image has no tracer, asks for
// image-volume mode; the node's containerd pulls the dd-lib-js-init image from the library
// registry and mounts its library directory read-only with a subPath; dd-trace loads from it
// and its spans reach the intake.
func scenarioImageVolumeTracer(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-imagevol", ssiLabels)
	e.reg.ResetCounts()
	p := createReady(t, ctx, e, withMode(appPod(e, ns, "node-app", "e2e-imagevol-app"), modeImageVolume))
	checkImageVolumeInstrumented(t, p, e.jsRef)
	manifests := e.reg.Count(func(r libimages.Request) bool { return r.Kind == "manifest" && r.Repo == e.repo })
	t.Logf("registry: %d manifest requests for %s while the pod started (the container runtime resolves the image volume)", manifests, e.repo)
	if manifests == 0 {
		t.Errorf("nothing asked the registry for %s: the image volume did not come from the library registry", e.repo)
	}
	if n := len(framework.MountsAt(mustMounts(t), framework.CSIMountDir(e.c.KubeletDir(), p.UID, framework.LibraryVolumeName))); n != 0 {
		t.Errorf("%d CSI mounts for a pod in image-volume mode", n)
	}
	// Image volumes are read-only: the tracer cannot write next to itself.
	if out, err := framework.Exec(ctx, e.c, ns, p.Name, "", "sh", "-c", "touch "+framework.LibraryMountPath+"/written 2>&1 && echo WRITABLE || echo read-only"); err == nil && strings.Contains(out, "WRITABLE") {
		t.Errorf("%s is writable in an image-volume pod: %s", framework.LibraryMountPath, out)
	}
	checkTracesArrive(t, ctx, e, p, "e2e-imagevol-app")
}

func mustMounts(t *testing.T) []framework.Mount {
	t.Helper()
	m, err := framework.Mounts()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Auto mode falls back step by step and comes back: CSI while the CSIDriver exists; image
// volumes once it is deleted; init containers once the webhook's configuration no longer
// counts the node's runtime as serving image volumes (imageVolumes.runtimes: {}, a config
// change and a webhook restart, since a node's runtime cannot be downgraded in place); CSI
// again once both are restored. Each step starts a real pod that reads dd-trace's
// package.json from /datadog-lib. The CSIDriver and the configuration are restored even if a
// step fails, so the scenarios after this one find the installation as set up.
func scenarioAutoFallback(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-auto", ssiLabels)
	step := 0
	startIn := func(want string) *corev1.Pod {
		t.Helper()
		step++
		waitDryRunMode(t, ctx, e, ns, want)
		p := createReady(t, ctx, e, withMode(framework.BusyboxPod(ns, fmt.Sprintf("auto-%d-%s", step, want), "true"), "auto"))
		if got := injectedMode(p); got != want {
			t.Fatalf("step %d: the pod was instrumented as %s, want %s (status %q)", step, got, want, p.Annotations[annotations.InjectionStatus])
		}
		if out := execIn(t, ctx, e, p, "cat", ddTracePackageJSON); !strings.Contains(out, `"name": "dd-trace"`) && !strings.Contains(out, `"name":"dd-trace"`) {
			t.Errorf("step %d (%s): %s in the pod does not name dd-trace: %.200s", step, want, ddTracePackageJSON, out)
		}
		t.Logf("step %d: %s: %s", step, want, p.Annotations[annotations.InjectionStatus])
		return p
	}

	startIn(modeCSI)

	// Delete the CSIDriver (kept to restore it as the chart created it).
	drivers := e.cs.StorageV1().CSIDrivers()
	saved, err := drivers.Get(ctx, names.DriverName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	restoreDriver := func() error {
		d := saved.DeepCopy()
		d.ObjectMeta = metav1.ObjectMeta{Name: d.Name, Labels: d.Labels, Annotations: d.Annotations}
		if _, err := drivers.Create(context.Background(), d, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		return nil
	}
	t.Cleanup(func() {
		if err := restoreDriver(); err != nil {
			t.Errorf("restoring the CSIDriver %s: %v", names.DriverName, err)
		}
	})
	if err := drivers.Delete(ctx, names.DriverName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	iv := startIn(modeImageVolume)
	if s := iv.Annotations[annotations.InjectionStatus]; !strings.Contains(s, "is not installed") {
		t.Errorf("status %q does not say that the CSI driver is missing", s)
	}

	// Withdraw the runtime capability through the webhook's configuration.
	original := setImageVolumeRuntimes(t, ctx, e, map[string]string{})
	t.Cleanup(func() { restoreWebhookConfig(t, e, original) })
	ic := startIn(modeInit)
	if s := ic.Annotations[annotations.InjectionStatus]; !strings.Contains(s, "imageVolumes.runtimes") {
		t.Errorf("status %q does not name the configuration that rules image volumes out", s)
	}

	// Restore both: CSI again.
	if err := restoreDriver(); err != nil {
		t.Fatal(err)
	}
	restoreWebhookConfig(t, e, original)
	if err := e.d.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	startIn(modeCSI)
}

// waitDryRunMode waits until the webhook instruments a dry-run auto-mode pod in ns with mode
// want (its caches follow the CSIDriver's deletion and a restarted replica its configuration).
func waitDryRunMode(t *testing.T, ctx context.Context, e *env, ns, want string) {
	t.Helper()
	probe := withMode(framework.BusyboxPod(ns, "mode-probe", "true"), "auto")
	last := ""
	err := framework.Poll(ctx, 2*time.Minute, "the webhook to choose "+want+" for an auto-mode pod", func() (bool, error) {
		got, err := e.cs.CoreV1().Pods(ns).Create(ctx, probe, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		last = injectedMode(got) + ": " + got.Annotations[annotations.InjectionStatus]
		return injectedMode(got) == want, nil
	})
	if err != nil {
		t.Fatalf("%v (last answer: %s)", err, last)
	}
}

// webhookConfigKey is the webhook's configuration file in its ConfigMap (chart template
// webhook-configmap.yaml).
const webhookConfigKey = "config.yaml"

// setImageVolumeRuntimes writes imageVolumes.runtimes into the webhook's configuration,
// restarts the webhook and returns the configuration as it was.
func setImageVolumeRuntimes(t *testing.T, ctx context.Context, e *env, runtimes map[string]string) string {
	t.Helper()
	cms := e.cs.CoreV1().ConfigMaps(framework.Namespace)
	cm, err := cms.Get(ctx, framework.WebhookName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	original := cm.Data[webhookConfigKey]
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(original), &cfg); err != nil {
		t.Fatalf("the webhook's %s: %v", webhookConfigKey, err)
	}
	iv, _ := cfg["imageVolumes"].(map[string]any)
	if iv == nil {
		iv = map[string]any{}
	}
	iv["runtimes"] = runtimes
	cfg["imageVolumes"] = iv
	out, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cm.Data[webhookConfigKey] = string(out)
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Logf("webhook configuration: imageVolumes.runtimes = %v", runtimes)
	if err := restartWebhook(ctx, e); err != nil {
		t.Fatal(err)
	}
	return original
}

// restoreWebhookConfig puts the webhook's configuration back (if it changed) and restarts it.
func restoreWebhookConfig(t *testing.T, e *env, original string) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cms := e.cs.CoreV1().ConfigMaps(framework.Namespace)
	cm, err := cms.Get(ctx, framework.WebhookName, metav1.GetOptions{})
	if err != nil {
		t.Errorf("restoring the webhook configuration: %v", err)
		return
	}
	if cm.Data[webhookConfigKey] == original {
		return
	}
	cm.Data[webhookConfigKey] = original
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Errorf("restoring the webhook configuration: %v", err)
		return
	}
	if err := restartWebhook(ctx, e); err != nil {
		t.Errorf("restarting the webhook with its configuration restored: %v", err)
	}
}

// restartWebhook rolls the webhook Deployment (kubectl rollout restart) and waits until the
// rollout is complete, so that only replicas with the current configuration answer.
func restartWebhook(ctx context.Context, e *env) error {
	dep := "deployment/" + framework.WebhookName
	if out, err := e.c.Kubectl(ctx, "-n", framework.Namespace, "rollout", "restart", dep); err != nil {
		return fmt.Errorf("%w: %s", err, out)
	}
	if out, err := e.c.Kubectl(ctx, "-n", framework.Namespace, "rollout", "status", dep, "--timeout", "3m"); err != nil {
		return fmt.Errorf("%w: %s", err, out)
	}
	return framework.Poll(ctx, 2*time.Minute, "the webhook's old replicas to be gone", func() (bool, error) {
		pods, err := e.d.WebhookPods(ctx)
		if err != nil {
			return false, nil
		}
		for _, p := range pods {
			if p.DeletionTimestamp != nil || !framework.PodReady(&p) {
				return false, nil
			}
		}
		return len(pods) > 0, nil
	})
}
