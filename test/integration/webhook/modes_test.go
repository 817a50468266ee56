package webhook_test

import (
	"context"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/version"
	"k8s.io/client-go/discovery"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/apm-csi/apm-csi/test/testenv"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
	"github.com/apm-csi/apm-csi/webhook/mutation"
)

// imageVolumeGate returns the API server flag that turns image volumes on where they are not
// on by default (before Kubernetes 1.35), and nothing from 1.35 on, so that the flag goes away
// by itself when the test assets move to a newer Kubernetes.
func imageVolumeGate(tb testing.TB) map[string]string {
	tb.Helper()
	out, err := exec.Command(filepath.Join(testenv.KubebuilderAssets(tb), "kube-apiserver"), "--version").Output()
	if err != nil {
		tb.Fatalf("kube-apiserver --version: %v", err)
	}
	// "Kubernetes v1.34.2"
	v, err := version.ParseGeneric(strings.TrimPrefix(strings.TrimSpace(string(out)), "Kubernetes "))
	if err != nil {
		tb.Fatalf("kube-apiserver --version printed %q: %v", out, err)
	}
	if v.LessThan(version.MustParseGeneric("1.35")) {
		return map[string]string{"feature-gates": "ImageVolume=true"}
	}
	return nil
}

// node registers a node as kubelet would, with its versions in status.nodeInfo, or changes
// them, and waits until the webhook's cache has them.
func (h *harness) node(tb testing.TB, name, kubelet, runtime string) {
	tb.Helper()
	ctx := context.Background()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{corev1.LabelOSStable: "linux", corev1.LabelHostname: name}}}
	if err := h.client.Create(ctx, n); err != nil && !apierrors.IsAlreadyExists(err) {
		tb.Fatal(err)
	}
	if err := h.client.Get(ctx, client.ObjectKeyFromObject(n), n); err != nil {
		tb.Fatal(err)
	}
	n.Status.NodeInfo = corev1.NodeSystemInfo{KubeletVersion: kubelet, ContainerRuntimeVersion: runtime, OperatingSystem: "linux", Architecture: "amd64"}
	if err := h.client.Status().Update(ctx, n); err != nil {
		tb.Fatal(err)
	}
	h.eventually(tb, "node "+name+" with "+runtime+" in the webhook's cache", func() bool {
		var cached corev1.Node
		return h.mgr.GetClient().Get(ctx, client.ObjectKey{Name: name}, &cached) == nil && cached.Status.NodeInfo.ContainerRuntimeVersion == runtime
	})
}

func status(p *corev1.Pod) string { return p.Annotations[annotations.InjectionStatus] }

// assertImageVolumes checks the stored pod of image-volume mode: one image volume per
// library, the preload file from the downward API, no CSI volume and no init container.
func assertImageVolumes(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if !strings.HasPrefix(status(p), "injected: image-volume mode") {
		t.Fatalf("status = %q", status(p))
	}
	var images []string
	for _, v := range p.Spec.Volumes {
		if v.Image != nil {
			images = append(images, v.Name+"="+v.Image.Reference)
			if v.Image.PullPolicy != corev1.PullIfNotPresent {
				t.Errorf("volume %s pull policy %s", v.Name, v.Image.PullPolicy)
			}
		}
	}
	if len(images) != 7 || !slices.Contains(images, "apm-csi-lib-injector=gcr.io/datadoghq/apm-inject:0") {
		t.Errorf("image volumes stored = %v", images)
	}
	if libraryVolume(p) != nil || len(p.Spec.InitContainers) != 0 {
		t.Errorf("image-volume mode adds no CSI volume and no init container: %+v", p.Spec.InitContainers)
	}
	if p.Annotations[annotations.Preload] == "" {
		t.Error("no preload annotation for the downward-API file")
	}
	app := p.Spec.Containers[0]
	if !slices.ContainsFunc(app.VolumeMounts, func(m corev1.VolumeMount) bool {
		return m.Name == mutation.PreloadVolumeName && m.MountPath == "/etc/ld.so.preload" && m.SubPath == "ld.so.preload"
	}) {
		t.Errorf("app mounts = %+v", app.VolumeMounts)
	}
}

func assertInitContainers(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if v := libraryVolume(p); v == nil || v.EmptyDir == nil || len(p.Spec.InitContainers) != 7 {
		t.Fatalf("want emptyDir + 7 init containers, got volumes %+v, %d init containers (status %q)", p.Spec.Volumes, len(p.Spec.InitContainers), status(p))
	}
}

// TestInjectionModes runs the mode choice against a real API server: image-volume pods as the
// API server validates and stores them (Pod Security restricted included), auto following the
// CSIDriver and the nodes' runtime versions, and Datadog's injection-mode annotation.
func TestInjectionModes(t *testing.T) {
	h := startHarnessWith(t, harnessOptions{
		apiServerFlags: imageVolumeGate(t),
		// The API server under test may be older than 1.35; it has the feature gate on.
		config: func(c *config.Config) { c.ImageVolumes.MinKubernetesVersion = "1.34" },
	})
	dc, err := discovery.NewDiscoveryClientForConfig(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	info, err := dc.ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	h.setDriver(t, true)
	h.namespace(t, "auto", map[string]string{"apm-csi.io/ssi": "enabled"}, map[string]string{annotations.InjectionMode: "auto"})
	h.namespace(t, "dd", map[string]string{"apm-csi.io/ssi": "enabled"}, nil)
	created := 0
	next := func(ns string, podAnnotations map[string]string) *corev1.Pod {
		created++
		return h.create(t, pod(ns, "p"+strings.Repeat("x", created), nil, podAnnotations))
	}

	t.Run("auto follows the CSIDriver and the nodes' container runtimes", func(t *testing.T) {
		p := next("auto", nil)
		assertCSIInjected(t, p)
		if !strings.Contains(status(p), "auto mode (namespace annotation apm-csi.io/injection-mode) chose csi: CSI driver csi.apm-csi.io is installed") {
			t.Errorf("status = %q", status(p))
		}

		h.setDriver(t, false)
		p = next("auto", nil)
		assertInitContainers(t, p)
		if !strings.Contains(status(p), "chose init-container: CSI driver csi.apm-csi.io is not installed; image volumes cannot be used: no Linux node the pod can be scheduled to is known") {
			t.Errorf("status = %q", status(p))
		}

		h.node(t, "node-a", "v1.35.0", "containerd://2.2.1")
		p = next("auto", nil)
		assertImageVolumes(t, p)
		if want := "chose image-volume: CSI driver csi.apm-csi.io is not installed; image volumes: API server " + info.GitVersion + ", and every Linux node the pod can be scheduled to serves them (capable nodes run containerd 2.2.1)"; !strings.Contains(status(p), want) {
			t.Errorf("status %q lacks %q", status(p), want)
		}

		// A second node whose runtime serves image volumes without subPath.
		h.node(t, "node-b", "v1.35.0", "containerd://2.1.4")
		p = next("auto", nil)
		assertInitContainers(t, p)
		if !strings.Contains(status(p), "node node-b runs containerd 2.1.4 (image volumes with subPath need containerd 2.2 or newer)") {
			t.Errorf("status = %q", status(p))
		}
		// The Event says the same.
		h.eventually(t, "an Injected event naming the mode choice", func() bool {
			var list eventsv1.EventList
			if err := h.client.List(context.Background(), &list, client.InNamespace("auto")); err != nil {
				return false
			}
			return slices.ContainsFunc(list.Items, func(e eventsv1.Event) bool {
				return e.Regarding.Name == p.Name && e.Reason == "Injected" && strings.Contains(e.Note, "node node-b runs containerd 2.1.4")
			})
		})

		// Its runtime is upgraded to CRI-O.
		h.node(t, "node-b", "v1.35.0", "cri-o://1.33.2")
		assertImageVolumes(t, next("auto", nil))

		h.setDriver(t, true)
		assertCSIInjected(t, next("auto", nil))
	})

	t.Run("Datadog's injection-mode annotation", func(t *testing.T) {
		assertImageVolumes(t, next("dd", map[string]string{annotations.DatadogInjectionMode: "image_volume"}))
		assertInitContainers(t, next("dd", map[string]string{annotations.DatadogInjectionMode: "init_container"}))
		assertCSIInjected(t, next("dd", map[string]string{annotations.DatadogInjectionMode: "csi"}))
		assertCSIInjected(t, next("dd", map[string]string{annotations.DatadogInjectionMode: "auto"}))

		p := next("dd", map[string]string{annotations.DatadogInjectionMode: "sidecar"})
		assertUnmutatedSpec(t, p)
		if want := `error: pod annotation admission.datadoghq.com/apm-inject.injection-mode: unknown injection mode "sidecar": use csi, image-volume, init-container or auto`; !strings.HasPrefix(status(p), want) {
			t.Errorf("status %q, want %q", status(p), want)
		}
	})

	t.Run("Pod Security restricted admits image-volume pods", func(t *testing.T) {
		h.namespace(t, "restricted-iv", map[string]string{"apm-csi.io/ssi": "enabled", "pod-security.kubernetes.io/enforce": "restricted"},
			map[string]string{annotations.InjectionMode: "image-volume"})
		if err := h.client.Create(context.Background(), pod("restricted-iv", "not-restricted", nil, nil)); !apierrors.IsForbidden(err) {
			t.Fatalf("a pod without a restricted securityContext must be refused; got %v", err)
		}
		p := restricted(pod("restricted-iv", "iv", nil, nil))
		p.Spec.Containers[0].SecurityContext.ReadOnlyRootFilesystem = new(true)
		assertImageVolumes(t, h.create(t, p))
	})
}

// assertUnmutatedSpec: no library volume of any mode, no init container.
func assertUnmutatedSpec(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if len(p.Spec.Volumes) != 0 || len(p.Spec.InitContainers) != 0 {
		t.Errorf("pod %s must not be instrumented: volumes %+v", p.Name, p.Spec.Volumes)
	}
}
