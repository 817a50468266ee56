package deploy

import (
	"fmt"
	"reflect"
	"testing"

	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	webhookconfig "github.com/apm-csi/apm-csi/webhook/config"
)

// openShiftProfileLabel is the CSIDriver label OpenShift reads to decide in which namespaces the
// driver's inline volumes are admitted.
const openShiftProfileLabel = "security.openshift.io/csi-ephemeral-volume-profile"

// checkHostDirTenancy: the webhook knows the tenancy of every node plugin entry that restricts
// who may use it, the same as the node plugin's, and lists no entry the node plugin does not
// declare (an entry for every namespace needs no admission check).
func checkHostDirTenancy(node hostdir.Config, web *webhookconfig.Config) []error {
	var errs []error
	nodeEntries := map[string]hostdir.Entry{}
	for _, e := range node.HostDirs {
		nodeEntries[e.Name] = e
		if e.Tenancy().Unrestricted() {
			continue
		}
		w, ok := web.HostDir(e.Name)
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("hostdir entry %s (%s) is not in the webhook configuration: a manual annotation for another namespace would be admitted and then fail to mount", e.Name, e.Tenancy().Describe()))
		case !reflect.DeepEqual(w.Tenancy.Normalize(), e.Tenancy()):
			errs = append(errs, fmt.Errorf("hostdir entry %s: the webhook allows %s, the node plugin %s", e.Name, w.Tenancy.Describe(), e.Tenancy().Describe()))
		}
	}
	for _, w := range web.HostDirs {
		e, ok := nodeEntries[w.Name]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("the webhook configuration lists hostdir entry %s, which the node plugin does not declare", w.Name))
		case w.ReadOnly != e.ReadOnly:
			errs = append(errs, fmt.Errorf("hostdir entry %s: the webhook has readOnly %t, the node plugin %t; the webhook marks the CSI volume of a read-only entry readOnly, which the node plugin requires", w.Name, w.ReadOnly, e.ReadOnly))
		}
	}
	return errs
}

func TestHostDirTenancyMatches(t *testing.T) {
	forEachVariant(t, func(t *testing.T, v Variant, s Set) {
		in := install(t, s)
		if in.DropIn {
			t.Skip("no webhook: the node plugin alone enforces its entries")
		}
		report(t, checkHostDirTenancy(nodeConfig(t, in), webhookConfig(t, in)))
	})
}

func TestHostDirTenancyCheckCatches(t *testing.T) {
	in := install(t, Set{Objs: Objects(t, variantByName(t, "helm-full"))})
	node, web := nodeConfig(t, in), webhookConfig(t, in)
	if errs := checkHostDirTenancy(node, web); len(errs) > 0 {
		t.Fatalf("baseline fails: %v", errs)
	}
	if len(web.HostDirs) < 2 {
		t.Fatalf("the full values declare too few entries to test with: %+v", web.HostDirs)
	}
	dropped := *web
	dropped.HostDirs = nil
	for _, w := range web.HostDirs {
		if w.Name != "agent-dir" {
			dropped.HostDirs = append(dropped.HostDirs, w)
		}
	}
	widened := *web
	widened.HostDirs = append([]webhookconfig.HostDir(nil), web.HostDirs...)
	for i := range widened.HostDirs {
		if widened.HostDirs[i].Name == "shared-data" {
			widened.HostDirs[i].Namespaces = []string{"*"}
		}
	}
	extra := *web
	extra.HostDirs = append(append([]webhookconfig.HostDir(nil), web.HostDirs...), webhookconfig.HostDir{Name: "ghost"})
	modeFlipped := *web
	modeFlipped.HostDirs = append([]webhookconfig.HostDir(nil), web.HostDirs...)
	for i := range modeFlipped.HostDirs {
		modeFlipped.HostDirs[i].ReadOnly = !modeFlipped.HostDirs[i].ReadOnly
	}
	for name, broken := range map[string]*webhookconfig.Config{"missing": &dropped, "different": &widened, "extra": &extra, "read-only mode": &modeFlipped} {
		if errs := checkHostDirTenancy(node, broken); len(errs) == 0 {
			t.Errorf("%s: the check did not notice", name)
		}
	}
}
