// Package framework installs apm-csi on the local cluster (test/localcluster) with the real
// Helm chart and the real binaries, and offers the helpers the end-to-end scenarios and
// `make demo` share: pod builders and waits, exec, and views of the node (mount table, the
// node plugin's state directory and library cache).
package framework

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/eventually"
	"github.com/apm-csi/apm-csi/test/images"
	"github.com/apm-csi/apm-csi/test/localcluster"
)

// Names of what the chart installs with release name Release, and of the images.
const (
	Release       = "apm-csi"
	Namespace     = names.SystemNamespace
	NodeDaemonSet = Release + "-node"
	WebhookName   = Release + "-webhook"
	NodeContainer = "node"
	// SSILabel is the namespace label (value "enabled") that turns on single step
	// instrumentation (the webhook's default ssiNamespaceLabel).
	SSILabel = "apm-csi.io/ssi"
	// ImageTag is the tag `make images` gives the project's images.
	ImageTag        = "local"
	NodeImageRef    = "localhost/apm-csi/" + names.NodeBinary + ":" + ImageTag
	WebhookImageRef = "localhost/apm-csi/" + names.WebhookBinary + ":" + ImageTag

	chartDir       = "deploy/helm/apm-csi"
	componentLabel = "app.kubernetes.io/component"
	nodeComponent  = "node-plugin"
	hookComponent  = "webhook"
)

// Logf receives progress messages.
type Logf func(format string, args ...any)

// ProjectImages builds apm-csi-node and apm-csi-webhook from the checkout at repoRoot
// (static, as `make build` does) and writes their image tarballs (as `make images` does) into
// outDir. It returns the tarball paths.
func ProjectImages(ctx context.Context, repoRoot, outDir string) ([]string, error) {
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, err
	}
	var out []string
	for _, b := range []struct{ name, pkg, ref string }{
		{names.NodeBinary, "./nodeplugin/cmd/apm-csi-node", NodeImageRef},
		{names.WebhookBinary, "./webhook/cmd/apm-csi-webhook", WebhookImageRef},
	} {
		bin := filepath.Join(outDir, b.name)
		if err := images.BuildGoBinary(ctx, repoRoot, b.pkg, bin); err != nil {
			return nil, err
		}
		f, err := images.StaticBinary(bin, "/usr/local/bin/"+b.name)
		if err != nil {
			return nil, err
		}
		tb, err := images.BuildAndWrite(images.Spec{
			Ref:        b.ref,
			Files:      []images.File{f},
			Entrypoint: []string{"/usr/local/bin/" + b.name},
			Labels:     map[string]string{images.LabelVersion: "e2e"},
		}, filepath.Join(outDir, b.name+".tar"))
		if err != nil {
			return nil, err
		}
		out = append(out, tb.Path)
	}
	return out, nil
}

// HostDir is an entry of the node plugin's hostdir allowlist (chart value node.hostDirs).
type HostDir struct {
	Name     string `json:"name"`
	Path     string `json:"path"`
	ReadOnly bool   `json:"readOnly,omitempty"`
	Create   bool   `json:"create,omitempty"`
	// Namespaces whose pods may use the entry, or ["*"] (required by the chart).
	Namespaces []string `json:"namespaces"`
}

// Options of Deploy.
type Options struct {
	// RepoRoot is the apm-csi checkout (the chart and hack/helm.sh come from it).
	RepoRoot string
	// LibraryRegistry is the host:port of the registry holding the library images. The node
	// plugin runs on the host network, so a loopback address works.
	LibraryRegistry string
	// LibraryPrefix is the repository prefix of the Datadog images in it (the webhook's
	// "registry"), e.g. 127.0.0.1:5000/datadoghq.
	LibraryPrefix string
	// Languages SSI injects: name -> version (tag).
	Languages map[string]string
	// HostDirs is the node plugin's allowlist. Their paths are below the cluster's HostPathDir,
	// which Up makes a shared mount, as the chart's HostToContainer mounts of them need.
	HostDirs []HostDir
	// HostDirNamespaces are the namespaces where the admission policy admits `type: hostdir`
	// volumes (chart value admissionPolicy.hostdirNamespaces).
	HostDirNamespaces []string
	// GCGracePeriod of the library cache; empty keeps the chart's default.
	GCGracePeriod string
	// WebhookReplicas; 0 keeps the chart's default.
	WebhookReplicas int
	Logf            Logf
}

// Deployment is apm-csi installed on a cluster.
type Deployment struct {
	Cluster *localcluster.Cluster
	Client  kubernetes.Interface
	Opts    Options
	// StateDir is the node plugin's --state-dir on the host (library cache, records, overlays).
	StateDir string
	helm     string
}

// Deploy installs apm-csi with the Helm chart of the checkout: the images (already imported)
// localhost/apm-csi/apm-csi-{node,webhook}:local, the cluster's kubelet dir, the webhook's
// self-managed TLS, the direct layout (no injector image exists here) with the library registry
// given. It returns once the node plugin is registered with kubelet and the API server calls
// the webhook.
func Deploy(ctx context.Context, c *localcluster.Cluster, o Options) (*Deployment, error) {
	cs, err := c.Clientset()
	if err != nil {
		return nil, err
	}
	d := &Deployment{Cluster: c, Client: cs, Opts: o, StateDir: c.HostPathDir("apm-csi")}
	if d.helm, err = helmBinary(ctx, o.RepoRoot); err != nil {
		return nil, err
	}
	values, err := d.values()
	if err != nil {
		return nil, err
	}
	valuesFile := filepath.Join(c.Root(), "run", "apm-csi-values.yaml")
	if err := os.WriteFile(valuesFile, values, 0o600); err != nil {
		return nil, err
	}
	d.logf("helm install %s %s (values %s)", Release, chartDir, valuesFile)
	if out, err := d.Helm(ctx, "upgrade", "--install", Release, filepath.Join(o.RepoRoot, chartDir),
		"--namespace", Namespace, "--create-namespace", "--values", valuesFile, "--wait", "--timeout", "5m"); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, out)
	}
	if err := d.WaitReady(ctx); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *Deployment) logf(format string, args ...any) {
	if d.Opts.Logf != nil {
		d.Opts.Logf(format, args...)
	}
}

// values renders the chart values for the local cluster.
func (d *Deployment) values() ([]byte, error) {
	o := d.Opts
	var langs []map[string]string
	for name, version := range o.Languages {
		langs = append(langs, map[string]string{"name": name, "version": version})
	}
	node := map[string]any{"stateDir": d.StateDir}
	if len(o.HostDirs) > 0 {
		node["hostDirs"] = o.HostDirs
	}
	if o.GCGracePeriod != "" {
		node["libraryCache"] = map[string]any{"gcGracePeriod": o.GCGracePeriod}
	}
	webhook := map[string]any{"tls": map[string]any{"mode": "self-managed"}}
	if o.WebhookReplicas > 0 {
		webhook["replicas"] = o.WebhookReplicas
	}
	v := map[string]any{
		"images": map[string]any{
			"node":    map[string]any{"repository": strings.TrimSuffix(NodeImageRef, ":"+ImageTag), "tag": ImageTag, "pullPolicy": "IfNotPresent"},
			"webhook": map[string]any{"repository": strings.TrimSuffix(WebhookImageRef, ":"+ImageTag), "tag": ImageTag, "pullPolicy": "IfNotPresent"},
		},
		"kubeletDir": d.Cluster.KubeletDir(),
		"libraries": map[string]any{
			// The chart adds the registry to the node plugin's allowed repositories, so the
			// plugin pulls the prefix's images and nothing else; the loopback registry has no
			// TLS, so it must be an insecure registry (plain HTTP is refused otherwise).
			"registry":           o.LibraryPrefix,
			"insecureRegistries": []string{o.LibraryRegistry},
			"languages":          langs,
			// No apm-inject image exists here: libraries at /datadog-lib, NODE_OPTIONS etc.
			"layout": "direct",
		},
		"node":            node,
		"webhook":         webhook,
		"admissionPolicy": map[string]any{"enabled": true, "hostdirNamespaces": o.HostDirNamespaces},
	}
	return yaml.Marshal(v)
}

// Helm runs the chart's helm against the cluster.
func (d *Deployment) Helm(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, d.helm, append([]string{"--kubeconfig", d.Cluster.Kubeconfig()}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("helm %s: %w", strings.Join(args, " "), err)
	}
	return out.String(), err
}

// helmBinary is $HELM, or the helm hack/helm.sh builds through the Go module proxy (cached).
func helmBinary(ctx context.Context, repoRoot string) (string, error) {
	if h := os.Getenv("HELM"); h != "" {
		return h, nil
	}
	return localcluster.HackScript(ctx, repoRoot, "helm.sh")
}

// WaitReady waits until the node plugin pod is ready and registered with kubelet (the CSINode
// object lists the driver) and until the API server calls the webhook: a server-side dry run
// of a pod in a namespace labelled for SSI comes back with the library volume.
func (d *Deployment) WaitReady(ctx context.Context) error {
	if err := Poll(ctx, 3*time.Minute, "the node plugin to be ready and registered with kubelet", func() (bool, error) {
		pod, err := d.NodePluginPod(ctx)
		if err != nil || !PodReady(pod) {
			return false, nil
		}
		return DriverRegistered(ctx, d.Client, d.Cluster.NodeName(), names.DriverName), nil
	}); err != nil {
		return err
	}
	return d.WaitWebhookServing(ctx)
}

// DriverRegistered reports whether kubelet lists the CSI driver on the node (in its CSINode
// object); an error reading that object counts as not yet.
func DriverRegistered(ctx context.Context, cs kubernetes.Interface, node, driver string) bool {
	n, err := cs.StorageV1().CSINodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return false
	}
	for _, d := range n.Spec.Drivers {
		if d.Name == driver {
			return true
		}
	}
	return false
}

// probeNamespace is where WaitWebhookServing dry-runs pods.
const probeNamespace = "apm-csi-e2e-probe"

// WaitWebhookServing waits until a dry-run pod in an SSI namespace is mutated.
func (d *Deployment) WaitWebhookServing(ctx context.Context) error {
	if err := EnsureNamespace(ctx, d.Cluster, probeNamespace, map[string]string{SSILabel: "enabled"}); err != nil {
		return err
	}
	probe := BusyboxPod(probeNamespace, "webhook-probe", "true")
	return Poll(ctx, 3*time.Minute, "the API server to call the webhook (a dry-run pod to get the CSI volume)", func() (bool, error) {
		got, err := d.Client.CoreV1().Pods(probeNamespace).Create(ctx, probe, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err == nil && LibraryVolume(got) != nil, nil
	})
}

// NodePluginPod returns the node plugin's current pod (the newest, if a replacement is starting).
func (d *Deployment) NodePluginPod(ctx context.Context) (*corev1.Pod, error) {
	return d.componentPod(ctx, nodeComponent)
}

// WebhookPods lists the webhook's pods.
func (d *Deployment) WebhookPods(ctx context.Context) ([]corev1.Pod, error) {
	l, err := d.Client.CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{LabelSelector: componentLabel + "=" + hookComponent})
	if err != nil {
		return nil, err
	}
	return l.Items, nil
}

func (d *Deployment) componentPod(ctx context.Context, component string) (*corev1.Pod, error) {
	l, err := d.Client.CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{LabelSelector: componentLabel + "=" + component})
	if err != nil {
		return nil, err
	}
	var newest *corev1.Pod
	for i := range l.Items {
		p := &l.Items[i]
		if p.DeletionTimestamp != nil {
			continue
		}
		if newest == nil || p.CreationTimestamp.After(newest.CreationTimestamp.Time) {
			newest = p
		}
	}
	if newest == nil {
		return nil, fmt.Errorf("no %s pod in %s", component, Namespace)
	}
	return newest, nil
}

// NodePluginDaemonSet returns the node plugin's DaemonSet.
func (d *Deployment) NodePluginDaemonSet(ctx context.Context) (*appsv1.DaemonSet, error) {
	return d.Client.AppsV1().DaemonSets(Namespace).Get(ctx, NodeDaemonSet, metav1.GetOptions{})
}

// ScaleWebhook sets the webhook Deployment's replicas and waits until that many pods are
// ready (0: until none is left).
func (d *Deployment) ScaleWebhook(ctx context.Context, replicas int32) error {
	s, err := d.Client.AppsV1().Deployments(Namespace).GetScale(ctx, WebhookName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	s.Spec.Replicas = replicas
	if _, err := d.Client.AppsV1().Deployments(Namespace).UpdateScale(ctx, WebhookName, s, metav1.UpdateOptions{}); err != nil {
		return err
	}
	return Poll(ctx, 3*time.Minute, fmt.Sprintf("%d ready webhook pods", replicas), func() (bool, error) {
		pods, err := d.WebhookPods(ctx)
		if err != nil {
			return false, nil
		}
		ready := 0
		for i := range pods {
			if PodReady(&pods[i]) {
				ready++
			}
		}
		if replicas == 0 {
			return len(pods) == 0, nil
		}
		return ready == int(replicas), nil
	})
}

// Logs returns the last lines of a pod's container log (previous instance if previous).
func (d *Deployment) Logs(ctx context.Context, ns, pod, container string, tail int64, previous bool) string {
	b, err := d.Client.CoreV1().Pods(ns).GetLogs(pod, &corev1.PodLogOptions{Container: container, TailLines: &tail, Previous: previous}).DoRaw(ctx)
	if err != nil {
		return fmt.Sprintf("(logs of %s/%s: %v)", ns, pod, err)
	}
	return string(b)
}

// EnsureNamespace creates a namespace with labels (or adds them to an existing one) and waits
// for its default ServiceAccount.
func EnsureNamespace(ctx context.Context, c *localcluster.Cluster, name string, labels map[string]string) error {
	cs, err := c.Clientset()
	if err != nil {
		return err
	}
	ns, err := cs.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
	case err != nil:
		return err
	default:
		if ns.Labels == nil {
			ns.Labels = map[string]string{}
		}
		for k, v := range labels {
			ns.Labels[k] = v
		}
		if _, err := cs.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	return c.CreateNamespace(ctx, name)
}

// DeleteNamespace deletes a namespace and waits until it is gone (its pods stopped and their
// volumes unpublished).
func DeleteNamespace(ctx context.Context, cs kubernetes.Interface, name string) error {
	err := cs.CoreV1().Namespaces().Delete(ctx, name, metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	return Poll(ctx, 3*time.Minute, "namespace "+name+" to be deleted", func() (bool, error) {
		_, err := cs.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
}

// Poll calls cond every 250 ms until it reports true, it returns an error, timeout passes or
// ctx ends.
func Poll(ctx context.Context, timeout time.Duration, what string, cond func() (bool, error)) error {
	return eventually.Wait(ctx, timeout, 250*time.Millisecond, what, func(context.Context) error {
		ok, err := cond()
		switch {
		case err != nil:
			return eventually.Stop(err)
		case !ok:
			return errors.New("the condition still does not hold")
		}
		return nil
	})
}
