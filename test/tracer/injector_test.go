package tracer

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// TestLauncherRequiresTheInjectorLayoutsTracer runs node with the built launcher preloaded in a
// private mount namespace whose /opt holds (or lacks) the injector layout's dd-trace init: the
// launcher appends the --require to NODE_OPTIONS for node only, and only when the file is there.
func TestLauncherRequiresTheInjectorLayoutsTracer(t *testing.T) {
	testenv.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	node, err := FindNode(ctx)
	if err != nil {
		testenv.Missing(t, "%v", err)
	}
	so, err := BuildLauncher(ctx)
	if err != nil {
		testenv.Missing(t, "%v", err)
	}
	const initDir = "/opt/datadog/apm/library/js/node_modules/dd-trace"
	script := `set -e
mount -t tmpfs tmpfs /opt
if [ "$WITH_TRACER" = 1 ]; then mkdir -p ` + initDir + ` && echo 'globalThis.launched = "yes"' > ` + initDir + `/init.js; fi
export LD_PRELOAD="$SO" NODE_OPTIONS=--no-warnings
"$NODE" -e 'console.log(process.env.NODE_OPTIONS + "|" + (globalThis.launched || "no"))'
sh -c 'echo "$NODE_OPTIONS"'
`
	for _, c := range []struct {
		with string
		want string
	}{
		{"1", "--no-warnings --require=" + initDir + "/init|yes\n--no-warnings\n"},
		{"0", "--no-warnings|no\n--no-warnings\n"},
	} {
		cmd := exec.CommandContext(ctx, "unshare", "--mount", "--propagation", "private", "sh", "-c", script)
		cmd.Env = []string{"PATH=/usr/bin:/bin:/usr/sbin:/sbin", "SO=" + so, "NODE=" + node.Binary, "WITH_TRACER=" + c.with}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if string(out) != c.want {
			t.Errorf("tracer present %s: got %q, want %q", c.with, out, c.want)
		}
	}
}

func TestInjectorImageLayout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	so, err := BuildLauncher(ctx)
	if err != nil {
		testenv.Missing(t, "%v", err)
	}
	img, err := InjectorImage(so)
	if err != nil {
		t.Fatal(err)
	}
	files := imageFiles(t, img)
	base := strings.TrimPrefix(libref.InjectorSource, "/")
	for _, want := range []string{base + "/" + InjectorVersion + "/inject/launcher.preload.so", base + "/stable"} {
		if !files[want] {
			t.Errorf("injector image lacks %s", want)
		}
	}
}
