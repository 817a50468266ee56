package nodeplugin

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/apm-csi/apm-csi/test/testenv"
)

// Sizes of BenchmarkNodePluginStartToReady.
const (
	startupVolumes = 2000
	startupRuns    = 9
)

// readyLine is what apm-csi-node logs once it is ready, right before kubelet can see its
// registration socket (Probe answers ready from the same moment).
const readyLine = "serving kubelet plugin registration"

// BenchmarkNodePluginStartToReady: the built apm-csi-node, from exec until it is ready
// (answers Probe ready and registers with kubelet), with no record and with the records and
// mounts of 2,000 writable library volumes that an earlier process published, as after a
// plugin upgrade on a busy node. It reports the medians of the wall time (start-*-ms) and of
// the CPU time the process used until then (start-*-cpu-ms, every thread's run time from
// /proc), and the ratios:
//
//	empty-node    no record, before any volume is published (the node has no such mounts)
//	empty         no record, in its own state dir, on the node holding the 2,000 volumes,
//	              interleaved with the next
//	2000          the 2,000 volumes' state dir
//
//	go test -run '^$' -bench NodePluginStartToReady -benchtime 1x -timeout 20m ./test/integration/nodeplugin/
func BenchmarkNodePluginStartToReady(b *testing.B) {
	testenv.RequireRoot(b)
	e := newBinaryEnv(b)
	emptyState, fullState := filepath.Join(e.root, "state-empty"), filepath.Join(e.root, "state-2000")

	type start struct{ wall, cpu time.Duration }
	measure := func(state string) start {
		cmd, wall, cpu, drained := e.startTimed(b, state)
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			b.Fatal(err)
		}
		<-drained
		if err := cmd.Wait(); err != nil {
			b.Fatalf("exit after SIGTERM: %v", err)
		}
		return start{wall, cpu}
	}
	var emptyNode, empty, full []start
	measure(emptyState) // a first start makes the state dir
	for range startupRuns {
		emptyNode = append(emptyNode, measure(emptyState))
	}

	// The earlier process: it publishes the volumes and is stopped as a DaemonSet pod is
	// replaced; the mounts stay. At the end a last one unpublishes them, as kubelet would.
	target := func(i int) string {
		return filepath.Join(e.kubelet, "pods", fmt.Sprintf("uid-%d", i), "volumes", "kubernetes.io~csi", "lib", "mount")
	}
	e.withPlugin(b, fullState, func(node csi.NodeClient) {
		for i := range startupVolumes {
			if err := os.MkdirAll(filepath.Dir(target(i)), 0o750); err != nil {
				b.Fatal(err)
			}
			if _, err := node.NodePublishVolume(context.Background(), e.libraryRequest(fmt.Sprintf("csi-lib-%d", i), target(i)), grpc.WaitForReady(true)); err != nil {
				b.Fatalf("publish %d: %v", i, err)
			}
		}
	})
	b.Cleanup(func() {
		e.withPlugin(b, fullState, func(node csi.NodeClient) {
			for i := range startupVolumes {
				if _, err := node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprintf("csi-lib-%d", i), TargetPath: target(i)}); err != nil {
					b.Errorf("unpublish %d: %v", i, err)
				}
			}
		})
	})

	for range startupRuns {
		empty = append(empty, measure(emptyState))
		full = append(full, measure(fullState))
	}
	median := func(s []start, f func(start) time.Duration) time.Duration {
		v := make([]time.Duration, len(s))
		for i := range s {
			v[i] = f(s[i])
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	wall := func(s start) time.Duration { return s.wall }
	cpu := func(s start) time.Duration { return s.cpu }
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	for _, arm := range []struct {
		name   string
		starts []start
	}{{"empty-node", emptyNode}, {"empty", empty}, {"2000", full}} {
		b.ReportMetric(ms(median(arm.starts, wall)), "start-"+arm.name+"-ms")
		b.ReportMetric(ms(median(arm.starts, cpu)), "start-"+arm.name+"-cpu-ms")
	}
	for _, base := range []struct {
		name   string
		starts []start
	}{{"empty-node", emptyNode}, {"empty", empty}} {
		b.ReportMetric(float64(median(full, wall))/float64(median(base.starts, wall)), "start-2000/"+base.name+"-x")
		b.ReportMetric(float64(median(full, cpu))/float64(median(base.starts, cpu)), "start-2000/"+base.name+"-cpu-x")
	}
	b.ReportMetric(0, "ns/op")
}

// withPlugin runs the binary over state while f calls it, then stops it with SIGTERM.
func (e *binaryEnv) withPlugin(tb testing.TB, state string, f func(csi.NodeClient)) {
	tb.Helper()
	cmd, _, _, drained := e.startTimed(tb, state)
	conn, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	f(csi.NewNodeClient(conn))
	conn.Close()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		tb.Fatal(err)
	}
	<-drained
	if err := cmd.Wait(); err != nil {
		tb.Fatalf("exit after SIGTERM: %v", err)
	}
}

// startTimed execs the binary over state (no prefetch, no health or metrics server, so that
// nothing but the start-up runs) and returns once it logs that it is ready, with the wall time
// since exec and the CPU time the process used until then. drained is closed when its
// standard error is read to the end (before cmd.Wait).
func (e *binaryEnv) startTimed(tb testing.TB, state string) (cmd *exec.Cmd, wall, cpu time.Duration, drained <-chan struct{}) {
	tb.Helper()
	cmd = exec.Command(e.bin, "--kubelet-dir", e.kubelet, "--health-addr", "", "--metrics-addr", "", "--config", e.config,
		"--insecure-registry", e.reg.Addr(), "--allowed-repository", e.reg.Addr())
	cmd.Env = append(os.Environ(), "APM_CSI_STATE_DIR="+state, "APM_CSI_NODE_ID=node-bin")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		tb.Fatal(err)
	}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, cmd)
	e.mu.Unlock()
	var seen []string
	lines := bufio.NewScanner(stderr)
	for lines.Scan() {
		if strings.Contains(lines.Text(), readyLine) {
			wall = time.Since(t0)
			cpu = processRunTime(tb, cmd.Process.Pid)
			break
		}
		seen = append(seen, lines.Text())
	}
	if wall == 0 {
		tb.Fatalf("apm-csi-node ended without logging %q:\n%s", readyLine, strings.Join(seen, "\n"))
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(io.Discard, stderr)
	}()
	return cmd, wall, cpu, done
}

// processRunTime is the CPU time every thread of pid has run, from /proc/<pid>/task/*/schedstat
// (nanoseconds, where /proc/<pid>/stat counts clock ticks).
func processRunTime(tb testing.TB, pid int) time.Duration {
	tb.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		tb.Fatal(err)
	}
	var total time.Duration
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			continue // the thread ended meanwhile
		}
		ns, err := strconv.ParseInt(strings.Fields(string(b))[0], 10, 64)
		if err != nil {
			tb.Fatalf("schedstat of %d/%s: %q", pid, t.Name(), b)
		}
		total += time.Duration(ns)
	}
	return total
}
