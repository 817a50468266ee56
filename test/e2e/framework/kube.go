package framework

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/images"
	"github.com/apm-csi/apm-csi/test/localcluster"
)

// LibraryVolumeName is the volume the webhook adds (webhook/mutation.VolumeName).
const LibraryVolumeName = "apm-csi-libraries"

// LibraryMountPath is where the direct layout mounts the libraries.
const LibraryMountPath = "/datadog-lib"

// BusyboxPod is a pod that runs a shell command (then sleeps, so it stays Ready) in the
// busybox image every local cluster has. It carries no instrumentation of its own.
func BusyboxPod(ns, name, script string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name:    "app",
				Image:   images.BusyboxRef,
				Command: []string{"sh", "-c", script + "\nexec sleep 3600"},
			}},
			TerminationGracePeriodSeconds: Ptr[int64](1),
		},
	}
}

// RestrictedSecurity makes a pod comply with Pod Security "restricted".
func RestrictedSecurity(p *corev1.Pod, uid int64) {
	p.Spec.SecurityContext = &corev1.PodSecurityContext{
		RunAsNonRoot:   Ptr(true),
		RunAsUser:      Ptr(uid),
		RunAsGroup:     Ptr(uid),
		SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
	for i := range p.Spec.Containers {
		p.Spec.Containers[i].SecurityContext = &corev1.SecurityContext{
			AllowPrivilegeEscalation: Ptr(false),
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		}
	}
}

// LibraryVolume returns the pod's apm-csi library volume, or nil.
func LibraryVolume(p *corev1.Pod) *corev1.Volume {
	for i := range p.Spec.Volumes {
		v := &p.Spec.Volumes[i]
		if v.Name == LibraryVolumeName && v.CSI != nil && v.CSI.Driver == names.DriverName {
			return v
		}
	}
	return nil
}

// CSIVolumes returns the names of the pod's apm-csi volumes, inline or through a claim.
func CSIVolumes(ctx context.Context, cs kubernetes.Interface, p *corev1.Pod) ([]string, error) {
	var out []string
	for _, v := range p.Spec.Volumes {
		switch {
		case v.CSI != nil && v.CSI.Driver == names.DriverName:
			out = append(out, v.Name)
		case v.PersistentVolumeClaim != nil:
			pvc, err := cs.CoreV1().PersistentVolumeClaims(p.Namespace).Get(ctx, v.PersistentVolumeClaim.ClaimName, metav1.GetOptions{})
			if err != nil {
				return nil, err
			}
			pv, err := cs.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
			if err != nil {
				return nil, err
			}
			if pv.Spec.CSI != nil && pv.Spec.CSI.Driver == names.DriverName {
				// kubelet names a PV's mount dir after the PV, not the pod volume.
				out = append(out, pv.Name)
			}
		}
	}
	return out, nil
}

// PodReady reports the pod's Ready condition.
func PodReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// CreatePod creates a pod and returns it as admitted.
func CreatePod(ctx context.Context, cs kubernetes.Interface, p *corev1.Pod) (*corev1.Pod, error) {
	return cs.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
}

// WaitPodReady waits until the pod is Ready and returns it. The error describes the pod's
// state and its recent events, which say why a volume did not mount.
func WaitPodReady(ctx context.Context, cs kubernetes.Interface, ns, name string, timeout time.Duration) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := Poll(ctx, timeout, "pod "+ns+"/"+name+" to be Ready", func() (bool, error) {
		p, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pod = p
		if p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded {
			return false, fmt.Errorf("pod %s/%s ended %s", ns, name, p.Status.Phase)
		}
		return PodReady(p), nil
	})
	if err != nil {
		return pod, fmt.Errorf("%w\n%s", err, DescribePod(ctx, cs, ns, name))
	}
	return pod, nil
}

// DescribePod summarises a pod's phase, container states and events.
func DescribePod(ctx context.Context, cs kubernetes.Interface, ns, name string) string {
	var b strings.Builder
	p, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		fmt.Fprintf(&b, "pod %s/%s: %v\n", ns, name, err)
	} else {
		fmt.Fprintf(&b, "pod %s/%s: phase %s\n", ns, name, p.Status.Phase)
		for _, s := range p.Status.ContainerStatuses {
			fmt.Fprintf(&b, "  container %s ready=%v restarts=%d state=%+v\n", s.Name, s.Ready, s.RestartCount, s.State)
		}
	}
	ev, err := cs.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err == nil {
		for _, e := range ev.Items {
			fmt.Fprintf(&b, "  event %s %s (x%d): %s\n", e.Type, e.Reason, e.Count, e.Message)
		}
	}
	return b.String()
}

// DeletePod deletes a pod (grace 1 s) and waits until it is gone.
func DeletePod(ctx context.Context, cs kubernetes.Interface, ns, name string) error {
	p, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := cs.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: Ptr[int64](1)}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return WaitPodGone(ctx, cs, ns, name, p.UID, 3*time.Minute)
}

// WaitPodGone waits until the pod with that UID no longer exists.
func WaitPodGone(ctx context.Context, cs kubernetes.Interface, ns, name string, uid types.UID, timeout time.Duration) error {
	return Poll(ctx, timeout, "pod "+ns+"/"+name+" to be gone", func() (bool, error) {
		p, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return err == nil && p.UID != uid, nil
	})
}

// Exec runs a command in a pod's container (kubectl exec) and returns its output.
func Exec(ctx context.Context, c *localcluster.Cluster, ns, pod, container string, cmd ...string) (string, error) {
	args := []string{"exec", "-n", ns, pod}
	if container != "" {
		args = append(args, "-c", container)
	}
	return c.Kubectl(ctx, append(append(args, "--"), cmd...)...)
}

// EnvValue returns the value a container's env list gives name ("" if unset).
func EnvValue(c corev1.Container, name string) string {
	v := ""
	for _, e := range c.Env {
		if e.Name == name {
			v = e.Value
		}
	}
	return v
}

// Ptr returns a pointer to v.
func Ptr[T any](v T) *T { return &v }
