package main

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestLineDiff(t *testing.T) {
	colour = false
	got := lineDiff("a\nb\nc\n", "a\nx\nb\nd\n")
	want := "  a\n+ x\n  b\n+ d\n- c"
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

// The view of a pod shows only what the webhook may change: not the token volume the API
// server adds, not the labels the ReplicaSet adds.
func TestPodView(t *testing.T) {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Labels:      map[string]string{"pod-template-hash": "x"},
			Annotations: map[string]string{"apm-csi.io/injection-status": "injected", "other": "y"},
		},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{Name: "app", Image: "img", VolumeMounts: []corev1.VolumeMount{
				{Name: "kube-api-access-abcde", MountPath: "/var/run/secrets"}, {Name: "apm-csi-libraries", MountPath: "/datadog-lib"},
			}}},
			Volumes: []corev1.Volume{{Name: "kube-api-access-abcde"}, {Name: "apm-csi-libraries"}},
		},
	}
	v := podView(p)
	for _, absent := range []string{"kube-api-access", "pod-template-hash", "other"} {
		if strings.Contains(v, absent) {
			t.Errorf("view shows %s:\n%s", absent, v)
		}
	}
	for _, present := range []string{"apm-csi.io/injection-status", "mountPath: /datadog-lib", "name: apm-csi-libraries"} {
		if !strings.Contains(v, present) {
			t.Errorf("view lacks %s:\n%s", present, v)
		}
	}
}
