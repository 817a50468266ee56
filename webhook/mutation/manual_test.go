package mutation

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/tenancy"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
)

func TestManualVolumes(t *testing.T) {
	pod := withAnnotations(withLabels(webPod(), annotations.Volumes, "enabled"),
		annotations.VolumePrefix+"tracer", "libraries=java:v1.45.0, registry.example.com/otel/autoinstrumentation-python:0.50b0; source=/autoinstrumentation; mountPath=/tracers",
		annotations.VolumePrefix+"apm-socket", "hostdir=datadog-apm; mountPath=/var/run/datadog; containers=app,log-shipper; readOnly=true",
	)
	res := newTestMutator(t).Mutate(Input{Pod: pod, Namespace: plainNamespace(), DriverInstalled: true, Now: testNow})
	if res.Outcome != OutcomeInjected || res.Mode != config.ModeCSI {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	if got := res.Pod.Annotations[annotations.InjectionStatus]; got != "injected: manual volumes apm-socket, tracer" {
		t.Errorf("status = %q", got)
	}
	tracer := csiSpec(t, res.Pod, "tracer")
	want := []volumeattrs.Library{
		{Image: "gcr.io/datadoghq/dd-lib-java-init:v1.45.0", Source: libref.LibrarySource},
		{Image: "registry.example.com/otel/autoinstrumentation-python:0.50b0", Source: "/autoinstrumentation"},
	}
	if tracer.Kind != volumeattrs.KindLibrary || !reflect.DeepEqual(tracer.Libraries, want) {
		t.Errorf("tracer = %+v", tracer)
	}
	sock := csiSpec(t, res.Pod, "apm-socket")
	if sock.Kind != volumeattrs.KindHostDir || sock.HostDir != "datadog-apm" || !sock.ReadOnly {
		t.Errorf("apm-socket = %+v", sock)
	}
	for name, want := range map[string][]string{
		"app":         {"/var/run/datadog", "/tracers"}, // annotation key order
		"worker":      {"/tracers"},
		"log-shipper": {"/var/run/datadog"},
		"istio-proxy": nil,
	} {
		var got []string
		for _, vm := range container(t, res.Pod, name).VolumeMounts {
			if vm.Name == "tracer" || vm.Name == "apm-socket" {
				got = append(got, vm.MountPath)
			}
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s mounts %v, want %v", name, got, want)
		}
	}
	if strings.Contains(res.Pod.Annotations[annotations.InjectedLibraries], "apm-socket") ||
		!strings.Contains(res.Pod.Annotations[annotations.InjectedLibraries], "tracer=gcr.io/datadoghq/dd-lib-java-init:v1.45.0") {
		t.Errorf("libraries = %q", res.Pod.Annotations[annotations.InjectedLibraries])
	}
	if v := volume(res.Pod, VolumeName); v != nil {
		t.Error("a pod that is not an SSI target gets only its manual volumes")
	}
}

func TestManualVolumeMountedByThePod(t *testing.T) {
	pod := withAnnotations(webPod(), annotations.VolumePrefix+"sock", "hostdir=dsd-socket")
	pod.Spec.Containers[0].VolumeMounts = append(pod.Spec.Containers[0].VolumeMounts, corev1.VolumeMount{Name: "sock", MountPath: "/sock", SubPath: "dsd.socket"})
	res := newTestMutator(t).Mutate(input(pod, plainNamespace()))
	if res.Outcome != OutcomeInjected || csiSpec(t, res.Pod, "sock").HostDir != "dsd-socket" {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
}

func TestManualVolumesWithSSI(t *testing.T) {
	pod := withAnnotations(webPod(), annotations.VolumePrefix+"sock", "hostdir=apm; mountPath=/var/run/datadog")
	res := newTestMutator(t).Mutate(input(pod, ssiNamespace()))
	if res.Outcome != OutcomeInjected || !strings.HasSuffix(res.Reason, "; manual volumes sock") || volume(res.Pod, VolumeName) == nil || volume(res.Pod, "sock") == nil {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
}

func TestManualVolumeWithoutDriverWarns(t *testing.T) {
	in := input(withAnnotations(webPod(), annotations.VolumePrefix+"sock", "hostdir=apm; mountPath=/s"), plainNamespace())
	in.DriverInstalled = false
	res := newTestMutator(t).Mutate(in)
	if res.Outcome != OutcomeInjected || len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "not installed") {
		t.Fatalf("got %s %q", res.Outcome, res.Warnings)
	}
}

func TestManualVolumeDenials(t *testing.T) {
	tests := []struct {
		name  string
		key   string
		value string
		shape func(*corev1.Pod)
		want  []string // fragments of the denial
	}{
		{name: "Windows pod by nodeSelector", key: "tracer", value: "libraries=java; mountPath=/dd",
			shape: func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{corev1.LabelOSStable: "windows"} },
			want:  []string{"annotation apm-csi.io/volume.tracer", "the pod runs only on Windows nodes (nodeSelector kubernetes.io/os: windows), where the apm-csi node plugin does not run", "fix: remove the annotation from Windows pods"}},
		{name: "Windows pod by spec.os", key: "sock", value: "hostdir=apm; mountPath=/x",
			shape: func(p *corev1.Pod) { p.Spec.OS = &corev1.PodOS{Name: corev1.Windows} },
			want:  []string{"the pod runs only on Windows nodes (spec.os.name: windows)"}},
		{name: "syntax", key: "tracer", value: "libraries=jav; mountPath=/x",
			want: []string{"annotation apm-csi.io/volume.tracer", `bad value "jav"`, `unknown library "jav"`, "fix:"}},
		{name: "name clash", key: "logs", value: "hostdir=apm; mountPath=/x",
			want: []string{"annotation apm-csi.io/volume.logs", "the pod already has a volume named logs", "fix: rename the volume"}},
		{name: "reserved name", key: VolumeName, value: "hostdir=apm; mountPath=/x", want: []string{"is reserved"}},
		{name: "unknown container", key: "s", value: "hostdir=apm; mountPath=/x; containers=db",
			want: []string{"the pod has no container named db (it has migrate, log-shipper, app, worker, istio-proxy)"}},
		{name: "excluded container", key: "s", value: "hostdir=apm; mountPath=/x; containers=istio-proxy", want: []string{"excluded"}},
		{name: "mount path in use", key: "s", value: "hostdir=apm; mountPath=/var/log/app",
			want: []string{"container app already mounts volume logs at /var/log/app", "fix: choose another mountPath"}},
		{name: "mounted nowhere", key: "s", value: "hostdir=apm", want: []string{"volume s is mounted nowhere", "fix: add mountPath"}},
		{name: "image outside the allowed repositories", key: "tracer", value: "libraries=evil.example.com/team-a/private:1; mountPath=/x",
			want: []string{"annotation apm-csi.io/volume.tracer", "library image evil.example.com/team-a/private:1 is not in the repositories the node plugins serve", "fix:", "evil.example.com/team-a", "libraries.allowedRepositories", "--allowed-repository"}},
		{name: "registry prefix on a component boundary", key: "tracer", value: "libraries=gcr.io/datadoghq-evil/dd-lib-java-init:v1; mountPath=/x",
			want: []string{"gcr.io/datadoghq-evil/dd-lib-java-init:v1 is not in the repositories"}},
		{name: "invalid image for the node plugin", key: "s", value: "libraries=registry.example.com/x:1; source=/a,b; mountPath=/x",
			want: []string{"source must be a clean absolute directory"}},
		{name: "misspelt key", key: "", value: "hostdir=apm; mountPath=/x", want: []string{"annotation apm-csi.io/volumes.s", "manual volumes are declared as apm-csi.io/volume.<name>"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := annotations.VolumePrefix + tt.key
			if tt.key == "" {
				key = "apm-csi.io/volumes.s"
			}
			pod := withAnnotations(webPod(), key, tt.value)
			if tt.shape != nil {
				tt.shape(pod)
			}
			res := newTestMutator(t).Mutate(input(pod, ssiNamespace()))
			if res.Outcome != OutcomeDenied || res.Pod != nil {
				t.Fatalf("got %s: %s", res.Outcome, res.Reason)
			}
			for _, w := range tt.want {
				if !strings.Contains(res.Denial, w) {
					t.Errorf("denial %q lacks %q", res.Denial, w)
				}
			}
		})
	}
}

// withTenancy declares hostdir entries in the webhook configuration, as the chart renders them
// from node.hostDirs.
func withTenancy(c *config.Config) {
	c.HostDirs = []config.HostDir{
		{Name: "team-a", Tenancy: tenancy.Tenancy{Namespaces: []string{"team-a"}}},
		{Name: "writers", Tenancy: tenancy.Tenancy{Namespaces: []string{testNS}, ServiceAccounts: []string{testNS + "/writer"}}},
		{Name: "labelled", Tenancy: tenancy.Tenancy{Namespaces: []string{"*"}, NamespaceSelector: "apm-csi.io/hostdir=allowed"}},
		{Name: "everyone", Tenancy: tenancy.Tenancy{Namespaces: []string{"*"}}},
	}
}

func TestManualHostDirTenancy(t *testing.T) {
	labelled := plainNamespace()
	labelled.Labels = map[string]string{"apm-csi.io/hostdir": "allowed"}
	tests := []struct {
		name     string
		entry    string
		sa       string
		ns       *corev1.Namespace
		nsErr    error
		denied   []string
		warnings []string
	}{
		{name: "entry of another namespace", entry: "team-a", ns: plainNamespace(), denied: []string{
			"annotation apm-csi.io/volume.data", "hostdir entry team-a may not be used by pods of namespace " + testNS + " running as service account default",
			"namespace " + testNS + " is not allowed; the entry allows namespaces team-a",
			"fix: use an entry allowed for this namespace", "Helm value node.hostDirs[].namespaces"}},
		{name: "other service account", entry: "writers", sa: "reader", ns: plainNamespace(), denied: []string{"service account " + testNS + "/reader is not allowed"}},
		{name: "allowed service account", entry: "writers", sa: "writer", ns: plainNamespace()},
		{name: "namespace without the labels", entry: "labelled", ns: plainNamespace(), denied: []string{
			"namespace " + testNS + ` does not carry the labels the entry requires (namespaceSelector "apm-csi.io/hostdir=allowed")`, "label the namespace"}},
		{name: "labelled namespace", entry: "labelled", ns: labelled},
		{name: "namespace unreadable with a selector", entry: "labelled", nsErr: errors.New("timeout"), denied: []string{"could not be read to check its labels: timeout"}},
		{name: "every namespace", entry: "everyone", ns: plainNamespace()},
		{name: "entry unknown to the webhook", entry: "node-only", ns: plainNamespace(), warnings: []string{"hostdir entry node-only is not in the webhook's list of entries"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := withAnnotations(webPod(), annotations.VolumePrefix+"data", "hostdir="+tt.entry+"; mountPath=/data")
			pod.Spec.ServiceAccountName = tt.sa
			res := newTestMutator(t, withTenancy).Mutate(Input{Pod: pod, Namespace: tt.ns, NamespaceError: tt.nsErr, DriverInstalled: true, Now: testNow})
			if len(tt.denied) > 0 {
				if res.Outcome != OutcomeDenied {
					t.Fatalf("outcome %s (%s), want denied", res.Outcome, res.Reason)
				}
				for _, frag := range tt.denied {
					if !strings.Contains(res.Denial, frag) {
						t.Errorf("denial lacks %q:\n%s", frag, res.Denial)
					}
				}
				return
			}
			if res.Outcome != OutcomeInjected || csiSpec(t, res.Pod, "data").HostDir != tt.entry {
				t.Fatalf("outcome %s: %s", res.Outcome, res.Reason)
			}
			for _, w := range tt.warnings {
				if !slices.ContainsFunc(res.Warnings, func(s string) bool { return strings.Contains(s, w) }) {
					t.Errorf("warnings %q lack %q", res.Warnings, w)
				}
			}
		})
	}
}

// The node plugin serves a read-only hostdir volume as a read-only bind mount, which a
// container runtime makes writable again unless kubelet mounts the volume read-only into every
// container; kubelet does that (and passes the CSI readonly flag the node plugin requires)
// only when the CSI volume source says readOnly: true.
func TestManualReadOnlyVolumesAreReadOnlyCSIVolumes(t *testing.T) {
	m := newTestMutator(t, func(c *config.Config) {
		c.HostDirs = []config.HostDir{
			{Name: "dsd-socket", ReadOnly: true, Tenancy: tenancy.Tenancy{Namespaces: []string{"*"}}},
			{Name: "shared", Tenancy: tenancy.Tenancy{Namespaces: []string{"*"}}},
		}
	})
	pod := withAnnotations(webPod(),
		annotations.VolumePrefix+"ro-entry", "hostdir=dsd-socket; mountPath=/a",
		annotations.VolumePrefix+"ro-asked", "hostdir=shared; mountPath=/b; readOnly=true",
		annotations.VolumePrefix+"rw", "hostdir=shared; mountPath=/c",
		annotations.VolumePrefix+"lib-ro", "libraries=java:v1.45.0; mountPath=/d; readOnly=true",
		annotations.VolumePrefix+"lib-rw", "libraries=java:v1.45.0; mountPath=/e",
	)
	res := m.Mutate(input(pod, plainNamespace()))
	if res.Outcome != OutcomeInjected {
		t.Fatalf("got %s: %s", res.Outcome, res.Reason)
	}
	for name, want := range map[string]bool{"ro-entry": true, "ro-asked": true, "rw": false, "lib-ro": true, "lib-rw": false} {
		v := volume(res.Pod, name)
		if v == nil || v.CSI == nil {
			t.Fatalf("no CSI volume %s", name)
		}
		got := v.CSI.ReadOnly != nil && *v.CSI.ReadOnly
		if got != want {
			t.Errorf("volume %s: csi.readOnly = %v, want %t", name, v.CSI.ReadOnly, want)
		}
	}
}
