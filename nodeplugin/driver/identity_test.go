package driver

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

func TestIdentity(t *testing.T) {
	f := newFixture(t)
	t.Run("GetPluginInfo names the driver and its version", func(t *testing.T) {
		info, err := f.d.GetPluginInfo(context.Background(), &csi.GetPluginInfoRequest{})
		if err != nil || info.GetName() != "csi.apm-csi.io" || info.GetVendorVersion() == "" {
			t.Fatalf("plugin info %+v, %v", info, err)
		}
	})
	t.Run("Probe is ready once the state is reconciled", func(t *testing.T) {
		probe, err := f.d.Probe(context.Background(), &csi.ProbeRequest{})
		if err != nil || !probe.GetReady().GetValue() {
			t.Fatalf("Probe after reconcile: %+v, %v", probe, err)
		}
	})
	t.Run("NodeGetInfo names the node", func(t *testing.T) {
		ni, err := f.d.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
		if err != nil || ni.GetNodeId() != "node-1" {
			t.Fatalf("node info %+v, %v", ni, err)
		}
	})
}
