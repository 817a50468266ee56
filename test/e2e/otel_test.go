package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/images"
	"github.com/apm-csi/apm-csi/test/tracer"
	"github.com/apm-csi/apm-csi/webhook/annotations"
)

// The OpenTelemetry operator's Node.js injection (internal/instrumentation/nodejs.go and
// sdk.go of the operator): an emptyDir and an init container copying /autoinstrumentation/.
// into it, mounted at /otel-auto-instrumentation-nodejs, and NODE_OPTIONS requiring
// autoinstrumentation.js from there.
const (
	otelVolume     = "opentelemetry-auto-instrumentation-nodejs"
	otelInit       = "opentelemetry-auto-instrumentation-nodejs"
	otelMountPath  = "/otel-auto-instrumentation-nodejs"
	otelNodeOption = " --require " + otelMountPath + "/" + tracer.OTelEntryPoint
)

// operatorPod is the demo application as the OpenTelemetry operator leaves it after injecting
// Node.js (annotation instrumentation.opentelemetry.io/inject-nodejs: "true"), with the
// Instrumentation's exporter endpoint, sampler, propagators and one env entry of its nodejs
// spec (the local resource detectors).
func operatorPod(ns, name, service, image, endpoint string) *corev1.Pod {
	field := func(p string) *corev1.EnvVarSource {
		return &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: p}}
	}
	mount := corev1.VolumeMount{Name: otelVolume, MountPath: otelMountPath}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: ns, Labels: map[string]string{"app": name},
			Annotations: map[string]string{"instrumentation.opentelemetry.io/inject-nodejs": "true"},
		},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{{
				Name:            otelInit,
				Image:           image,
				Command:         []string{"cp", "-r", tracer.OTelSource + "/.", otelMountPath},
				VolumeMounts:    []corev1.VolumeMount{mount},
				ImagePullPolicy: corev1.PullIfNotPresent,
			}},
			Containers: []corev1.Container{{
				Name:  "app",
				Image: tracer.AppRef,
				Env: []corev1.EnvVar{
					{Name: "OTEL_NODE_RESOURCE_DETECTORS", Value: tracer.OTelLocalDetectors},
					{Name: "OTEL_BSP_SCHEDULE_DELAY", Value: "500"},
					{Name: "OTEL_NODE_IP", ValueFrom: field("status.hostIP")},
					{Name: "OTEL_POD_IP", ValueFrom: field("status.podIP")},
					{Name: "NODE_OPTIONS", Value: otelNodeOption},
					{Name: "OTEL_METRICS_EXPORTER", Value: "otlp"},
					{Name: "OTEL_SERVICE_NAME", Value: service},
					{Name: "OTEL_EXPORTER_OTLP_ENDPOINT", Value: endpoint},
					{Name: "OTEL_RESOURCE_ATTRIBUTES_POD_NAME", ValueFrom: field("metadata.name")},
					{Name: "OTEL_RESOURCE_ATTRIBUTES_NODE_NAME", ValueFrom: field("spec.nodeName")},
					{Name: "OTEL_PROPAGATORS", Value: "tracecontext,baggage"},
					{Name: "OTEL_TRACES_SAMPLER", Value: "parentbased_always_on"},
					{Name: "OTEL_RESOURCE_ATTRIBUTES", Value: "k8s.container.name=app,k8s.namespace.name=" + ns +
						",k8s.node.name=$(OTEL_RESOURCE_ATTRIBUTES_NODE_NAME),k8s.pod.name=$(OTEL_RESOURCE_ATTRIBUTES_POD_NAME)"},
				},
				VolumeMounts: []corev1.VolumeMount{mount},
				Ports:        []corev1.ContainerPort{{Name: "http", ContainerPort: tracer.AppPort}},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(tracer.AppPort)}},
					PeriodSeconds: 1,
				},
			}},
			Volumes: []corev1.Volume{{Name: otelVolume, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{
				SizeLimit: framework.Ptr(resource.MustParse("200Mi")),
			}}}},
			TerminationGracePeriodSeconds: framework.Ptr[int64](2),
		},
	}
}

// scenarioOTelRewrite: a pod the OpenTelemetry operator injected (init container + emptyDir)
// is rewritten by the webhook to the CSI volume and starts without the init container; the
// real OpenTelemetry SDK in it exports spans over OTLP/HTTP to the test's intake, exactly as
// the same pod does without the webhook (the init container runs there).
func scenarioOTelRewrite(t *testing.T, ctx context.Context, e *env) {
	start := time.Now()
	dir, err := tracer.InstallOTelNode(ctx, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	img, err := tracer.OTelNodeImage(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	repo := libraryRepo + "/" + tracer.OTelImagePackage
	if _, err := e.reg.Push(repo, tracer.OTelAutoVersion, img); err != nil {
		t.Fatal(err)
	}
	// One reference for both pods: the node plugin pulls it from the library registry; the
	// container runtime, for the operator-style pod's init container, finds it imported.
	ref := e.reg.Repo(repo) + ":" + tracer.OTelAutoVersion
	tb, err := images.Write(filepath.Join(t.TempDir(), "otel.tar"), ref, img)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.c.ImportImage(ctx, tb.Path); err != nil {
		t.Fatal(err)
	}
	measure(t, "OpenTelemetry Node.js image (npm install cached after the first run), push and import", start)

	intake, err := tracer.StartOTLPIntake(e.c.NodeIP() + ":0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = intake.Close() })

	rewriteNS := namespace(t, ctx, e, "e2e-otel-rewrite", map[string]string{framework.SSILabel: annotations.SSIRewrite})
	operatorNS := namespace(t, ctx, e, "e2e-otel-operator", nil)
	rewritten, err := framework.CreatePod(ctx, e.cs, operatorPod(rewriteNS, "otel-app", "e2e-otel-rewritten", ref, intake.Endpoint()))
	if err != nil {
		t.Fatal(err)
	}
	plain, err := framework.CreatePod(ctx, e.cs, operatorPod(operatorNS, "otel-app", "e2e-otel-operator", ref, intake.Endpoint()))
	if err != nil {
		t.Fatal(err)
	}

	// Admission: the init container and the emptyDir are gone, the app mounts the CSI volume
	// at the same path, its env is untouched.
	if len(rewritten.Spec.InitContainers) != 0 {
		t.Errorf("the rewritten pod keeps init containers: %+v", rewritten.Spec.InitContainers)
	}
	if slices.ContainsFunc(rewritten.Spec.Volumes, func(v corev1.Volume) bool { return v.EmptyDir != nil }) {
		t.Errorf("the rewritten pod keeps the emptyDir: %+v", rewritten.Spec.Volumes)
	}
	v := framework.LibraryVolume(rewritten)
	if v == nil {
		t.Fatalf("the webhook did not rewrite the operator's injection: status %q, volumes %+v", rewritten.Annotations[annotations.InjectionStatus], rewritten.Spec.Volumes)
	}
	if got := v.CSI.VolumeAttributes["library.0.image"]; got != ref {
		t.Errorf("library.0.image %q, want %q", got, ref)
	}
	if got := v.CSI.VolumeAttributes["library.0.source"]; got != tracer.OTelSource {
		t.Errorf("library.0.source %q, want %s", got, tracer.OTelSource)
	}
	app := rewritten.Spec.Containers[0]
	i := slices.IndexFunc(app.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == otelMountPath })
	if i < 0 || app.VolumeMounts[i].Name != framework.LibraryVolumeName {
		t.Errorf("the app does not mount the CSI volume at %s: %+v", otelMountPath, app.VolumeMounts)
	}
	if got := framework.EnvValue(app, "NODE_OPTIONS"); got != otelNodeOption {
		t.Errorf("NODE_OPTIONS %q, want the operator's %q unchanged", got, otelNodeOption)
	}
	if got := rewritten.Annotations[annotations.InjectedLibraries]; !strings.Contains(got, "otel-nodejs="+ref) {
		t.Errorf("%s = %q, want otel-nodejs=%s", annotations.InjectedLibraries, got, ref)
	}
	if len(plain.Spec.InitContainers) != 1 || framework.LibraryVolume(plain) != nil {
		t.Errorf("the pod outside the webhook's namespaces was changed: init containers %+v, volumes %+v", plain.Spec.InitContainers, plain.Spec.Volumes)
	}

	for _, c := range []struct {
		p       *corev1.Pod
		service string
		inits   int
	}{{rewritten, "e2e-otel-rewritten", 0}, {plain, "e2e-otel-operator", 1}} {
		ready, err := framework.WaitPodReady(ctx, e.cs, c.p.Namespace, c.p.Name, podTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if n := len(ready.Status.InitContainerStatuses); n != c.inits {
			t.Errorf("pod %s/%s: %d init containers ran, want %d", c.p.Namespace, c.p.Name, n, c.inits)
		}
		for range 3 {
			if err := getJSON(ctx, ready, "/", nil); err != nil {
				t.Fatal(err)
			}
		}
		waitCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
		client, err := intake.WaitForSpans(waitCtx, func(s tracer.OTelSpan) bool {
			return s.Service == c.service && s.Kind == tracepb.Span_SPAN_KIND_CLIENT &&
				strings.HasSuffix(s.Attributes["url.full"]+s.Attributes["http.url"], "/backend")
		})
		cancel()
		if err != nil {
			t.Fatalf("pod %s/%s: client spans of %s: %v", c.p.Namespace, c.p.Name, c.service, err)
		}
		var parent *tracer.OTelSpan
		for _, s := range intake.Spans() {
			if s.SpanID == client[0].ParentID && s.TraceID == client[0].TraceID {
				parent = &s
			}
		}
		if parent == nil || parent.Kind != tracepb.Span_SPAN_KIND_SERVER || parent.Service != c.service {
			t.Errorf("pod %s/%s: the client span has no server span of %s as parent: %+v", c.p.Namespace, c.p.Name, c.service, client[0])
		}
		t.Logf("%s: OTLP spans %s (%s) and %s, from %s", c.service, client[0].Name, client[0].SpanID, describeSpan(parent), client[0].Scope)
	}

	// On the node: the rewritten pod's volume is an overlay of the cached image (one copy per
	// node), writable as the operator's emptyDir was.
	m := oneMount(t, e, rewritten, framework.LibraryVolumeName)
	if m.FSType != "overlay" || m.ReadOnly() {
		t.Errorf("the rewritten pod's volume is %s (read-only %t), want a writable overlay", m.FSType, m.ReadOnly())
	}
}

func describeSpan(s *tracer.OTelSpan) string {
	if s == nil {
		return "no parent"
	}
	return fmt.Sprintf("parent %s %s (%s)", s.Kind, s.Name, s.SpanID)
}
