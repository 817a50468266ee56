package mutation

import (
	"fmt"
	"path"
	"regexp"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/webhook/config"
)

// Names of the init-container injection other injectors add (brief §5).
const (
	DatadogInjectorInit = "datadog-init-apm-inject"
	DatadogVolume       = "datadog-auto-instrumentation"
	DatadogEtcVolume    = "datadog-auto-instrumentation-etc"
	OTelPrefix          = "opentelemetry-auto-instrumentation-"
)

var datadogLibInit = regexp.MustCompile(`^datadog-lib-([a-z0-9]+)-init$`)

// foreignVolumePrefix is where a replaced emptyDir's content lives in the CSI volume. The
// Datadog volumes map to the paths apm-csi uses itself (root, and etc/ for ld.so.preload);
// every other one gets a directory of its own name.
func foreignVolumePrefix(name string) string {
	switch name {
	case DatadogVolume:
		return ""
	case DatadogEtcVolume:
		return path.Dir(volumeattrs.PreloadFile)
	}
	return name
}

func isForeignVolume(v corev1.Volume) bool {
	return v.EmptyDir != nil && (strings.HasPrefix(v.Name, DatadogVolume) || strings.HasPrefix(v.Name, OTelPrefix))
}

// foreignLibrary is one init container of another injector and what it copied.
type foreignLibrary struct {
	name    string
	key     string
	library volumeattrs.Library
	preload bool
}

// foreignInjection is the init-container injection found in a pod.
type foreignInjection struct {
	volumes map[string]bool
	inits   []corev1.Container
}

func (f foreignInjection) found() bool { return len(f.inits) > 0 }

func (f foreignInjection) initNames() []string {
	var out []string
	for _, c := range f.inits {
		out = append(out, c.Name)
	}
	return out
}

// detectForeign finds Datadog's and OpenTelemetry's init containers and emptyDirs. An init
// container counts only if it also mounts one of those emptyDirs, so that a user's own
// container with a similar name is never taken for one.
func detectForeign(pod *corev1.Pod) foreignInjection {
	f := foreignInjection{volumes: map[string]bool{}}
	for _, v := range pod.Spec.Volumes {
		if isForeignVolume(v) {
			f.volumes[v.Name] = true
		}
	}
	if len(f.volumes) == 0 {
		return f
	}
	for _, c := range pod.Spec.InitContainers {
		named := c.Name == DatadogInjectorInit || datadogLibInit.MatchString(c.Name) || strings.HasPrefix(c.Name, OTelPrefix)
		if named && slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return f.volumes[m.Name] }) {
			f.inits = append(f.inits, c)
		}
	}
	return f
}

// rewrite replaces another injector's init containers and emptyDirs by one CSI volume that
// serves the same images at the same places. Everything else in the pod stays as it was:
// containers keep their mount paths (only the volume and subPath change) and their env.
func (m *Mutator) rewrite(pod *corev1.Pod, f foreignInjection) ssiResult {
	skip := func(format string, args ...any) ssiResult {
		return ssiResult{outcome: OutcomeSkipped, reason: "cannot rewrite the init-container injection: " + fmt.Sprintf(format, args...)}
	}
	var libs []foreignLibrary
	filled := map[string]bool{}
	for _, c := range f.inits {
		lib, vol, err := mapForeignInit(c, f.volumes)
		if err != nil {
			return skip("init container %s: %v", c.Name, err)
		}
		if err := m.allowed.Check(lib.library.Image); err != nil {
			// The node plugins would refuse it: leave the init containers, which work.
			return skip("init container %s: %v", c.Name, err)
		}
		filled[vol] = true
		if lib.preload {
			filled[DatadogEtcVolume] = true
		}
		libs = append(libs, lib)
	}
	for _, v := range sortedKeys(f.volumes) {
		if !filled[v] {
			return skip("emptyDir %s is filled by no init container this webhook knows", v)
		}
	}

	spec := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary}
	var recorded []string
	for _, l := range libs {
		if !slices.Contains(spec.Libraries, l.library) {
			spec.Libraries = append(spec.Libraries, l.library)
		}
		if l.preload {
			spec.Preload = libref.LauncherPath
		}
		recorded = append(recorded, l.key+"="+l.library.Image)
	}
	attrs := spec.Attributes()
	if _, err := volumeattrs.Parse(attrs); err != nil {
		return skip("%v", err)
	}

	isForeignInit := func(c corev1.Container) bool {
		return slices.ContainsFunc(f.inits, func(x corev1.Container) bool { return x.Name == c.Name })
	}
	// Check every remaining mount before changing anything: a pod that cannot be rewritten
	// completely keeps its injection as it was.
	for _, c := range slices.Concat(pod.Spec.InitContainers, pod.Spec.Containers) {
		if isForeignInit(c) {
			continue
		}
		for _, vm := range c.VolumeMounts {
			if f.volumes[vm.Name] && vm.SubPathExpr != "" {
				return skip("container %s mounts %s with subPathExpr", c.Name, vm.Name)
			}
		}
	}

	// Repoint every remaining mount of the emptyDirs at the CSI volume.
	repoint := func(cs []corev1.Container) {
		for i := range cs {
			for j := range cs[i].VolumeMounts {
				vm := &cs[i].VolumeMounts[j]
				if !f.volumes[vm.Name] {
					continue
				}
				sub := path.Join(foreignVolumePrefix(vm.Name), vm.SubPath)
				if sub == "." {
					sub = ""
				}
				vm.Name, vm.SubPath = VolumeName, sub
			}
		}
	}
	pod.Spec.InitContainers = slices.DeleteFunc(pod.Spec.InitContainers, isForeignInit)
	repoint(pod.Spec.InitContainers)
	repoint(pod.Spec.Containers)
	pod.Spec.Volumes = slices.DeleteFunc(pod.Spec.Volumes, func(v corev1.Volume) bool { return f.volumes[v.Name] })
	pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: VolumeName, VolumeSource: corev1.VolumeSource{
		CSI: &corev1.CSIVolumeSource{Driver: m.cfg.DriverName, VolumeAttributes: attrs},
	}})
	if len(pod.Spec.InitContainers) == 0 {
		pod.Spec.InitContainers = nil
	}
	return ssiResult{
		outcome:   OutcomeRewritten,
		reason:    fmt.Sprintf("%s%s by CSI volume %s", rewriteReasonPrefix, strings.Join(f.initNames(), ", "), VolumeName),
		mode:      config.ModeCSI,
		libraries: recorded,
	}
}

// mapForeignInit works out which image directory an init container copied where, and returns
// the library that serves it in the CSI volume and the emptyDir it filled.
func mapForeignInit(c corev1.Container, volumes map[string]bool) (foreignLibrary, string, error) {
	if c.Image == "" {
		return foreignLibrary{}, "", fmt.Errorf("no image")
	}
	if _, err := libref.Parse(c.Image); err != nil {
		return foreignLibrary{}, "", err
	}
	switch {
	case c.Name == DatadogInjectorInit:
		// The injector always lands at the path apm-inject is loaded from.
		return foreignLibrary{name: c.Name, key: "injector", preload: true,
			library: volumeattrs.Library{Image: c.Image, Source: libref.InjectorSource, Target: libref.InjectorTarget}}, DatadogVolume, nil
	case datadogLibInit.MatchString(c.Name):
		// copy-lib.sh copies the package to the mount of the shared volume: its subPath is the
		// language's directory in the injector layout, the root in the older layout.
		i := slices.IndexFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == DatadogVolume })
		if i < 0 {
			return foreignLibrary{}, "", fmt.Errorf("it does not mount %s", DatadogVolume)
		}
		vm := c.VolumeMounts[i]
		target, err := volumeattrs.CleanTarget(path.Join(foreignVolumePrefix(vm.Name), vm.SubPath))
		if err != nil {
			return foreignLibrary{}, "", err
		}
		lang := datadogLibInit.FindStringSubmatch(c.Name)[1]
		return foreignLibrary{name: c.Name, key: lang,
			library: volumeattrs.Library{Image: c.Image, Source: libref.LibrarySource, Target: target}}, vm.Name, nil
	}
	// OpenTelemetry: the operator's init containers run a plain cp.
	src, dst, err := parseCopy(append(slices.Clone(c.Command), c.Args...))
	if err != nil {
		return foreignLibrary{}, "", err
	}
	for _, vm := range c.VolumeMounts {
		if !volumes[vm.Name] {
			continue
		}
		rel, ok := strings.CutPrefix(dst, path.Clean(vm.MountPath))
		if !ok || (rel != "" && !strings.HasPrefix(rel, "/")) {
			continue
		}
		if vm.SubPathExpr != "" {
			return foreignLibrary{}, "", fmt.Errorf("it mounts %s with subPathExpr", vm.Name)
		}
		target, err := volumeattrs.CleanTarget(strings.TrimPrefix(path.Join(foreignVolumePrefix(vm.Name), vm.SubPath, rel), "/"))
		if err != nil {
			return foreignLibrary{}, "", err
		}
		key := "otel-" + strings.TrimPrefix(c.Name, OTelPrefix)
		return foreignLibrary{name: c.Name, key: key,
			library: volumeattrs.Library{Image: c.Image, Source: src, Target: target}}, vm.Name, nil
	}
	return foreignLibrary{}, "", fmt.Errorf("it copies to %s, which is not in a replaced emptyDir", dst)
}

// parseCopy understands "cp [-r|-R|-a|-f|-p|-v]... SRC DST" without a shell, and returns the
// image directory to serve and the container directory it must appear at. "SRC/." copies a
// directory's content; a plain SRC copies one entry, which is served by serving the
// directory that holds it (a superset of what the copy produced).
func parseCopy(argv []string) (srcDir, dstDir string, err error) {
	if len(argv) == 0 || path.Base(argv[0]) != "cp" {
		return "", "", fmt.Errorf("its command %q is not a plain cp", strings.Join(argv, " "))
	}
	var operands []string
	for _, a := range argv[1:] {
		switch {
		case a == "-r" || a == "-R" || a == "-a" || a == "-f" || a == "-p" || a == "-v" || a == "--recursive":
		case strings.HasPrefix(a, "-"):
			return "", "", fmt.Errorf("cp option %s is not understood", a)
		default:
			operands = append(operands, a)
		}
	}
	if len(operands) != 2 {
		return "", "", fmt.Errorf("its command %q does not copy one source to one destination", strings.Join(argv, " "))
	}
	src, dst := operands[0], operands[1]
	if !path.IsAbs(src) || !path.IsAbs(dst) {
		return "", "", fmt.Errorf("its cp paths %s and %s are not absolute", src, dst)
	}
	if strings.HasSuffix(src, "/.") {
		return path.Dir(src), path.Clean(dst), nil
	}
	src, dst = path.Clean(src), path.Clean(dst)
	if path.Base(dst) == path.Base(src) {
		return path.Dir(src), path.Dir(dst), nil
	}
	// cp SRC DIR puts SRC inside DIR under its own name.
	return path.Dir(src), dst, nil
}
