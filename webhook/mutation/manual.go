package mutation

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/repoallow"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/webhook/annotations"
)

// manualResult is what the manual volume annotations added.
type manualResult struct {
	volumes   []string
	libraries []string
	warnings  []string
}

// applyManualVolumes adds the CSI volumes that apm-csi.io/volume.<name> annotations ask for.
// Unlike SSI, these are the pod author's explicit request, so anything that cannot be done as
// written refuses the pod with a message naming the annotation and the fix.
func (m *Mutator) applyManualVolumes(pod *corev1.Pod, vols []*annotations.Volume, in Input) (manualResult, error) {
	var res manualResult
	for _, v := range vols {
		key, value := annotations.VolumePrefix+v.Name, pod.Annotations[annotations.VolumePrefix+v.Name]
		deny := func(problem, fix string) error {
			return &annotations.Error{Annotation: key, Value: value, Problem: problem, Fix: fix}
		}
		if windows, pin := windowsPod(pod); windows {
			return res, deny(fmt.Sprintf("the pod runs only on Windows nodes (%s), where the apm-csi node plugin does not run, so the volume could never be mounted", pin),
				"remove the annotation from Windows pods, or let the pod run on Linux nodes")
		}
		if v.Name == VolumeName {
			return res, deny(fmt.Sprintf("volume name %s is reserved for the libraries the webhook injects", VolumeName), "choose another name in the annotation key, e.g. "+annotations.VolumePrefix+"tracer")
		}
		if slices.ContainsFunc(pod.Spec.Volumes, func(x corev1.Volume) bool { return x.Name == v.Name }) {
			return res, deny(fmt.Sprintf("the pod already has a volume named %s", v.Name), "rename the volume in the annotation key, e.g. "+annotations.VolumePrefix+v.Name+"-apm")
		}
		entryReadOnly := false
		if v.HostDir != "" {
			if e, ok := m.cfg.HostDir(v.HostDir); ok {
				entryReadOnly = e.ReadOnly
			}
			problem, fix, warning := m.hostDirRefusal(pod, v.HostDir, in)
			if problem != "" {
				return res, deny(problem, fix)
			}
			if warning != "" {
				res.warnings = append(res.warnings, warning)
			}
		}
		spec := &volumeattrs.Spec{Kind: volumeattrs.KindHostDir, HostDir: v.HostDir, ReadOnly: v.ReadOnly}
		var recorded []string
		if v.HostDir == "" {
			spec.Kind = volumeattrs.KindLibrary
			for _, l := range v.Libraries {
				lib := volumeattrs.Library{Image: l.Image, Source: libref.LibrarySource}
				if l.Image != "" {
					if v.Source != "" {
						lib.Source = v.Source
					}
				} else if l.Version != "" {
					lib.Image = m.cfg.LanguageImage(l.Language, l.Version, "")
				} else {
					lib.Image = m.cfg.DefaultImage(l.Language)
				}
				if err := m.allowed.Check(lib.Image); err != nil {
					var nae *repoallow.NotAllowedError
					if errors.As(err, &nae) {
						return res, deny(fmt.Sprintf("library image %s is not in the repositories the node plugins serve (%s)", lib.Image, strings.Join(nae.Allowed, ", ")),
							"use an image from an allowed repository, or ask the cluster administrator to add "+nae.Repository+" to the allowed repositories (Helm: libraries.allowedRepositories; node plugin: "+repoallow.Flag+")")
					}
				}
				spec.Libraries = append(spec.Libraries, lib)
				recorded = append(recorded, v.Name+"="+lib.Image)
			}
		}
		attrs := spec.Attributes()
		if _, err := volumeattrs.Parse(attrs); err != nil {
			return res, deny(err.Error(), "correct the value as the message says")
		}

		if v.MountPath == "" {
			if !podMounts(pod, v.Name) {
				return res, deny(fmt.Sprintf("volume %s is mounted nowhere", v.Name), "add mountPath=/path, or mount volume "+v.Name+" in a container's volumeMounts")
			}
		} else {
			targets, err := m.manualTargets(pod, v)
			if err != nil {
				return res, deny(err.Error(), "list existing container names in containers=, or remove it to mount into every container")
			}
			for _, c := range targets {
				if i := slices.IndexFunc(c.VolumeMounts, func(x corev1.VolumeMount) bool { return x.MountPath == v.MountPath }); i >= 0 {
					return res, deny(fmt.Sprintf("container %s already mounts volume %s at %s", c.Name, c.VolumeMounts[i].Name, v.MountPath), "choose another mountPath")
				}
			}
			for _, c := range targets {
				c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: v.Name, MountPath: v.MountPath, ReadOnly: v.ReadOnly})
			}
		}
		pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: v.Name, VolumeSource: corev1.VolumeSource{
			CSI: &corev1.CSIVolumeSource{Driver: m.cfg.DriverName, VolumeAttributes: attrs, ReadOnly: csiReadOnly(spec, entryReadOnly)},
		}})
		res.volumes = append(res.volumes, v.Name)
		res.libraries = append(res.libraries, recorded...)
	}
	if len(res.volumes) > 0 && !in.DriverInstalled {
		res.warnings = append(res.warnings, fmt.Sprintf("apm-csi: CSI driver %s is not installed; volumes %s cannot be mounted until it is", m.cfg.DriverName, strings.Join(res.volumes, ", ")))
	}
	return res, nil
}

// manualTargets are the containers a manual volume is mounted into: the ones it lists (regular
// or init containers), else every regular container that is not excluded.
func (m *Mutator) manualTargets(pod *corev1.Pod, v *annotations.Volume) ([]*corev1.Container, error) {
	var out []*corev1.Container
	if len(v.Containers) == 0 {
		for i := range pod.Spec.Containers {
			if !slices.Contains(m.cfg.ExcludedContainers, pod.Spec.Containers[i].Name) {
				out = append(out, &pod.Spec.Containers[i])
			}
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("every container of the pod is excluded (%s)", strings.Join(m.cfg.ExcludedContainers, ", "))
		}
		return out, nil
	}
	for _, name := range v.Containers {
		if slices.Contains(m.cfg.ExcludedContainers, name) {
			return nil, fmt.Errorf("container %s is excluded by the webhook configuration", name)
		}
		c := findContainer(pod, name)
		if c == nil {
			return nil, fmt.Errorf("the pod has no container named %s (it has %s)", name, strings.Join(containerNames(pod), ", "))
		}
		out = append(out, c)
	}
	return out, nil
}

func findContainer(pod *corev1.Pod, name string) *corev1.Container {
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == name {
			return &pod.Spec.InitContainers[i]
		}
	}
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == name {
			return &pod.Spec.Containers[i]
		}
	}
	return nil
}

func containerNames(pod *corev1.Pod) []string {
	var out []string
	for _, c := range pod.Spec.InitContainers {
		out = append(out, c.Name)
	}
	for _, c := range pod.Spec.Containers {
		out = append(out, c.Name)
	}
	return out
}

func podMounts(pod *corev1.Pod, volume string) bool {
	uses := func(cs []corev1.Container) bool {
		return slices.ContainsFunc(cs, func(c corev1.Container) bool {
			return slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == volume })
		})
	}
	return uses(pod.Spec.Containers) || uses(pod.Spec.InitContainers)
}

// csiReadOnly is the readOnly of the CSI volume source the webhook writes: set (true) for a
// volume that will be read-only, so that kubelet mounts it read-only into every container and
// passes the CSI readonly flag. The node plugin refuses a read-only hostdir volume without
// that flag: a container runtime re-enables writes on a read-only bind mount whose
// volumeMount is not readOnly.
func csiReadOnly(spec *volumeattrs.Spec, entryReadOnly bool) *bool {
	if spec.ReadOnly || entryReadOnly {
		return ptr.To(true)
	}
	return nil
}
