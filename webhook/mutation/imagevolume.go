package mutation

import (
	"fmt"
	"path"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
)

// Image-volume mode: every library image is a pod volume of its own (volumes[].image, pulled
// by the node's container runtime), mounted with a subPath at the same places as the CSI
// volume's subdirectories. The preload file the CSI volume generates comes from a
// downward-API volume that renders the annotations.Preload annotation: no init container, and
// nothing written into the container's root filesystem, so it works under Pod Security
// "restricted" and with readOnlyRootFilesystem.
const (
	// ImageVolumePrefix starts the name of each library's image volume:
	// apm-csi-lib-injector, apm-csi-lib-<lang>.
	ImageVolumePrefix = "apm-csi-lib-"
	// PreloadVolumeName is the downward-API volume holding the ld.so.preload file.
	PreloadVolumeName = "apm-csi-preload"
	// preloadItem is the file inside PreloadVolumeName.
	preloadItem = "ld.so.preload"
	// TracerLogsVolumeName is an emptyDir for tracers that would write next to themselves
	// (the direct layout's .NET log directory); image volumes are read-only.
	TracerLogsVolumeName = "apm-csi-tracer-logs"
	// TracerLogsMountPath is where TracerLogsVolumeName is mounted.
	TracerLogsMountPath = "/var/log/apm-csi"
)

// dotnetImageVolumeLogDir is the .NET tracer's log directory in image-volume mode: the direct
// layout's /datadog-lib/logs is inside the read-only image.
var dotnetImageVolumeLogDir = path.Join(TracerLogsMountPath, "dotnet")

// imageVolumeName is the volume of the library with key k ("injector" or a language).
func imageVolumeName(key string) string { return ImageVolumePrefix + key }

// imageSubPath is the subPath that serves a library's source directory from its image.
func imageSubPath(source string) string { return strings.Trim(path.Clean("/"+source), "/") }

// imageVolumeMounts are a container's mounts in image-volume mode, at the paths the CSI
// volume's subPaths would have: the injector and each of the container's languages, and the
// preload file (injector layout); the one language at /datadog-lib (direct layout).
// source maps a library key to its subPath (nil: paths only, for conflict checks).
func imageVolumeMounts(layout config.Layout, source map[string]string, langs []string) []corev1.VolumeMount {
	if layout == config.LayoutDirect {
		var mounts []corev1.VolumeMount
		for _, l := range langs {
			mounts = append(mounts, corev1.VolumeMount{Name: imageVolumeName(l), MountPath: DirectMountPath, SubPath: source[l], ReadOnly: true})
			if l == "dotnet" {
				mounts = append(mounts, corev1.VolumeMount{Name: TracerLogsVolumeName, MountPath: TracerLogsMountPath})
			}
		}
		return mounts
	}
	mounts := []corev1.VolumeMount{{Name: imageVolumeName("injector"), MountPath: InjectorMountPath, SubPath: source["injector"], ReadOnly: true}}
	for _, l := range langs {
		mounts = append(mounts, corev1.VolumeMount{Name: imageVolumeName(l), MountPath: path.Join(LibraryMountPath, l), SubPath: source[l], ReadOnly: true})
	}
	return append(mounts, corev1.VolumeMount{Name: PreloadVolumeName, MountPath: PreloadMountPath, SubPath: preloadItem, ReadOnly: true})
}

// imageSubPaths maps each library key of spec to its subPath.
func imageSubPaths(spec *volumeattrs.Spec, keys []string) map[string]string {
	source := map[string]string{}
	for i, lib := range spec.Libraries {
		source[keys[i]] = imageSubPath(lib.Source)
	}
	return source
}

// imageVolumes are the pod volumes of image-volume mode, and the annotations they read.
func imageVolumes(spec *volumeattrs.Spec, keys []string, dotnetLogs bool) ([]corev1.Volume, map[string]string) {
	var vols []corev1.Volume
	for i, lib := range spec.Libraries {
		vols = append(vols, corev1.Volume{Name: imageVolumeName(keys[i]), VolumeSource: corev1.VolumeSource{
			Image: &corev1.ImageVolumeSource{Reference: lib.Image, PullPolicy: corev1.PullIfNotPresent},
		}})
	}
	podAnnotations := map[string]string{}
	if spec.Preload != "" {
		vols = append(vols, corev1.Volume{Name: PreloadVolumeName, VolumeSource: corev1.VolumeSource{
			DownwardAPI: &corev1.DownwardAPIVolumeSource{Items: []corev1.DownwardAPIVolumeFile{{
				Path:     preloadItem,
				FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: fmt.Sprintf("metadata.annotations['%s']", annotations.Preload)},
			}}},
		}})
		podAnnotations[annotations.Preload] = spec.Preload + "\n"
	}
	if dotnetLogs {
		vols = append(vols, corev1.Volume{Name: TracerLogsVolumeName, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
	}
	return vols, podAnnotations
}

// imageVolumeNames are the volume names image-volume mode would add.
func imageVolumeNames(keys []string, preload, dotnetLogs bool) []string {
	var out []string
	for _, k := range keys {
		out = append(out, imageVolumeName(k))
	}
	if preload {
		out = append(out, PreloadVolumeName)
	}
	if dotnetLogs {
		out = append(out, TracerLogsVolumeName)
	}
	return out
}

// hasOwnImageVolumes reports whether the pod already has apm-csi's image volumes: its spec
// was copied from a pod instrumented in image-volume mode.
func hasOwnImageVolumes(pod *corev1.Pod) bool {
	for _, v := range pod.Spec.Volumes {
		if v.Image != nil && strings.HasPrefix(v.Name, ImageVolumePrefix) {
			return true
		}
	}
	return false
}
