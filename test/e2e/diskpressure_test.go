package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/apm-csi/apm-csi/test/images"
	"github.com/apm-csi/apm-csi/test/localcluster"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// pressureDisk is where the disk-pressure test keeps the backing file of its own small
// filesystem: a sparse file, so at most its size is ever written to this machine's disk.
const (
	pressureImage = "/var/lib/apm-csi-localcluster-pressure.img"
	pressureMount = "/var/lib/apm-csi-localcluster-pressure"
	pressureSize  = "2G"
)

// mountPressureDisk makes a 2 GiB ext4 filesystem of its own (loop device) and mounts it: the
// node's kubelet dir (nodefs) and containerd's root (imagefs) go there, so the test fills
// that filesystem and never this shared machine's root filesystem.
func mountPressureDisk(t *testing.T) string {
	t.Helper()
	_ = unix.Unmount(pressureMount, unix.MNT_DETACH) // a crashed run's
	_ = os.Remove(pressureImage)
	for _, cmd := range [][]string{
		{"truncate", "-s", pressureSize, pressureImage},
		{"mkfs.ext4", "-q", "-F", "-m", "0", pressureImage},
	} {
		if out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", cmd, err, out)
		}
	}
	if err := os.MkdirAll(pressureMount, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", pressureImage, pressureMount).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v\n%s", pressureImage, err, out)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(pressureMount, 0); err != nil {
			t.Logf("unmount %s: %v; detaching it", pressureMount, err)
			_ = unix.Unmount(pressureMount, unix.MNT_DETACH)
		}
		_ = os.Remove(pressureImage)
	})
	return pressureMount
}

func nodeCondition(ctx context.Context, cs kubernetes.Interface, node string, typ corev1.NodeConditionType) corev1.ConditionStatus {
	n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return corev1.ConditionUnknown
	}
	for _, c := range n.Status.Conditions {
		if c.Type == typ {
			return c.Status
		}
	}
	return corev1.ConditionUnknown
}

func freeBytes(t *testing.T, dir string) (free, total uint64) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return st.Bavail * uint64(st.Bsize), st.Blocks * uint64(st.Bsize)
}

// TestLocalClusterRecoversFromDiskPressure: the disk holding the node's kubelet dir and
// containerd's images is filled for a minute; the node reports DiskPressure (and evicts its
// pod), image garbage collection keeps the pinned images (pause, busybox); once the space is
// freed the node leaves DiskPressure on its own and a new pod starts, with nothing imported
// by hand.
func TestLocalClusterRecoversFromDiskPressure(t *testing.T) {
	testenv.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	disk := mountPressureDisk(t)
	c, err := localcluster.Up(ctx, localcluster.Options{
		Root:           os.Getenv("APM_CSI_CLUSTER_ROOT"),
		KubeletDir:     filepath.Join(disk, "kubelet"),
		ContainerdRoot: filepath.Join(disk, "containerd"),
		Logf:           t.Logf,
	})
	if err != nil {
		t.Fatalf("up: %v", err)
	}
	t.Cleanup(func() {
		downCtx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if err := c.Down(downCtx); err != nil {
			t.Errorf("down: %v", err)
		}
	})
	cs, err := c.Clientset()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.CreateNamespace(ctx, smokeNamespace); err != nil {
		t.Fatal(err)
	}
	busybox := func(name string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: smokeNamespace},
			Spec: corev1.PodSpec{
				Containers:                    []corev1.Container{{Name: "busybox", Image: images.BusyboxRef, Command: []string{"sleep", "3600"}}},
				TerminationGracePeriodSeconds: ptrTo[int64](1),
			},
		}
	}
	running := func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning }
	if _, err := cs.CoreV1().Pods(smokeNamespace).Create(ctx, busybox("before"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPod(t, ctx, cs, "before", running)

	// Fill the filesystem to 99%: below every eviction threshold and above image GC's.
	free, total := freeBytes(t, disk)
	fill := filepath.Join(disk, "fill")
	if out, err := exec.Command("fallocate", "-l", itoa(int64(free)-int64(total)/100), fill).CombinedOutput(); err != nil {
		t.Fatalf("fallocate: %v\n%s", err, out)
	}
	filled := time.Now()
	t.Cleanup(func() { _ = os.Remove(fill) })
	waitFor(t, ctx, "the node to report DiskPressure", func() bool {
		return nodeCondition(ctx, cs, c.NodeName(), corev1.NodeDiskPressure) == corev1.ConditionTrue
	})
	t.Logf("MEASURE DiskPressure reported %s after the disk was filled", time.Since(filled).Round(time.Second))
	// A minute of pressure: the kubelet's eviction manager and image GC run meanwhile.
	time.Sleep(time.Until(filled.Add(time.Minute)))
	pinned, err := c.PinnedImages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{images.PauseRef, images.BusyboxRef} {
		if !slices.Contains(pinned, ref) {
			t.Errorf("%s was removed under disk pressure (pinned now: %v)", ref, pinned)
		}
	}

	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	waitFor(t, ctx, "the node to leave DiskPressure", func() bool {
		return nodeCondition(ctx, cs, c.NodeName(), corev1.NodeDiskPressure) == corev1.ConditionFalse
	})
	t.Logf("MEASURE DiskPressure cleared %s after the disk was freed", time.Since(freed).Round(time.Second))
	if _, err := cs.CoreV1().Pods(smokeNamespace).Create(ctx, busybox("after"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPod(t, ctx, cs, "after", running)
	t.Logf("MEASURE new pod running %s after the disk was freed", time.Since(freed).Round(time.Second))
}

func itoa(n int64) string {
	if n < 0 {
		n = 0
	}
	return strconv.FormatInt(n, 10)
}
