package webhook_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/configreload"
	"github.com/apm-csi/apm-csi/webhook/configreload/configreloadtest"
)

const (
	javaOld = "languages: [{name: java, version: v1.1.0}]\n"
	javaNew = "languages: [{name: java, version: v2.2.0}]\n"
)

// admittedWith reads which configuration admitted a stored pod (the hash ending its status)
// and which java image it got.
func admittedWith(t testing.TB, p *corev1.Pod) (hash, javaImage string) {
	t.Helper()
	s := p.Annotations[annotations.InjectionStatus]
	i := strings.LastIndex(s, "; config ")
	if !strings.HasPrefix(s, "injected: ") || i < 0 {
		t.Fatalf("pod %s: status %q: want an injection with the configuration hash", p.Name, s)
	}
	for _, lib := range strings.Split(p.Annotations[annotations.InjectedLibraries], ",") {
		if img, ok := strings.CutPrefix(lib, "java="); ok {
			javaImage = img
		}
	}
	return s[i+len("; config "):], javaImage
}

// TestConfigurationReloadsWithoutRestart: the webhook's configuration file changes the way
// kubelet updates a mounted ConfigMap; pods admitted afterwards get the new configuration and
// say so in their status; an invalid version is refused (log, metric, Warning Event on the
// webhook's pod) and the previous configuration stays in force; a valid version is taken again.
func TestConfigurationReloadsWithoutRestart(t *testing.T) {
	mount := configreloadtest.MountConfigMap(t, javaOld)
	h := startHarnessWith(t, harnessOptions{configFile: mount.Path(),
		configPod: configreload.Pod{Namespace: "apm-csi-system", Name: "apm-csi-webhook-0"}})
	h.setDriver(t, true)
	h.namespace(t, "apm-csi-system", nil, nil)
	h.namespace(t, "reload", map[string]string{"apm-csi.io/ssi": "enabled"}, nil)
	oldHash, newHash := configreloadtest.Hash(t, javaOld), configreloadtest.Hash(t, javaNew)
	current := func() string { return h.mutator.CurrentMutator().ConfigHash() }

	expect := func(name, hash, image string) {
		t.Helper()
		gotHash, gotImage := admittedWith(t, h.create(t, pod("reload", name, nil, nil)))
		if gotHash != hash || !strings.HasSuffix(gotImage, image) {
			t.Errorf("pod %s admitted by configuration %s with java %s; want %s with %s", name, gotHash, gotImage, hash, image)
		}
	}
	expect("first", oldHash, "dd-lib-java-init:v1.1.0")

	mount.Update(t, javaNew)
	h.eventually(t, "the new configuration in force", func() bool { return current() == newHash })
	expect("after-update", newHash, "dd-lib-java-init:v2.2.0")

	mount.Update(t, "languages: [{name: java, version: \"v2 beta\"}]\n")
	h.eventually(t, "the Warning Event about the refused version", func() bool {
		var list eventsv1.EventList
		if err := h.client.List(context.Background(), &list, client.InNamespace("apm-csi-system")); err != nil {
			t.Fatal(err)
		}
		for _, e := range list.Items {
			if e.Reason == configreload.ReasonRejected && e.Type == corev1.EventTypeWarning && e.Regarding.Name == "apm-csi-webhook-0" &&
				strings.Contains(e.Note, "languages[0]") && strings.Contains(e.Note, "configuration "+newHash+" stays in force") {
				return true
			}
		}
		return false
	})
	expect("after-invalid", newHash, "dd-lib-java-init:v2.2.0")

	mount.Update(t, javaOld)
	h.eventually(t, "the first configuration in force again", func() bool { return current() == oldHash })
	expect("back", oldHash, "dd-lib-java-init:v1.1.0")
}

// TestNoPodAdmittedWithAHalfLoadedConfiguration: pods are created while the configuration
// flips between two versions; every stored pod was admitted by exactly one of them (its
// status names it) and got that version's library, never a mix.
func TestNoPodAdmittedWithAHalfLoadedConfiguration(t *testing.T) {
	mount := configreloadtest.MountConfigMap(t, javaOld)
	h := startHarnessWith(t, harnessOptions{configFile: mount.Path()})
	h.setDriver(t, true)
	h.namespace(t, "flip", map[string]string{"apm-csi.io/ssi": "enabled"}, nil)
	want := map[string]string{
		configreloadtest.Hash(t, javaOld): "dd-lib-java-init:v1.1.0",
		configreloadtest.Hash(t, javaNew): "dd-lib-java-init:v2.2.0",
	}

	stop := make(chan struct{})
	flipped := make(chan int)
	go func() {
		n := 0
		defer func() { flipped <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if n%2 == 0 {
				mount.Update(t, javaNew)
			} else {
				mount.Update(t, javaOld)
			}
			n++
		}
	}()
	const pods = 40
	var wg sync.WaitGroup
	stored := make([]*corev1.Pod, pods)
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < pods; i += 4 {
				p := pod("flip", fmt.Sprintf("p%d", i), nil, nil)
				if err := h.client.Create(context.Background(), p); err != nil {
					t.Errorf("create: %v", err)
					return
				}
				stored[i] = p
			}
		})
	}
	wg.Wait()
	close(stop)
	t.Logf("%d configuration versions written while %d pods were created", <-flipped, pods)

	seen := map[string]int{}
	for _, p := range stored {
		if p == nil {
			continue
		}
		hash, image := admittedWith(t, p)
		img, ok := want[hash]
		if !ok {
			t.Errorf("pod %s admitted by unknown configuration %s", p.Name, hash)
			continue
		}
		if !strings.HasSuffix(image, img) {
			t.Errorf("pod %s: configuration %s gives %s, but the pod got %s", p.Name, hash, img, image)
		}
		seen[hash]++
	}
	t.Logf("pods per configuration: %v", seen)
}
