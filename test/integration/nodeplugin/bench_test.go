package nodeplugin

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/apm-csi/apm-csi/test/nodeplugintest"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// benchmarkPublish measures NodePublishVolume over the real gRPC server and real mounts; the
// matching unpublish runs with the timer stopped. Besides the mean (ns/op) it reports the
// median, 90th and 99th percentile of the publish calls.
func benchmarkPublish(b *testing.B, attrs map[string]string, readonly bool) {
	p := startPlugin(b)
	durations := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		id := fmt.Sprintf("csi-%d", i)
		target := p.Target(fmt.Sprintf("pod-%d", i), "v")
		b.StartTimer()
		start := time.Now()
		if err := p.Publish(id, target, attrs, readonly); err != nil {
			b.Fatal(err)
		}
		durations = append(durations, time.Since(start))
		b.StopTimer()
		if err := p.Unpublish(id, target); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	slices.Sort(durations)
	b.ReportMetric(float64(durations[len(durations)/2].Nanoseconds()), "median-ns/publish")
	b.ReportMetric(float64(durations[len(durations)*9/10].Nanoseconds()), "p90-ns/publish")
	b.ReportMetric(float64(durations[len(durations)*99/100].Nanoseconds()), "p99-ns/publish")
}

func BenchmarkNodePublishHostDir(b *testing.B) {
	benchmarkPublish(b, nodeplugintest.Ephemeral(hostdirData, "bench"), false)
}

func BenchmarkNodePublishHostDirReadOnly(b *testing.B) {
	benchmarkPublish(b, nodeplugintest.Ephemeral(hostdirData, "bench"), true)
}

func BenchmarkNodePublishLibraryOverlay(b *testing.B) {
	benchmarkPublish(b, nodeplugintest.Ephemeral(injectorAttrs(), "bench"), false)
}

// BenchmarkNodePluginIdleRSS starts the built apm-csi-node (flags, environment and --config as
// TestBinary runs it) b.N times and reports the medians of its resident memory once it is
// ready and has prefetched its library (idle-RSS-KiB) and after it served a library volume of
// two libraries (served-RSS-KiB), and the size of the static binary (binary-bytes).
//
//	go test -run '^$' -bench NodePluginIdleRSS -benchtime 5x ./test/integration/nodeplugin/
func BenchmarkNodePluginIdleRSS(b *testing.B) {
	testenv.RequireRoot(b)
	e := newBinaryEnv(b)
	fi, err := os.Stat(e.bin)
	if err != nil {
		b.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	node := csi.NewNodeClient(conn)

	var idle, served []int
	for i := 0; i < b.N; i++ {
		cmd, logs := e.start(b)
		e.waitPrefetched(b, logs)
		idle = append(idle, rssKiB(b, cmd.Process.Pid))
		target := filepath.Join(e.kubelet, "pods", fmt.Sprintf("uid-%d", i), "volumes", "kubernetes.io~csi", "lib", "mount")
		if _, err := node.NodePublishVolume(context.Background(), e.libraryRequest(fmt.Sprintf("csi-lib-%d", i), target), grpc.WaitForReady(true)); err != nil {
			b.Fatalf("library publish: %v\n%s", err, logs.String())
		}
		served = append(served, rssKiB(b, cmd.Process.Pid))
		if _, err := node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprintf("csi-lib-%d", i), TargetPath: target}); err != nil {
			b.Fatal(err)
		}
		e.stop(b, cmd, logs)
	}
	median := func(v []int) float64 {
		slices.Sort(v)
		return float64(v[len(v)/2])
	}
	b.ReportMetric(median(idle), "idle-RSS-KiB")
	b.ReportMetric(median(served), "served-RSS-KiB")
	b.ReportMetric(float64(fi.Size()), "binary-bytes")
	b.ReportMetric(0, "ns/op")
}
