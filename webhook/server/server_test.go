package server

import (
	"context"
	"log/slog"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/version"
)

func TestSlimNodeKeepsWhatTheModeDecisionReads(t *testing.T) {
	full := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", ResourceVersion: "7", Labels: map[string]string{"pool": "a"},
			Annotations: map[string]string{"big": "x"}, ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}},
		Spec: corev1.NodeSpec{PodCIDR: "10.0.0.0/24", Taints: []corev1.Taint{{Key: "k", Effect: corev1.TaintEffectNoSchedule}}},
		Status: corev1.NodeStatus{
			Images:   []corev1.ContainerImage{{Names: []string{"a"}, SizeBytes: 1}},
			NodeInfo: corev1.NodeSystemInfo{KubeletVersion: "v1.35.0", ContainerRuntimeVersion: "containerd://2.2.0", OperatingSystem: "linux", MachineID: "m"},
		},
	}
	out, err := slimNode(full)
	if err != nil {
		t.Fatal(err)
	}
	n := out.(*corev1.Node)
	if n.Name != "n1" || n.ResourceVersion != "7" || n.Labels["pool"] != "a" || len(n.Spec.Taints) != 1 ||
		n.Status.NodeInfo.ContainerRuntimeVersion != "containerd://2.2.0" || n.Status.NodeInfo.KubeletVersion != "v1.35.0" || n.Status.NodeInfo.OperatingSystem != "linux" {
		t.Errorf("lost a field the decision reads: %+v", n)
	}
	if len(n.Annotations) != 0 || len(n.ManagedFields) != 0 || len(n.Status.Images) != 0 || n.Spec.PodCIDR != "" || n.Status.NodeInfo.MachineID != "" {
		t.Errorf("kept a field the decision never reads: %+v", n)
	}
}

type versions struct{}

func (versions) ServerVersion() (*version.Info, error) {
	return &version.Info{GitVersion: "v1.35.2"}, nil
}

func TestServerVersionIsReadAtStart(t *testing.T) {
	sv := &ServerVersion{Discovery: versions{}, Log: slog.New(slog.DiscardHandler)}
	if sv.Get() != "" {
		t.Fatal("a version before reading")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- sv.Start(ctx) }()
	// The first read happens at once, not after the refresh interval.
	if err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, 10*time.Second, true, func(context.Context) (bool, error) {
		return sv.Get() != "", nil
	}); err != nil {
		t.Fatalf("version not read: %v", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if sv.Get() != "v1.35.2" {
		t.Errorf("version = %q", sv.Get())
	}
}

func TestSlimPodKeepsWhatEventsAndTheDriftCheckRead(t *testing.T) {
	full := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop", UID: "u1", ResourceVersion: "9",
			Labels:          map[string]string{"app": "web", "admission.datadoghq.com/enabled": "false", "apm-csi.io/volumes": "enabled"},
			Annotations:     map[string]string{"apm-csi.io/injection-status": "injected: csi mode", corev1.MirrorPodAnnotationKey: "abc", "big": "x"},
			OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-1"}},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app"}}},
	}
	out, err := slimPod(full)
	if err != nil {
		t.Fatal(err)
	}
	p := out.(*metav1.PartialObjectMetadata)
	if p.Name != "web" || p.UID != "u1" || p.Labels["admission.datadoghq.com/enabled"] != "false" || p.Labels["apm-csi.io/volumes"] != "enabled" ||
		p.Annotations["apm-csi.io/injection-status"] == "" || p.Annotations[corev1.MirrorPodAnnotationKey] != "abc" {
		t.Errorf("lost a field the checks read: %+v", p.ObjectMeta)
	}
	if len(p.Labels) != 2 || len(p.Annotations) != 2 || len(p.OwnerReferences) != 0 || len(p.ManagedFields) != 0 {
		t.Errorf("kept a field no check reads: %+v", p.ObjectMeta)
	}
}
