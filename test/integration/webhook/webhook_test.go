package webhook_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/mutation"
)

func pod(ns, name string, labels, podAnnotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels, Annotations: podAnnotations},
		Spec: corev1.PodSpec{Containers: []corev1.Container{
			{Name: "app", Image: "registry.example.com/web:1", Env: []corev1.EnvVar{{Name: "LD_PRELOAD", Value: "/lib/jemalloc.so"}}},
			{Name: "istio-proxy", Image: "docker.io/istio/proxyv2:1.22.0"},
		}},
	}
}

// create creates the pod through the API server and returns what it stored.
func (h *harness) create(t *testing.T, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	if err := h.client.Create(context.Background(), p); err != nil {
		t.Fatalf("create pod %s/%s: %v", p.Namespace, p.Name, err)
	}
	stored := &corev1.Pod{}
	if err := h.client.Get(context.Background(), client.ObjectKeyFromObject(p), stored); err != nil {
		t.Fatal(err)
	}
	return stored
}

func libraryVolume(p *corev1.Pod) *corev1.Volume {
	i := slices.IndexFunc(p.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == mutation.VolumeName })
	if i < 0 {
		return nil
	}
	return &p.Spec.Volumes[i]
}

func assertUnmutated(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if libraryVolume(p) != nil || len(p.Spec.InitContainers) != 0 {
		t.Errorf("pod %s must not be mutated: volumes %+v", p.Name, p.Spec.Volumes)
	}
	if s, ok := p.Annotations[annotations.InjectionStatus]; ok {
		t.Errorf("pod %s must not carry a status: %q", p.Name, s)
	}
}

func assertCSIInjected(t *testing.T, p *corev1.Pod) *volumeattrs.Spec {
	t.Helper()
	v := libraryVolume(p)
	if v == nil || v.CSI == nil || v.CSI.Driver != driverName {
		t.Fatalf("stored pod %s has no CSI library volume: %+v (status %q)", p.Name, p.Spec.Volumes, p.Annotations[annotations.InjectionStatus])
	}
	spec, err := volumeattrs.Parse(v.CSI.VolumeAttributes)
	if err != nil {
		t.Fatalf("the node plugin would reject the stored volume: %v", err)
	}
	if !strings.HasPrefix(p.Annotations[annotations.InjectionStatus], "injected: csi mode") {
		t.Errorf("status = %q", p.Annotations[annotations.InjectionStatus])
	}
	if len(p.Spec.InitContainers) != 0 {
		t.Error("CSI mode adds no init container")
	}
	app := p.Spec.Containers[0]
	if i := slices.IndexFunc(app.Env, func(e corev1.EnvVar) bool { return e.Name == "LD_PRELOAD" }); i < 0 ||
		!strings.HasPrefix(app.Env[i].Value, "/lib/jemalloc.so:") {
		t.Errorf("app env = %+v", app.Env)
	}
	if len(p.Spec.Containers[1].VolumeMounts) != 0 {
		t.Error("istio-proxy must not be touched")
	}
	return spec
}

func TestWebhook(t *testing.T) {
	h := startHarness(t)
	h.setDriver(t, true)
	h.namespace(t, "ssi", map[string]string{"apm-csi.io/ssi": "enabled"}, nil)
	h.namespace(t, "plain", nil, nil)
	h.namespace(t, "team-a", nil, nil)
	h.namespace(t, "hostdir-allowed", map[string]string{"apm-csi.io/hostdir": "allowed"}, nil)
	h.namespace(t, "ssi-java", map[string]string{"apm-csi.io/ssi": "enabled"}, map[string]string{annotations.Libraries: "java:v1.45.0"})

	t.Run("namespace label instruments every pod", func(t *testing.T) {
		before := admissions(t)
		p := h.create(t, pod("ssi", "web", nil, nil))
		if calls := admissions(t) - before; calls != 1 {
			t.Errorf("the webhook was called %v times for one pod; want once (disjoint selectors, no reinvocation)", calls)
		}
		spec := assertCSIInjected(t, p)
		if len(spec.Libraries) != 7 || spec.Preload == "" {
			t.Errorf("default configuration: injector and 6 languages, got %+v", spec)
		}
		// The Event is written asynchronously; the pod had its name, so it is about the pod.
		h.eventually(t, "an Injected event for pod ssi/web", func() bool {
			var list eventsv1.EventList
			if err := h.client.List(context.Background(), &list, client.InNamespace("ssi")); err != nil {
				return false
			}
			return slices.ContainsFunc(list.Items, func(e eventsv1.Event) bool {
				return e.Regarding.Kind == "Pod" && e.Regarding.Name == "web" && e.Reason == "Injected"
			})
		})
	})

	t.Run("namespace default libraries", func(t *testing.T) {
		spec := assertCSIInjected(t, h.create(t, pod("ssi-java", "web", nil, nil)))
		if len(spec.Libraries) != 2 || spec.Libraries[1].Image != "gcr.io/datadoghq/dd-lib-java-init:v1.45.0" {
			t.Errorf("libraries = %+v", spec.Libraries)
		}
	})

	t.Run("opt-out label inside an SSI namespace", func(t *testing.T) {
		before := admissions(t)
		assertUnmutated(t, h.create(t, pod("ssi", "opted-out", map[string]string{annotations.DatadogEnabled: "false"}, nil)))
		if admissions(t) != before {
			t.Error("the objectSelector must keep opted-out pods away from the webhook")
		}
	})

	t.Run("labelled pod in a plain namespace", func(t *testing.T) {
		assertCSIInjected(t, h.create(t, pod("plain", "labelled", map[string]string{annotations.DatadogEnabled: "true"}, nil)))
	})

	t.Run("unlabelled pod in a plain namespace never reaches the webhook", func(t *testing.T) {
		before := admissions(t)
		assertUnmutated(t, h.create(t, pod("plain", "unlabelled", nil, nil)))
		if admissions(t) != before {
			t.Error("the selectors must keep this pod away from the webhook")
		}
	})

	t.Run("kube-system is excluded", func(t *testing.T) {
		before := admissions(t)
		assertUnmutated(t, h.create(t, pod("kube-system", "labelled", map[string]string{annotations.DatadogEnabled: "true"}, nil)))
		if admissions(t) != before {
			t.Error("the namespaceSelector must exclude kube-system")
		}
	})

	t.Run("manual volumes", func(t *testing.T) {
		p := h.create(t, pod("plain", "manual", map[string]string{annotations.Volumes: "enabled"}, map[string]string{
			annotations.VolumePrefix + "tracer": "libraries=python:v3.1.0; mountPath=/tracer; containers=app",
			annotations.VolumePrefix + "socket": "hostdir=datadog-apm; mountPath=/var/run/datadog; containers=app; readOnly=true",
		}))
		var names []string
		for _, v := range p.Spec.Volumes {
			if v.CSI != nil {
				names = append(names, v.Name)
			}
		}
		if !slices.Equal(names, []string{"socket", "tracer"}) || len(p.Spec.Containers[0].VolumeMounts) != 2 {
			t.Errorf("CSI volumes %v, app mounts %+v", names, p.Spec.Containers[0].VolumeMounts)
		}
	})

	t.Run("invalid manual annotation is denied with its message", func(t *testing.T) {
		err := h.client.Create(context.Background(), pod("plain", "bad-manual", map[string]string{annotations.Volumes: "enabled"},
			map[string]string{annotations.VolumePrefix + "tracer": "libraries=jav; mountPath=/tracer"}))
		if err == nil {
			t.Fatal("the pod was created")
		}
		msg := err.Error()
		for _, frag := range []string{
			`admission webhook "volume-pods.pods.apm-csi.io" denied the request`,
			"annotation apm-csi.io/volume.tracer", `bad value "jav"`, `unknown library "jav"`,
			"fix: name a language (java, js, python, dotnet, ruby, php)",
		} {
			if !strings.Contains(msg, frag) {
				t.Errorf("the client's error lacks %q:\n%s", frag, msg)
			}
		}
		if !apierrors.IsForbidden(err) {
			t.Errorf("want 403 Forbidden, got %v", err)
		}
	})

	t.Run("manual hostdir annotation for a namespace the entry does not allow is denied", func(t *testing.T) {
		for _, c := range []struct{ entry, ns string }{{"team-a", "team-a"}, {"labelled", "hostdir-allowed"}} {
			p := h.create(t, pod(c.ns, "allowed-"+c.entry, map[string]string{annotations.Volumes: "enabled"},
				map[string]string{annotations.VolumePrefix + "data": "hostdir=" + c.entry + "; mountPath=/data"}))
			if !slices.ContainsFunc(p.Spec.Volumes, func(v corev1.Volume) bool { return v.CSI != nil && v.CSI.VolumeAttributes["name"] == c.entry }) {
				t.Errorf("pod of namespace %s did not get entry %s: %+v", c.ns, c.entry, p.Spec.Volumes)
			}
		}
		for _, c := range []struct {
			entry string
			frags []string
		}{
			{"team-a", []string{"hostdir entry team-a may not be used by pods of namespace plain running as service account default",
				"namespace plain is not allowed; the entry allows namespaces team-a", "fix: use an entry allowed for this namespace"}},
			{"labelled", []string{`namespace plain does not carry the labels the entry requires (namespaceSelector "apm-csi.io/hostdir=allowed")`,
				"ask the cluster administrator to label the namespace"}},
		} {
			err := h.client.Create(context.Background(), pod("plain", "thief-"+c.entry, map[string]string{annotations.Volumes: "enabled"},
				map[string]string{annotations.VolumePrefix + "data": "hostdir=" + c.entry + "; mountPath=/data"}))
			if err == nil {
				t.Fatalf("a pod of namespace plain was created with hostdir entry %s", c.entry)
			}
			if !apierrors.IsForbidden(err) {
				t.Errorf("want 403 Forbidden, got %v", err)
			}
			for _, frag := range append([]string{`admission webhook "volume-pods.pods.apm-csi.io" denied the request`, "annotation apm-csi.io/volume.data"}, c.frags...) {
				if !strings.Contains(err.Error(), frag) {
					t.Errorf("the client's error lacks %q:\n%s", frag, err)
				}
			}
		}
	})

	t.Run("Datadog init-container injection is rewritten", func(t *testing.T) {
		p := pod("ssi", "datadog", nil, nil)
		p.Spec.InitContainers = []corev1.Container{{
			Name: "datadog-lib-java-init", Image: "gcr.io/datadoghq/dd-lib-java-init:v1.45.0", Command: []string{"sh", "copy-lib.sh", "/datadog-lib"},
			VolumeMounts: []corev1.VolumeMount{{Name: "datadog-auto-instrumentation", MountPath: "/datadog-lib"}},
		}}
		p.Spec.Volumes = []corev1.Volume{{Name: "datadog-auto-instrumentation", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
		p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "datadog-auto-instrumentation", MountPath: "/datadog-lib"}}
		p.Spec.Containers[0].Env = append(p.Spec.Containers[0].Env, corev1.EnvVar{Name: "JAVA_TOOL_OPTIONS", Value: "-javaagent:/datadog-lib/dd-java-agent.jar"})
		stored := h.create(t, p)
		if len(stored.Spec.InitContainers) != 0 || len(stored.Spec.Volumes) != 1 || libraryVolume(stored) == nil {
			t.Fatalf("init containers %d, volumes %+v", len(stored.Spec.InitContainers), stored.Spec.Volumes)
		}
		if vm := stored.Spec.Containers[0].VolumeMounts; len(vm) != 1 || vm[0].Name != mutation.VolumeName || vm[0].MountPath != "/datadog-lib" {
			t.Errorf("mounts = %+v", vm)
		}
	})

	t.Run("driver absent: init-container fallback", func(t *testing.T) {
		h.setDriver(t, false)
		defer h.setDriver(t, true)
		p := h.create(t, pod("ssi", "fallback", nil, nil))
		v := libraryVolume(p)
		if v == nil || v.EmptyDir == nil || len(p.Spec.InitContainers) != 7 {
			t.Fatalf("want emptyDir + 7 init containers, got volumes %+v and %d init containers", p.Spec.Volumes, len(p.Spec.InitContainers))
		}
		if !strings.Contains(p.Annotations[annotations.InjectionStatus], "fell back to init-container mode") {
			t.Errorf("status = %q", p.Annotations[annotations.InjectionStatus])
		}
	})

	t.Run("Pod Security restricted admits the mutated pods", func(t *testing.T) {
		h.namespace(t, "restricted", map[string]string{"apm-csi.io/ssi": "enabled", "pod-security.kubernetes.io/enforce": "restricted"}, nil)
		// Control: the namespace really enforces restricted.
		if err := h.client.Create(context.Background(), pod("restricted", "not-restricted", nil, nil)); !apierrors.IsForbidden(err) {
			t.Fatalf("a pod without a restricted securityContext must be refused; got %v", err)
		}
		assertCSIInjected(t, h.create(t, restricted(pod("restricted", "csi", nil, nil))))
		p := h.create(t, restricted(pod("restricted", "init", nil, map[string]string{annotations.InjectionMode: "init-container"})))
		if len(p.Spec.InitContainers) != 7 {
			t.Errorf("init-container mode: %d init containers", len(p.Spec.InitContainers))
		}
	})

	// Last: stops the webhook.
	t.Run("webhook down: pods are still created", func(t *testing.T) {
		h.shutdown(t)
		start := time.Now()
		assertUnmutated(t, h.create(t, pod("ssi", "while-down", nil, nil)))
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("create took %v with the webhook down", d)
		}
	})
}

// restricted gives a pod the securityContext Pod Security "restricted" requires.
func restricted(p *corev1.Pod) *corev1.Pod {
	p.Spec.SecurityContext = &corev1.PodSecurityContext{
		RunAsNonRoot:   new(true),
		SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
	for i := range p.Spec.Containers {
		p.Spec.Containers[i].SecurityContext = &corev1.SecurityContext{
			AllowPrivilegeEscalation: new(false),
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		}
	}
	return p
}
