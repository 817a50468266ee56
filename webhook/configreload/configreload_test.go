package configreload

import (
	"context"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/apm-csi/apm-csi/webhook/configreload/configreloadtest"
)

const (
	javaV1 = "languages: [{name: java, version: v1.1.0}]\n"
	javaV2 = "languages: [{name: java, version: v2.2.0}]\n"
)

func TestReloadLoadsValidVersionsAndKeepsTheOldOneOnAnInvalidVersion(t *testing.T) {
	m := configreloadtest.MountConfigMap(t, javaV1)
	s, err := Load(m.Path(), "apm-csi-system")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if s.Hash() != configreloadtest.Hash(t, javaV1) || s.Config().DefaultVersion("java") != "v1.1.0" {
		t.Fatalf("loaded %s (java %s)", s.Hash(), s.Config().DefaultVersion("java"))
	}
	if got := value(t, configInfo.WithLabelValues(s.Hash())); got != 1 {
		t.Errorf("config_info{hash=%s} = %v, want 1", s.Hash(), got)
	}

	m.Update(t, javaV2)
	if err := s.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if s.Hash() != configreloadtest.Hash(t, javaV2) || s.Config().DefaultVersion("java") != "v2.2.0" {
		t.Fatalf("after a valid version: %s (java %s)", s.Hash(), s.Config().DefaultVersion("java"))
	}
	if n := count(t, configInfo); n != 1 {
		t.Errorf("config_info exports %d hashes, want only the one in force", n)
	}

	rejected := value(t, reloadsTotal.WithLabelValues(resultRejected))
	before := s.Mutator()
	m.Update(t, "languages: [{name: cobol}]\n")
	err = s.Reload(ctx)
	if err == nil || !strings.Contains(err.Error(), `languages[0].name: unknown language "cobol"`) {
		t.Fatalf("an invalid version must be refused with the reason, got %v", err)
	}
	if s.Mutator() != before {
		t.Error("the configuration in force must stay after an invalid version")
	}
	if got := value(t, reloadsTotal.WithLabelValues(resultRejected)); got != rejected+1 {
		t.Errorf("rejected reloads = %v, want %v", got, rejected+1)
	}
	// The same invalid content read again is not reported again.
	if err := s.Reload(ctx); err != nil {
		t.Errorf("unchanged invalid content: %v", err)
	}
	if got := value(t, reloadsTotal.WithLabelValues(resultRejected)); got != rejected+1 {
		t.Errorf("an unchanged file was reported again: %v", got)
	}

	m.Update(t, javaV1)
	if err := s.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if s.Hash() != configreloadtest.Hash(t, javaV1) {
		t.Errorf("back to the first version: hash %s, want %s", s.Hash(), configreloadtest.Hash(t, javaV1))
	}
}

func TestReloadRefusesADriverNameChange(t *testing.T) {
	m := configreloadtest.MountConfigMap(t, "")
	s, err := Load(m.Path(), "apm-csi-system")
	if err != nil {
		t.Fatal(err)
	}
	m.Update(t, "driverName: other.example.com\n")
	err = s.Reload(context.Background())
	if err == nil || !strings.Contains(err.Error(), "driverName: changed from csi.apm-csi.io to other.example.com, which needs a restart") {
		t.Fatalf("want the restart explained, got %v", err)
	}
	if s.Config().DriverName != "csi.apm-csi.io" {
		t.Errorf("driver %s in force", s.Config().DriverName)
	}
}

func TestHashIgnoresFormattingAndSpelledOutDefaults(t *testing.T) {
	a := configreloadtest.Hash(t, "mode: csi\n# a comment\nlanguages: [{name: java, version: v1.1.0}]\n")
	b := configreloadtest.Hash(t, "languages:\n- name: java\n  version: v1.1.0\n")
	if a != b {
		t.Errorf("same meaning, different hashes: %s %s", a, b)
	}
	if c := configreloadtest.Hash(t, javaV2); c == a {
		t.Error("a different configuration must have a different hash")
	}
	if len(a) != 12 {
		t.Errorf("hash %q: want 12 hex digits", a)
	}
}

func TestStartReloadsWhenKubeletSwapsTheMount(t *testing.T) {
	m := configreloadtest.MountConfigMap(t, javaV1)
	s, err := Load(m.Path(), "apm-csi-system")
	if err != nil {
		t.Fatal(err)
	}
	// Only the file event can trigger the reload within the test.
	s.Interval = time.Hour
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Start(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	want := configreloadtest.Hash(t, javaV2)
	// Until the watch is set up, an update may go unseen; each swap is a new event.
	err = wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 10*time.Second, true, func(context.Context) (bool, error) {
		if s.Hash() == want {
			return true, nil
		}
		m.Update(t, javaV2)
		return false, nil
	})
	if err != nil {
		t.Fatalf("the swap was not picked up: hash %s, want %s: %v", s.Hash(), want, err)
	}
}

func value(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		t.Fatal(err)
	}
	if g := out.GetGauge(); g != nil {
		return g.GetValue()
	}
	return out.GetCounter().GetValue()
}

func count(t *testing.T, c prometheus.Collector) int {
	t.Helper()
	ch := make(chan prometheus.Metric, 16)
	c.Collect(ch)
	close(ch)
	n := 0
	for range ch {
		n++
	}
	return n
}
