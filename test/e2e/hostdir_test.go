package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/e2e/framework"
	"github.com/apm-csi/apm-csi/webhook/annotations"
)

// hostDirPod mounts the e2e-data hostdir entry at /data through an inline CSI volume.
func hostDirPod(ns, name string) *corev1.Pod {
	p := framework.BusyboxPod(ns, name, "true")
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "data", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver: names.DriverName, VolumeAttributes: map[string]string{"type": "hostdir", "name": dataEntry},
	}}})
	p.Spec.Containers[0].VolumeMounts = append(p.Spec.Containers[0].VolumeMounts, corev1.VolumeMount{Name: "data", MountPath: "/data"})
	return p
}

// A file written into a hostdir volume outlives the pod: the pod is deleted and
// created again and reads it back; a pod asking for the same directory with the manual
// volume annotation reads it too.
func scenarioHostDir(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, "e2e-hostdir", nil)
	token := uniqueToken()
	first := createReady(t, ctx, e, hostDirPod(ns, "keeper"))
	execIn(t, ctx, e, first, "sh", "-c", "echo "+token+" > /data/keeper.txt")
	m := oneMount(t, e, first, "data")
	if m.FSType == "overlay" {
		t.Errorf("a hostdir volume is an overlay: %+v", m)
	}
	checkNoSuidNoDev(t, m)
	if err := framework.DeletePod(ctx, e.cs, ns, first.Name); err != nil {
		t.Fatal(err)
	}
	if err := framework.Poll(ctx, time.Minute, "the deleted pod's hostdir mount to go", func() (bool, error) {
		all, err := framework.Mounts()
		return err == nil && len(framework.MountsAt(all, framework.CSIMountDir(e.c.KubeletDir(), first.UID, "data"))) == 0, err
	}); err != nil {
		t.Error(err)
	}
	if data, err := os.ReadFile(filepath.Join(e.dataDir, "keeper.txt")); err != nil || strings.TrimSpace(string(data)) != token {
		t.Errorf("the host directory holds %q (%v), want %s", data, err, token)
	}

	again := createReady(t, ctx, e, hostDirPod(ns, "keeper"))
	if again.UID == first.UID {
		t.Fatal("the pod was not re-created")
	}
	if got := strings.TrimSpace(execIn(t, ctx, e, again, "cat", "/data/keeper.txt")); got != token {
		t.Errorf("the re-created pod reads %q, want %s", got, token)
	}

	manual := framework.BusyboxPod(ns, "manual", "true")
	manual.Labels[annotations.Volumes] = annotations.VolumesEnabled
	manual.Annotations = map[string]string{annotations.VolumePrefix + "data": "hostdir=" + dataEntry + "; mountPath=/data"}
	mp := createReady(t, ctx, e, manual)
	if !slices.ContainsFunc(mp.Spec.Volumes, func(v corev1.Volume) bool {
		return v.Name == "data" && v.CSI != nil && v.CSI.VolumeAttributes["type"] == "hostdir" && v.CSI.VolumeAttributes["name"] == dataEntry
	}) {
		t.Errorf("the manual annotation did not become a hostdir volume: %+v", mp.Spec.Volumes)
	}
	if got := strings.TrimSpace(execIn(t, ctx, e, mp, "cat", "/data/keeper.txt")); got != token {
		t.Errorf("the pod with the manual annotation reads %q, want %s", got, token)
	}
}

// The agent sidecar in the node plugin's pod writes a file every second into a
// host directory; application pods read it, live, through a static PersistentVolume and a
// ReadOnlyMany claim of the apm-csi driver, and cannot write to it.
func scenarioSharedPV(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, sharedNamespace, nil)
	pvName := "e2e-" + sharedEntry
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: pvName},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Mi")},
			AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			StorageClassName:              "",
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: names.DriverName, VolumeHandle: sharedEntry, ReadOnly: true,
				VolumeAttributes: map[string]string{"type": "hostdir", "name": sharedEntry},
			}},
		},
	}
	if _, err := e.cs.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = e.cs.CoreV1().PersistentVolumes().Delete(context.Background(), pvName, metav1.DeleteOptions{})
	})
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: sharedEntry, Namespace: ns},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			StorageClassName: framework.Ptr(""),
			VolumeName:       pvName,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Mi")}},
		},
	}
	if _, err := e.cs.CoreV1().PersistentVolumeClaims(ns).Create(ctx, pvc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := framework.Poll(ctx, 2*time.Minute, "the claim to bind", func() (bool, error) {
		got, err := e.cs.CoreV1().PersistentVolumeClaims(ns).Get(ctx, pvc.Name, metav1.GetOptions{})
		return err == nil && got.Status.Phase == corev1.ClaimBound, nil
	}); err != nil {
		t.Fatal(err)
	}

	for _, name := range []string{"reader-1", "reader-2"} {
		p := framework.BusyboxPod(ns, name, "true")
		p.Spec.Volumes = []corev1.Volume{{Name: "shared", VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: pvc.Name, ReadOnly: true},
		}}}
		p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "shared", MountPath: "/shared", ReadOnly: true}}
		r := createReady(t, ctx, e, p)
		if m := oneMount(t, e, r, pvName); !m.ReadOnly() {
			t.Errorf("the ReadOnlyMany volume is mounted read-write on the node: %+v", m)
		}
		seq := func() int {
			var doc struct {
				WrittenBy string `json:"writtenBy"`
				Seq       int    `json:"seq"`
			}
			out := execIn(t, ctx, e, r, "cat", "/shared/config.json")
			if err := json.Unmarshal([]byte(out), &doc); err != nil || doc.WrittenBy != agentSidecar {
				t.Fatalf("%s reads %q from the sidecar's file (%v)", name, out, err)
			}
			return doc.Seq
		}
		first := seq()
		if err := framework.Poll(ctx, time.Minute, name+" to see the sidecar's next write", func() (bool, error) {
			return seq() != first, nil
		}); err != nil {
			t.Error(err)
		}
		out, err := framework.Exec(ctx, e.c, ns, name, "", "touch", "/shared/written-by-app")
		if err == nil || !strings.Contains(err.Error(), "Read-only file system") {
			t.Errorf("%s could write into the read-only volume: %q %v", name, out, err)
		}
	}

	// A pod whose inline CSI volume of the read-only entry is not readOnly is refused at mount:
	// the container runtime would remount its bind of the volume read-write (runc 1.2 and
	// newer do for a volumeMount that is not readOnly).
	notAsking := framework.BusyboxPod(ns, "not-asking-read-only", "true")
	notAsking.Spec.Volumes = []corev1.Volume{{Name: "shared", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver: names.DriverName, VolumeAttributes: map[string]string{"type": "hostdir", "name": sharedEntry},
	}}}}
	notAsking.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "shared", MountPath: "/shared"}}
	if _, err := framework.CreatePod(ctx, e.cs, notAsking); err != nil {
		t.Fatal(err)
	}
	failed := waitFailedMount(t, ctx, e, ns, notAsking.Name, "the refused mount of a read-only entry without readOnly")
	for _, want := range []string{"FailedPrecondition", `hostdir entry "` + sharedEntry + `" is read-only on this node`, "readOnly: true under the pod's csi: volume source"} {
		if !strings.Contains(failed, want) {
			t.Errorf("the FailedMount event lacks %q: %s", want, failed)
		}
	}

	// With readOnly: true on the CSI volume source, a container whose volumeMount does not ask
	// for read-only still cannot write: kubelet mounts the volume read-only into it.
	p := framework.BusyboxPod(ns, "csi-read-only", "true")
	p.Spec.Volumes = []corev1.Volume{{Name: "shared", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver: names.DriverName, ReadOnly: framework.Ptr(true), VolumeAttributes: map[string]string{"type": "hostdir", "name": sharedEntry},
	}}}}
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "shared", MountPath: "/shared"}}
	inline := createReady(t, ctx, e, p)
	if m := oneMount(t, e, inline, "shared"); !m.ReadOnly() {
		t.Errorf("the read-only hostdir entry %s is mounted read-write on the node: %+v", sharedEntry, m)
	}
	out, err := framework.Exec(ctx, e.c, ns, inline.Name, "", "touch", "/shared/written-by-app")
	if err == nil || !strings.Contains(err.Error(), "Read-only file system") {
		t.Errorf("a pod wrote into the read-only hostdir entry %s: %q %v", sharedEntry, out, err)
	}
	if _, err := os.Stat(filepath.Join(e.shared, "written-by-app")); err == nil {
		t.Error("an application pod wrote into the agent's directory")
	}
}

// A hostdir volume in a namespace the admission policy does not list: `kubectl apply` is
// refused by the ValidatingAdmissionPolicy with its message, and no pod exists.
func scenarioHostDirRefusedAtAdmission(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, deniedNamespace, nil)
	p := hostDirPod(ns, "hostdir-denied")
	p.TypeMeta = metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"}
	out, err := e.c.Kubectl(ctx, "apply", "-f", writeManifest(t, p))
	if err == nil {
		t.Fatalf("kubectl apply accepted a hostdir volume in namespace %s: %s", ns, out)
	}
	t.Logf("kubectl apply: %v", err)
	for _, want := range []string{
		"ValidatingAdmissionPolicy", "apm-csi-hostdir-namespaces",
		"apm-csi: host directory volume data (type hostdir, entry " + dataEntry + ") is not allowed in namespace " + ns,
		"Helm value admissionPolicy.hostdirNamespaces",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("kubectl apply failed without %q:\n%v", want, err)
		}
	}
	if _, err := e.cs.CoreV1().Pods(ns).Get(ctx, p.Name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the refused pod exists: %v", err)
	}
}

// A pod in a namespace where the admission policy admits hostdir volumes writes an inline
// volume naming an entry whose namespaces do not include its own (the webhook is not involved:
// nothing asks it to). The node plugin refuses the mount with PermissionDenied, which kubelet
// shows in the pod's events; the pod never starts. The same request through the webhook's
// manual annotation is refused at admission.
func scenarioHostDirTenancyAtMount(t *testing.T, ctx context.Context, e *env) {
	ns := namespace(t, ctx, e, bypassNamespace, nil)
	p, err := framework.CreatePod(ctx, e.cs, hostDirPod(ns, "other-teams-dir"))
	if err != nil {
		t.Fatalf("the admission policy refused a hostdir volume in listed namespace %s: %v", ns, err)
	}
	failed := waitFailedMount(t, ctx, e, ns, p.Name, "the refused mount")
	t.Logf("FailedMount: %s", failed)
	for _, want := range []string{"PermissionDenied", `hostdir entry "` + dataEntry + `" may not be used by pod ` + ns + "/" + p.Name,
		"namespace " + ns + " is not allowed; the entry allows namespaces " + strings.Join(dataEntryNamespaces, ", ")} {
		if !strings.Contains(failed, want) {
			t.Errorf("the FailedMount event lacks %q: %s", want, failed)
		}
	}
	if describe := framework.DescribePod(ctx, e.cs, ns, p.Name); !strings.Contains(describe, "PermissionDenied") {
		t.Errorf("the pod's description does not show the refusal:\n%s", describe)
	}
	if got, err := e.cs.CoreV1().Pods(ns).Get(ctx, p.Name, metav1.GetOptions{}); err != nil || framework.PodReady(got) || got.Status.Phase == corev1.PodRunning {
		t.Errorf("the pod started with another namespace's host directory (%v)", err)
	}

	manual := framework.BusyboxPod(ns, "manual-other-teams-dir", "true")
	manual.Labels[annotations.Volumes] = annotations.VolumesEnabled
	manual.Annotations = map[string]string{annotations.VolumePrefix + "data": "hostdir=" + dataEntry + "; mountPath=/data"}
	_, err = framework.CreatePod(ctx, e.cs, manual)
	if err == nil {
		t.Fatal("the webhook admitted a manual annotation for another namespace's entry")
	}
	t.Logf("manual annotation: %v", err)
	for _, want := range []string{"denied the request", "hostdir entry " + dataEntry + " may not be used by pods of namespace " + ns} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the webhook's denial lacks %q: %v", want, err)
		}
	}
}
