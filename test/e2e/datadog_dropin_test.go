package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/test/images"
	"github.com/apm-csi/apm-csi/test/testenv"
	"github.com/apm-csi/apm-csi/test/tracer"
)

// The node plugin as Datadog's CSI driver (chart value datadogDropIn.enabled), serving pods
// exactly as the Datadog Cluster Agent (7.76+) writes them in its "csi" injection mode. The
// shapes come from Datadog's public code (pkg/clusteragent/admission/mutate/autoinstrumentation
// /libraryinjection: csi.go and mutator.go; pkg/clusteragent/admission/mutate/config:
// mutator.go and config.go), not from apm-csi's webhook.
const (
	datadogDriver = "k8s.csi.datadoghq.com"
	// The drop-in is a second release of the chart next to apm-csi's own: its own namespace,
	// state dir and host ports, and Datadog's driver name (two CSI drivers on one node).
	dropInRelease   = "apm-csi-datadog"
	dropInNamespace = "apm-csi-datadog"
	dropInHealth    = 9860
	dropInMetrics   = 9861
	// The Cluster Agent's default socket path in pods (admission_controller.inject_config.
	// socket_path) and socket file names (apm_config.receiver_socket, dogstatsd_socket).
	agentSocketPath = "/var/run/datadog"
	apmSocketFile   = "apm.socket"
	dsdSocketFile   = "dsd.socket"
	// Where the injector layout mounts the JavaScript library.
	ddJSLibrary = "/opt/datadog/apm/library/js"
)

// clusterAgentPod is a pod as the Cluster Agent's "csi" mode leaves it, for one language
// (js) with the injector, the ld.so.preload file and the Agent's sockets. socketVolumes picks
// admission_controller.inject_config.type_socket_volumes: false (the default) mounts the two
// socket directories (APMSocketDirectory, DSDSocketDirectory) at /var/run/datadog/apm and
// /dsd; true mounts the two sockets themselves (APMSocket, DSDSocket). Every CSI volume and
// every mount is read-only, as the Cluster Agent writes them. Every container is mutated alike.
func clusterAgentPod(ns, name, service string, socketVolumes bool, containers []corev1.Container) *corev1.Pod {
	csiVol := func(volName string, attrs map[string]string) corev1.Volume {
		return corev1.Volume{Name: volName, VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
			Driver: datadogDriver, ReadOnly: framework.Ptr(true), VolumeAttributes: attrs,
		}}}
	}
	library := func(pkg, version string) map[string]string {
		return map[string]string{
			"type":                                "DatadogLibrary",
			"dd.csi.datadog.com/library.package":  pkg,
			"dd.csi.datadog.com/library.registry": libref.DefaultRegistry,
			"dd.csi.datadog.com/library.version":  version,
		}
	}
	volumes := []corev1.Volume{
		csiVol("datadog-auto-instrumentation", library(libref.InjectorPackage, tracer.InjectorVersion)),
		csiVol("datadog-auto-instrumentation-etc", map[string]string{"type": "DatadogInjectorPreload"}),
		csiVol("dd-lib-js", library(tracer.JSLibraryPackage, tracer.DDTraceVersion)),
	}
	mounts := []corev1.VolumeMount{
		{Name: "datadog-auto-instrumentation", MountPath: libref.InjectorSource, ReadOnly: true},
		{Name: "datadog-auto-instrumentation-etc", MountPath: "/etc/ld.so.preload", ReadOnly: true},
		{Name: "dd-lib-js", MountPath: ddJSLibrary, ReadOnly: true},
	}
	apmURL, dsdURL := "unix://"+agentSocketPath+"/apm/"+apmSocketFile, "unix://"+agentSocketPath+"/dsd/"+dsdSocketFile
	if socketVolumes {
		volumes = append(volumes,
			csiVol("datadog-dogstatsd", map[string]string{"type": "DSDSocket"}),
			csiVol("datadog-trace-agent", map[string]string{"type": "APMSocket"}))
		mounts = append(mounts,
			corev1.VolumeMount{Name: "datadog-dogstatsd", MountPath: agentSocketPath + "/" + dsdSocketFile, ReadOnly: true},
			corev1.VolumeMount{Name: "datadog-trace-agent", MountPath: agentSocketPath + "/" + apmSocketFile, ReadOnly: true})
		apmURL, dsdURL = "unix://"+agentSocketPath+"/"+apmSocketFile, "unix://"+agentSocketPath+"/"+dsdSocketFile
	} else {
		volumes = append(volumes,
			csiVol("datadog-dsd", map[string]string{"type": "DSDSocketDirectory"}),
			csiVol("datadog-apm", map[string]string{"type": "APMSocketDirectory"}))
		mounts = append(mounts,
			corev1.VolumeMount{Name: "datadog-dsd", MountPath: agentSocketPath + "/dsd", ReadOnly: true},
			corev1.VolumeMount{Name: "datadog-apm", MountPath: agentSocketPath + "/apm", ReadOnly: true})
	}
	uid := &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.uid"}}
	for i := range containers {
		c := &containers[i]
		c.VolumeMounts = append(c.VolumeMounts, mounts...)
		c.Env = append(c.Env,
			// The auto-instrumentation webhook (injectAPMEnvVars).
			corev1.EnvVar{Name: "LD_PRELOAD", Value: libref.LauncherPath},
			corev1.EnvVar{Name: "DD_INJECT_SENDER_TYPE", Value: "k8s"},
			corev1.EnvVar{Name: "DD_INJECT_START_TIME", Value: strconv.FormatInt(time.Now().Unix(), 10)},
			// The config webhook in csi mode.
			corev1.EnvVar{Name: "DD_TRACE_AGENT_URL", Value: apmURL},
			corev1.EnvVar{Name: "DD_DOGSTATSD_URL", Value: dsdURL},
			corev1.EnvVar{Name: "DD_ENTITY_ID", ValueFrom: uid},
			corev1.EnvVar{Name: "DD_EXTERNAL_ENV", Value: "it-false,cn-" + c.Name + ",pu-$(DD_INTERNAL_POD_UID)"},
			corev1.EnvVar{Name: "DD_INTERNAL_POD_UID", ValueFrom: uid},
		)
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name, "tags.datadoghq.com/service": service}},
		Spec: corev1.PodSpec{
			Containers:                    containers,
			Volumes:                       volumes,
			TerminationGracePeriodSeconds: framework.Ptr[int64](2),
		},
	}
}

// ddApp is the demo application container (no tracer in its image) as its owner wrote it:
// service name and flush settings only. The agent URL comes from the Cluster Agent (in the
// drop-in scenario) or is added by appPod.
func ddApp(service string) corev1.Container {
	return corev1.Container{
		Name:  "app",
		Image: tracer.AppRef,
		Env: []corev1.EnvVar{
			{Name: "DD_SERVICE", Value: service},
			{Name: "DD_ENV", Value: "e2e"},
			{Name: "DD_INSTRUMENTATION_TELEMETRY_ENABLED", Value: "false"},
			{Name: "DD_REMOTE_CONFIGURATION_ENABLED", Value: "false"},
			{Name: "DD_TRACE_FLUSH_INTERVAL", Value: "500"},
		},
		Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: tracer.AppPort}},
		ReadinessProbe: &corev1.Probe{
			ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(tracer.AppPort)}},
			PeriodSeconds: 1,
		},
	}
}

// installDropIn installs the chart a second time as Datadog's CSI driver, with the Agent's
// socket directory at socketDir and Datadog's default registry mirrored to the test registry,
// and waits until kubelet lists the driver on the node. It uninstalls it when t ends.
func installDropIn(t *testing.T, ctx context.Context, e *env, socketDir string) string {
	t.Helper()
	stateDir := e.c.HostPathDir(dropInRelease)
	values := map[string]any{
		"datadogDropIn": map[string]any{"enabled": true},
		"images": map[string]any{
			"node": map[string]any{"repository": strings.TrimSuffix(framework.NodeImageRef, ":"+framework.ImageTag), "tag": framework.ImageTag, "pullPolicy": "IfNotPresent"},
		},
		"kubeletDir": e.c.KubeletDir(),
		"libraries": map[string]any{
			// The Cluster Agent names Datadog's registry; the nodes pull it from the test's.
			"registryMirrors":    []map[string]string{{"source": libref.DefaultRegistry, "mirror": e.reg.Repo(libraryRepo)}},
			"insecureRegistries": []string{e.reg.Addr()},
		},
		"node": map[string]any{
			"stateDir":            stateDir,
			"healthPort":          dropInHealth,
			"metricsPort":         dropInMetrics,
			"datadogAgentSockets": map[string]any{"path": socketDir},
		},
		// apm-csi's own release already guards both drivers' volumes.
		"admissionPolicy": map[string]any{"enabled": false},
	}
	data, err := yaml.Marshal(values)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "datadog-values.yaml")
	if err := os.WriteFile(file, data, 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if out, err := e.d.Helm(ctx, "upgrade", "--install", dropInRelease, filepath.Join(e.d.Opts.RepoRoot, "deploy/helm/apm-csi"),
		"--namespace", dropInNamespace, "--create-namespace", "--values", file, "--wait", "--timeout", "3m"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if out, err := e.d.Helm(ctx, "uninstall", dropInRelease, "--namespace", dropInNamespace, "--wait"); err != nil {
			t.Logf("helm uninstall %s: %v\n%s", dropInRelease, err, out)
		}
		if err := framework.DeleteNamespace(ctx, e.cs, dropInNamespace); err != nil {
			t.Logf("delete namespace %s: %v", dropInNamespace, err)
		}
	})
	if err := framework.Poll(ctx, 3*time.Minute, "kubelet to list "+datadogDriver+" on the node", func() (bool, error) {
		return framework.DriverRegistered(ctx, e.cs, e.c.NodeName(), datadogDriver), nil
	}); err != nil {
		t.Fatal(err)
	}
	measure(t, "helm install of the drop-in until kubelet lists "+datadogDriver, start)
	drv, err := e.cs.StorageV1().CSIDrivers().Get(ctx, datadogDriver, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if drv.Annotations["csi.datadoghq.com/apm-enabled"] != "true" {
		t.Errorf("CSIDriver %s annotations %v: the Cluster Agent's auto mode would not pick CSI", datadogDriver, drv.Annotations)
	}
	return stateDir
}

// spansOf waits for a server and a client span of service at intake, after three requests.
func spansOf(t *testing.T, ctx context.Context, intake *tracer.Intake, p *corev1.Pod, service string) {
	t.Helper()
	for range 3 {
		if err := getJSON(ctx, p, "/", nil); err != nil {
			t.Fatal(err)
		}
	}
	waitCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	// The requests to / (not the readiness probe's): a server span and its client span.
	for kind, url := range map[string]string{"server": ":8080/", "client": "/backend"} {
		got, err := intake.WaitForSpans(waitCtx, func(s tracer.Span) bool {
			return s.Service == service && s.Meta["span.kind"] == kind && strings.HasSuffix(s.Meta["http.url"], url)
		})
		if err != nil {
			t.Fatalf("%s spans of service %s through the Agent's socket: %v", kind, service, err)
		}
		t.Logf("a %s span of %s arrived through the socket volume:\n%s", kind, service, tracer.FormatSpans(got[:1]))
	}
}

// scenarioDatadogDropIn: the node plugin installed as Datadog's CSI driver serves pods exactly
// as the Cluster Agent writes them in csi mode; the real dd-trace, loaded by the injector
// layout's preload launcher from the language volume, reports spans through the Agent's
// socket served by a socket volume.
func scenarioDatadogDropIn(t *testing.T, ctx context.Context, e *env) {
	launcher, err := tracer.BuildLauncher(ctx)
	if err != nil {
		testenv.Missing(t, "%v", err)
	}
	injector, err := tracer.InjectorImage(launcher)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.Push(libraryRepo+"/"+libref.InjectorPackage, tracer.InjectorVersion, injector); err != nil {
		t.Fatal(err)
	}

	// The Agent's sockets on the node: the trace intake serves the APM socket; DogStatsD is a
	// datagram socket nobody reads here.
	socketDir := e.c.HostPathDir("datadog-agent-run")
	if err := os.MkdirAll(socketDir, 0o755); err != nil {
		t.Fatal(err)
	}
	intake, err := tracer.StartUnixIntake(filepath.Join(socketDir, apmSocketFile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = intake.Close() })
	dsd, err := listenUnixgram(filepath.Join(socketDir, dsdSocketFile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dsd.Close() })

	stateDir := installDropIn(t, ctx, e, socketDir)
	ns := namespace(t, ctx, e, "e2e-datadog-dropin", nil)

	// type_socket_volumes false (the Cluster Agent's default): socket directories. A busybox
	// container (static: it ignores ld.so.preload) shows what every container sees.
	inspect := corev1.Container{Name: "inspect", Image: images.BusyboxRef, Command: []string{"sh", "-c", "sleep 3600"}}
	dirs := clusterAgentPod(ns, "dropin-dirs", "e2e-dropin-dirs", false, []corev1.Container{ddApp("e2e-dropin-dirs"), inspect})
	socks := clusterAgentPod(ns, "dropin-sockets", "e2e-dropin-sockets", true, []corev1.Container{ddApp("e2e-dropin-sockets")})
	for _, p := range []*corev1.Pod{dirs, socks} {
		if _, err := framework.CreatePod(ctx, e.cs, p); err != nil {
			t.Fatalf("create pod %s: %v", p.Name, err)
		}
	}
	for i, p := range []*corev1.Pod{dirs, socks} {
		got, err := framework.WaitPodReady(ctx, e.cs, p.Namespace, p.Name, podTimeout)
		if err != nil {
			t.Fatal(err)
		}
		// Nothing but the Cluster Agent's volumes: apm-csi's webhook left the pod alone.
		if v := framework.LibraryVolume(got); v != nil {
			t.Errorf("pod %s got apm-csi's volume %s", p.Name, v.Name)
		}
		for _, v := range got.Spec.Volumes {
			if v.CSI != nil && v.CSI.Driver == names.DriverName {
				t.Errorf("pod %s has a volume of %s", p.Name, names.DriverName)
			}
		}
		if i == 0 {
			dirs = got
		} else {
			socks = got
		}
	}

	// Files at the paths the injector layout expects, read-only.
	sh := func(script string) string {
		out, err := framework.Exec(ctx, e.c, dirs.Namespace, dirs.Name, "inspect", "sh", "-c", script)
		if err != nil {
			t.Fatalf("%s: %v\n%s", script, err, out)
		}
		return out
	}
	if got := strings.TrimSpace(sh("cat /etc/ld.so.preload")); got != libref.LauncherPath {
		t.Errorf("/etc/ld.so.preload holds %q, want %s", got, libref.LauncherPath)
	}
	if got := sh("test -f " + libref.LauncherPath + " && echo present"); got != "present\n" {
		t.Errorf("the launcher %s is not in the injector volume: %q", libref.LauncherPath, got)
	}
	var pkg struct{ Name, Version string }
	if err := json.Unmarshal([]byte(sh("cat "+ddJSLibrary+"/node_modules/dd-trace/package.json")), &pkg); err != nil {
		t.Fatal(err)
	}
	if pkg.Name != "dd-trace" || pkg.Version != tracer.DDTraceVersion {
		t.Errorf("%s/node_modules/dd-trace/package.json: %+v, want dd-trace %s", ddJSLibrary, pkg, tracer.DDTraceVersion)
	}
	for _, s := range []string{agentSocketPath + "/apm/" + apmSocketFile, agentSocketPath + "/dsd/" + dsdSocketFile} {
		if got := sh("test -S " + s + " && echo socket"); got != "socket\n" {
			t.Errorf("%s is not a socket in the container: %q", s, got)
		}
	}
	for _, dir := range []string{ddJSLibrary, libref.InjectorSource, agentSocketPath + "/apm"} {
		if got := sh("touch " + dir + "/written-by-pod 2>/dev/null && echo WRITABLE || echo refused"); got != "refused\n" {
			t.Errorf("the pod can write into %s: %q", dir, got)
		}
	}

	// On the node: the library volumes are overlays of the drop-in's cache, the socket
	// directory a bind of the Agent's.
	for _, v := range []string{"datadog-auto-instrumentation", "dd-lib-js"} {
		m := oneMount(t, e, dirs, v)
		if m.FSType != "overlay" {
			t.Errorf("volume %s is %s, want overlay", v, m.FSType)
		}
		for _, l := range m.LowerDirs() {
			if !strings.HasPrefix(l, stateDir+"/") {
				t.Errorf("volume %s: lower dir %s is not in the drop-in's state dir %s", v, l, stateDir)
			}
		}
		checkNoSuidNoDev(t, m)
	}

	// The real tracer: the launcher from /etc/ld.so.preload made node require dd-trace from
	// the language volume (the pod sets no NODE_OPTIONS), and spans reach the Agent's socket.
	for _, c := range []struct {
		p       *corev1.Pod
		service string
	}{{dirs, "e2e-dropin-dirs"}, {socks, "e2e-dropin-sockets"}} {
		var info tracerInfo
		if err := getJSON(ctx, c.p, "/tracer", &info); err != nil {
			t.Fatal(err)
		}
		wantFrom := ddJSLibrary + "/node_modules/dd-trace"
		if !info.Loaded || info.From != wantFrom || info.Version != tracer.DDTraceVersion {
			t.Fatalf("pod %s: the app did not load dd-trace %s from %s: %+v", c.p.Name, tracer.DDTraceVersion, wantFrom, info)
		}
		if want := "--require=" + ddJSLibrary + "/" + tracer.InitModule; info.NodeOptions != want {
			t.Errorf("pod %s: NODE_OPTIONS %q, want %q (set by the preload launcher)", c.p.Name, info.NodeOptions, want)
		}
		spansOf(t, ctx, intake, c.p, c.service)
	}

	// The pods go before the drop-in is uninstalled, so that it unmounts their volumes.
	if err := framework.DeleteNamespace(ctx, e.cs, ns); err != nil {
		t.Fatal(err)
	}
	all, err := framework.Mounts()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []*corev1.Pod{dirs, socks} {
		for _, v := range p.Spec.Volumes {
			if at := framework.MountsAt(all, framework.CSIMountDir(e.c.KubeletDir(), p.UID, v.Name)); len(at) != 0 {
				t.Errorf("pod %s volume %s is still mounted after the pod is gone: %+v", p.Name, v.Name, at)
			}
		}
	}
}

// listenUnixgram binds a datagram socket (DogStatsD's kind) at path, usable by every user.
func listenUnixgram(path string) (*net.UnixConn, error) {
	_ = os.Remove(path)
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("dogstatsd socket: %w", err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}
