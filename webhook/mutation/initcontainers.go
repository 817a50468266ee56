package mutation

import (
	"path"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// Init-container mode: the classic injection, kept as the fallback when the CSI driver is not
// installed and as the baseline the CSI mode is measured against. The emptyDir gets the same
// tree the CSI volume would have, so containers mount it with the same subPaths.
const (
	// InitContainerPrefix starts the name of every init container the webhook adds.
	InitContainerPrefix = "apm-csi-init-"
	// initMountPath is where the copying init containers see the emptyDir.
	initMountPath = "/apm-csi"
	// copyScript copies a directory's content (dotfiles included) into a directory it creates.
	// Paths come as positional arguments, so nothing in them is interpreted by the shell.
	copyScript = `set -e; mkdir -p "$2"; cp -r "$1"/. "$2"`
	// preloadScript also writes the ld.so.preload file.
	preloadScript = copyScript + `; mkdir -p "$(dirname "$3")"; printf '%s\n' "$4" > "$3"`
	// nonRootUID is the user the copy runs as: restricted Pod Security needs a non-root user,
	// and the emptyDir is world-writable.
	nonRootUID = 65532
)

// initContainerResources are modest: the copy is I/O bound, and page cache is reclaimable.
var initContainerResources = corev1.ResourceRequirements{
	Requests: corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("10m"),
		corev1.ResourceMemory: resource.MustParse("64Mi"),
	},
	Limits: corev1.ResourceList{
		corev1.ResourceMemory: resource.MustParse("256Mi"),
	},
}

// restrictedSecurityContext satisfies Pod Security "restricted".
func restrictedSecurityContext() *corev1.SecurityContext {
	return &corev1.SecurityContext{
		RunAsNonRoot:             new(true),
		RunAsUser:                new(int64(nonRootUID)),
		RunAsGroup:               new(int64(nonRootUID)),
		AllowPrivilegeEscalation: new(false),
		ReadOnlyRootFilesystem:   new(true),
		Privileged:               new(false),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
}

// copyInitContainers returns one init container per library of spec, each copying its source
// directory to its target in the emptyDir; the first also writes the preload file. keys name
// the containers (apm-csi-init-<key>), in the order of spec.Libraries.
func copyInitContainers(spec *volumeattrs.Spec, keys []string) []corev1.Container {
	var out []corev1.Container
	for i, lib := range spec.Libraries {
		args := []string{copyScript, "apm-csi-init", lib.Source, path.Join(initMountPath, lib.Target)}
		if i == 0 && spec.Preload != "" {
			args = []string{preloadScript, "apm-csi-init", lib.Source, path.Join(initMountPath, lib.Target),
				path.Join(initMountPath, volumeattrs.PreloadFile), spec.Preload}
		}
		out = append(out, corev1.Container{
			Name:                     InitContainerPrefix + keys[i],
			Image:                    lib.Image,
			ImagePullPolicy:          corev1.PullIfNotPresent,
			Command:                  []string{"sh", "-c"},
			Args:                     args,
			Resources:                *initContainerResources.DeepCopy(),
			SecurityContext:          restrictedSecurityContext(),
			VolumeMounts:             []corev1.VolumeMount{{Name: VolumeName, MountPath: initMountPath}},
			TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
		})
	}
	return out
}
