// Package sanity runs csi-sanity (github.com/kubernetes-csi/csi-test/v5/pkg/sanity) against the
// real apm-csi node server: real gRPC over a unix socket, real mounts, in a temporary kubelet
// dir. Root only.
package sanity

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/gomega"

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

func TestSanity(t *testing.T) {
	p := nodeplugintest.New(t, nodeplugintest.Config{NodeID: "sanity-node"})
	// The driver's warnings explain a failing spec better than csi-sanity's report alone.
	p.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	hostData := filepath.Join(p.Root, "host", "data")
	// sanity creates TargetPath and StagingPath itself (os.Mkdir, not MkdirAll), so their
	// parent, a pod's CSI volume dir, must exist; both lie under <kubelet>/pods/ where the
	// driver accepts targets.
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
	cfg.TargetPath = filepath.Join(podVolumes, "sanity-target")
	cfg.StagingPath = filepath.Join(podVolumes, "sanity-staging")
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
