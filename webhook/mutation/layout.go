package mutation

import (
	"path"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/webhook/config"
)

// Mount paths inside a container.
const (
	// DirectMountPath is where the direct layout mounts the merged libraries.
	DirectMountPath = "/datadog-lib"
	// PreloadMountPath is the file the dynamic loader reads before any library.
	PreloadMountPath = "/etc/ld.so.preload"
)

var (
	// InjectorMountPath and LibraryMountPath mirror the volume's layout at the container root,
	// which is where apm-inject expects them.
	InjectorMountPath = "/" + libref.InjectorTarget
	LibraryMountPath  = "/" + libref.LibraryTargetDir
)

// Values of the .NET CLR profiler variables.
const (
	dotnetProfilerID   = "{846F5F1C-F9AE-4B07-969E-05C26BC060D8}"
	dotnetProfilerPath = DirectMountPath + "/Datadog.Trace.ClrProfiler.Native.so"
)

// directEnv is each language's activation in the direct layout. PHP has none: its tracer is
// activated by the injector only, so the direct layout does not inject it.
var directEnv = map[string][]envEdit{
	"java":   {{name: "JAVA_TOOL_OPTIONS", op: opAppend, sep: " ", value: "-javaagent:" + DirectMountPath + "/dd-java-agent.jar"}},
	"js":     {{name: "NODE_OPTIONS", op: opAppend, sep: " ", value: "--require=" + DirectMountPath + "/node_modules/dd-trace/init"}},
	"python": {{name: "PYTHONPATH", op: opPrepend, sep: ":", value: DirectMountPath + "/"}},
	"dotnet": {
		{name: "CORECLR_ENABLE_PROFILING", op: opRequire, value: "1"},
		{name: "CORECLR_PROFILER", op: opRequire, value: dotnetProfilerID},
		{name: "CORECLR_PROFILER_PATH", op: opRequire, value: dotnetProfilerPath},
		{name: "DD_DOTNET_TRACER_HOME", op: opSetIfAbsent, value: DirectMountPath},
		{name: "DD_TRACE_LOG_DIRECTORY", op: opSetIfAbsent, value: DirectMountPath + "/logs"},
	},
	"ruby": {{name: "RUBYOPT", op: opAppend, sep: " ", value: "-r" + DirectMountPath + "/auto_inject"}},
}

// injectorEnv is the injector layout's activation, the same for every language.
func injectorEnv(now time.Time) []envEdit {
	return []envEdit{
		{name: "LD_PRELOAD", op: opAppend, sep: ":", value: libref.LauncherPath},
		{name: "DD_INJECT_SENDER_TYPE", op: opSetIfAbsent, value: "k8s"},
		{name: "DD_INJECT_START_TIME", op: opSetIfAbsent, value: strconv.FormatInt(now.Unix(), 10)},
	}
}

// containerEnv is what a container that gets langs needs in a layout and mode.
func containerEnv(mode config.Mode, layout config.Layout, langs []string, now time.Time) []envEdit {
	if layout == config.LayoutInjector {
		return injectorEnv(now)
	}
	var edits []envEdit
	for _, l := range langs {
		for _, e := range directEnv[l] {
			if mode == config.ModeImageVolume && e.name == "DD_TRACE_LOG_DIRECTORY" {
				// The image is read-only: log to the emptyDir instead of next to the library.
				e.value = dotnetImageVolumeLogDir
			}
			edits = append(edits, e)
		}
	}
	return edits
}

// modeMounts are a container's mounts of the libraries in a mode (source: see
// imageVolumeMounts).
func modeMounts(mode config.Mode, layout config.Layout, langs, volumeLangs []string, source map[string]string) []corev1.VolumeMount {
	if mode == config.ModeImageVolume {
		return imageVolumeMounts(layout, source, langs)
	}
	return containerMounts(layout, langs, volumeLangs)
}

// containerMounts are the subPath mounts of the libraries volume for a container that gets
// langs, out of the volume's volumeLangs.
func containerMounts(layout config.Layout, langs, volumeLangs []string) []corev1.VolumeMount {
	if layout == config.LayoutDirect {
		return []corev1.VolumeMount{{Name: VolumeName, MountPath: DirectMountPath}}
	}
	mounts := []corev1.VolumeMount{{Name: VolumeName, MountPath: InjectorMountPath, SubPath: libref.InjectorTarget}}
	if len(langs) == len(volumeLangs) {
		mounts = append(mounts, corev1.VolumeMount{Name: VolumeName, MountPath: LibraryMountPath, SubPath: libref.LibraryTargetDir})
	} else {
		// A container that gets fewer languages than the volume holds sees only its own.
		for _, l := range langs {
			mounts = append(mounts, corev1.VolumeMount{Name: VolumeName, MountPath: path.Join(LibraryMountPath, l), SubPath: libref.LanguageTarget(l)})
		}
	}
	return append(mounts, corev1.VolumeMount{Name: VolumeName, MountPath: PreloadMountPath, SubPath: volumeattrs.PreloadFile, ReadOnly: true})
}

// chosenLibrary is one language SSI injects, with the image that serves it.
type chosenLibrary struct {
	Language string
	Image    string
}

// volumeSpec is the library volume of a layout: in the injector layout the injector and each
// language in its own directory plus the preload file, in the direct layout every language
// merged at the volume root as the classic shared emptyDir had them.
func volumeSpec(layout config.Layout, injectorImage string, libs []chosenLibrary) *volumeattrs.Spec {
	spec := &volumeattrs.Spec{Kind: volumeattrs.KindLibrary}
	if layout == config.LayoutInjector {
		spec.Libraries = append(spec.Libraries, volumeattrs.Library{Image: injectorImage, Source: libref.InjectorSource, Target: libref.InjectorTarget})
		spec.Preload = libref.LauncherPath
	}
	for _, l := range libs {
		lib := volumeattrs.Library{Image: l.Image, Source: libref.LibrarySource}
		if layout == config.LayoutInjector {
			lib.Target = libref.LanguageTarget(l.Language)
		}
		spec.Libraries = append(spec.Libraries, lib)
	}
	return spec
}
