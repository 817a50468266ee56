// Package sanity runs csi-sanity (github.com/kubernetes-csi/csi-test/v5/pkg/sanity) against the
// real apm-csi node server: real gRPC over a unix socket, real mounts, in a temporary kubelet
// dir. Root only.
package sanity

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/gomega"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/test/nodeplugintest"
)

// skipped lists the csi-sanity specs that cannot apply to a node-only driver, each with the
// reason. Everything else runs; specs that csi-sanity itself skips after asking the driver for
// its capabilities (staging, volume stats, expansion, health, group controller) are reported
// as skipped by Ginkgo with csi-sanity's own reason.
var skipped = []struct{ pattern, reason string }{
	{
		pattern: `\[Controller Server\]`,
		reason: "apm-csi has no controller service (GetPluginCapabilities advertises none): volumes are inline " +
			"ephemeral or static PersistentVolumes, never provisioned, so CreateVolume, snapshots, expansion, " +
			"ControllerGetCapabilities and ValidateVolumeCapabilities do not exist",
	},
	{
		pattern: `NodeUnpublishVolume should remove target path`,
		reason: "the spec obtains its volume from CreateVolume, which a node-only driver does not serve; " +
			"target removal on unpublish is covered by test/integration/nodeplugin with real mounts",
	},
}

// kubeletTarget turns csi-sanity's target path into kubelet's: <volumes dir>/<volume>/mount.
func kubeletTarget(p string) string {
	if p == "" {
		return p
	}
	return p + "/mount"
}

// kubeletTargets rewrites the target path of csi-sanity's publish and unpublish calls to the
// shape kubelet sends.
func kubeletTargets(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	switch r := req.(type) {
	case *csi.NodePublishVolumeRequest:
		r = proto.Clone(r).(*csi.NodePublishVolumeRequest)
		r.TargetPath = kubeletTarget(r.TargetPath)
		req = r
	case *csi.NodeUnpublishVolumeRequest:
		r = proto.Clone(r).(*csi.NodeUnpublishVolumeRequest)
		r.TargetPath = kubeletTarget(r.TargetPath)
		req = r
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

// checkPath is csi-sanity's default path check.
func checkPath(p string) (sanity.PathKind, error) {
	fi, err := os.Lstat(p)
	switch {
	case os.IsNotExist(err):
		return sanity.PathIsNotFound, nil
	case err != nil:
		return "", err
	case fi.IsDir():
		return sanity.PathIsDir, nil
	case fi.Mode().IsRegular():
		return sanity.PathIsFile, nil
	}
	return sanity.PathIsOther, nil
}

func TestSanity(t *testing.T) {
	p := nodeplugintest.New(t, nodeplugintest.Config{NodeID: "sanity-node"})
	// The driver's warnings explain a failing spec better than csi-sanity's report alone.
	p.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	hostData := filepath.Join(p.Root, "host", "data")
	// The driver accepts only kubelet's target shape,
	// <kubelet>/pods/<pod-uid>/volumes/kubernetes.io~csi/<volume>/mount. csi-sanity publishes
	// at <its target dir>/target (and /other_target): its target dir is a pod's CSI volumes
	// dir, so "target" is the volume's name, and the client below appends the "mount" that
	// kubelet appends.
	podVolumes := filepath.Join(p.Kubelet, "pods", "0b7c1e2a-sanity", "volumes", "kubernetes.io~csi")
	for _, d := range []string{podVolumes, hostData} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	set, err := hostdir.NewSet([]hostdir.Entry{{Name: "sanity", Path: hostData, Namespaces: []string{"*"}}})
	if err != nil {
		t.Fatal(err)
	}
	p.Config.HostDirs = set
	p.Start()

	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + p.Sock
	cfg.TargetPath = podVolumes
	cfg.CreateTargetDir = func(dir string) (string, error) { return dir, os.MkdirAll(dir, 0o750) }
	cfg.CheckPath = func(p string) (sanity.PathKind, error) { return checkPath(kubeletTarget(p)) }
	cfg.RemoveTargetPath = func(string) error { return nil } // the pod dir goes with the test's temporary dir
	cfg.StagingPath = filepath.Join(p.Root, "sanity-staging")
	// Setting DialOptions replaces csi-sanity's own, which include the (unix socket)
	// credentials.
	cfg.DialOptions = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithChainUnaryInterceptor(kubeletTargets)}
	// What a static PersistentVolume's volumeAttributes would hold for a declared entry.
	cfg.TestVolumeParameters = map[string]string{"type": "hostdir", "name": "sanity"}

	sanity.GinkgoTest(&cfg)
	gomega.RegisterFailHandler(ginkgo.Fail)
	suiteConfig, reporterConfig := ginkgo.GinkgoConfiguration()
	for _, s := range skipped {
		t.Logf("skipping csi-sanity specs matching %q: %s", s.pattern, s.reason)
		suiteConfig.SkipStrings = append(suiteConfig.SkipStrings, s.pattern)
	}
	reporterConfig.NoColor = true
	ginkgo.RunSpecs(t, "apm-csi node plugin csi-sanity", suiteConfig, reporterConfig)

	if recs := p.Driver.Records(); len(recs) != 0 {
		t.Errorf("csi-sanity left %d published volumes behind: %+v", len(recs), recs)
	}
}
