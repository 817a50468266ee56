// Package config is the apm-csi-webhook configuration file: which tracer libraries single step
// instrumentation (SSI) injects and from where, how (CSI volume or classic init containers),
// and which namespaces and containers are never touched. The file is usually a ConfigMap
// mounted into the webhook pod; every field has a default, so an empty file is valid.
package config

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/version"
	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/shared/repoallow"
	"github.com/apm-csi/apm-csi/shared/tenancy"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// Mode is how libraries reach a pod.
type Mode string

const (
	// ModeCSI serves libraries through one inline volume of the apm-csi CSI driver.
	ModeCSI Mode = "csi"
	// ModeImageVolume mounts each library image as a Kubernetes image volume (KEP-4639) with a
	// subPath; the injector's preload file comes from a downward-API volume. No driver and no
	// init container, but every node's container runtime pulls the images itself.
	ModeImageVolume Mode = "image-volume"
	// ModeInitContainer is the classic emptyDir plus one init container per library that copies
	// it. It needs no driver, so it is also the fallback when the driver is not installed.
	ModeInitContainer Mode = "init-container"
	// ModeAuto picks, per pod: CSI when the driver is installed, else image volumes when the
	// API server and every node the pod can run on support them, else init containers.
	ModeAuto Mode = "auto"
)

// Modes lists the accepted modes.
var Modes = []Mode{ModeCSI, ModeImageVolume, ModeInitContainer, ModeAuto}

// ParseMode validates a mode written by a user (config file or annotation). Datadog's
// spellings (image_volume, init_container) are accepted too, so that the values of the
// Datadog Cluster Agent's injection-mode setting carry over.
func ParseMode(s string) (Mode, error) {
	m := Mode(strings.ReplaceAll(s, "_", "-"))
	if slices.Contains(Modes, m) {
		return m, nil
	}
	return "", fmt.Errorf("unknown injection mode %q: use %s, %s, %s or %s (Datadog's spellings image_volume and init_container are accepted too)",
		s, ModeCSI, ModeImageVolume, ModeInitContainer, ModeAuto)
}

// ImageVolumes says when the cluster counts as able to serve image volumes (image-volume and
// auto modes).
type ImageVolumes struct {
	// MinKubernetesVersion is the oldest API server, and the oldest kubelet of a node the pod
	// can run on, that serves image volumes with subPath. Default 1.35, where the ImageVolume
	// feature is on by default; lower it (not below 1.33) only where the feature gate is on.
	MinKubernetesVersion string `json:"minKubernetesVersion,omitempty"`
	// Runtimes maps a container runtime, as nodes report it in
	// status.nodeInfo.containerRuntimeVersion ("containerd://2.2.1": containerd), to the oldest
	// version that serves image volumes with subPath. Default containerd 2.2, cri-o 1.33.
	// Another runtime never counts as able; {} turns image volumes off.
	Runtimes map[string]string `json:"runtimes,omitempty"`
}

// DefaultImageVolumes are the versions that serve image volumes with subPath: Kubernetes 1.35
// (on by default), containerd 2.2 (2.1 silently ignores subPath), CRI-O 1.33.
func DefaultImageVolumes() ImageVolumes {
	return ImageVolumes{MinKubernetesVersion: "1.35", Runtimes: map[string]string{"containerd": "2.2", "cri-o": "1.33"}}
}

// Layout is where the libraries appear inside a container and how the tracers are activated.
type Layout string

const (
	// LayoutInjector mounts the apm-inject launcher and /etc/ld.so.preload; the launcher picks
	// the tracer of whatever runtime starts.
	LayoutInjector Layout = "injector"
	// LayoutDirect mounts the libraries at /datadog-lib and sets each language's own variable
	// (JAVA_TOOL_OPTIONS, NODE_OPTIONS, ...).
	LayoutDirect Layout = "direct"
)

// Default versions of the Datadog library images: the major-version tags Datadog publishes.
var defaultVersions = map[string]string{
	"java":   "v1",
	"js":     "v5",
	"python": "v3",
	"dotnet": "v3",
	"ruby":   "v2",
	"php":    "v1",
}

// DefaultInjectorVersion is the tag of the apm-inject image used when none is configured.
const DefaultInjectorVersion = "0"

// DefaultSSINamespaceLabel turns SSI on for every pod of a namespace (value "enabled").
const DefaultSSINamespaceLabel = names.Prefix + "ssi"

// Config is the webhook configuration file.
type Config struct {
	// Registry holds the Datadog images (dd-lib-<lang>-init, apm-inject). Default gcr.io/datadoghq.
	Registry string `json:"registry,omitempty"`
	// AllowedRepositories are the registries and repository prefixes library images may come
	// from, in addition to Registry: the node plugin's --allowed-repository list, so that a
	// pod naming another image is refused at admission rather than left waiting for its
	// volume. Matched on path components after name normalisation (shared/repoallow).
	AllowedRepositories []string `json:"allowedRepositories,omitempty"`
	// Languages injected by SSI when a pod does not choose, with their versions. Default: all
	// supported languages at their default major version.
	Languages []Language `json:"languages,omitempty"`
	// Injector is the apm-inject launcher. With neither image nor version set, the webhook
	// uses the direct layout.
	Injector Injector `json:"injector"`
	// Layout forces a layout; empty means injector when an injector is configured, else direct.
	Layout Layout `json:"layout,omitempty"`
	// Mode is the default injection mode; namespaces and pods can override it. Default csi.
	Mode Mode `json:"mode,omitempty"`
	// ImageVolumes says when image volumes can be used (image-volume and auto modes).
	ImageVolumes ImageVolumes `json:"imageVolumes,omitzero"`
	// RewriteOnly makes the webhook convert init-container injection done by another injector
	// (Datadog Cluster Agent, OpenTelemetry operator) to the CSI volume without ever adding
	// instrumentation itself: for clusters that keep their existing injector.
	RewriteOnly bool `json:"rewriteOnly,omitempty"`
	// ExcludedNamespaces are never mutated, in addition to kube-system and the webhook's own
	// namespace, which always are.
	ExcludedNamespaces []string `json:"excludedNamespaces,omitempty"`
	// ExcludedContainers are container names that never get libraries. Default [istio-proxy].
	ExcludedContainers []string `json:"excludedContainers,omitempty"`
	// SSINamespaceLabel is the namespace label whose value "enabled" turns SSI on for the
	// namespace's pods ("rewrite" only converts existing injection). Default apm-csi.io/ssi.
	SSINamespaceLabel string `json:"ssiNamespaceLabel,omitempty"`
	// DriverName is the CSI driver written into pod volumes and watched for presence.
	DriverName string `json:"driverName,omitempty"`
	// HostDirs are the node plugin's hostdir entries with their tenancy (the same list as the
	// node plugin's configuration; the chart renders both from node.hostDirs). A manual
	// hostdir= volume annotation naming one of them is refused at admission when the pod's
	// namespace, namespace labels or service account are not allowed, instead of the pod
	// waiting in ContainerCreating for a mount the node plugin refuses.
	HostDirs []HostDir `json:"hostdirs,omitempty"`
	// Drift is what the webhook does about pods that should be instrumented but are not
	// (created while it was not answering, or before their namespace was selected).
	Drift Drift `json:"drift,omitzero"`
}

// Drift configures the restart of uninstrumented pods' owners. Such pods are always reported
// (an Event on each, a gauge by namespace); restarting their owners is opt-in.
type Drift struct {
	// RestartOwners restarts the Deployment, StatefulSet or DaemonSet that owns an
	// uninstrumented pod (as kubectl rollout restart does), in every namespace that does not
	// say otherwise with the annotation apm-csi.io/restart-uninstrumented ("true" or "false").
	// The webhook needs patch rights on those objects (Helm: webhook.drift.restartOwners).
	RestartOwners bool `json:"restartOwners,omitempty"`
	// RestartInterval is the least time between two owner restarts (default 5m); one owner
	// restarts at a time.
	RestartInterval metav1.Duration `json:"restartInterval,omitzero"`
}

// DefaultRestartInterval is Drift.RestartInterval's default.
const DefaultRestartInterval = 5 * time.Minute

// HostDir is who may use one of the node plugin's hostdir entries.
type HostDir struct {
	// Name of the entry, as pods name it.
	Name string `json:"name"`
	// ReadOnly is the entry's mode on the nodes: the webhook marks the pod's CSI volume of a
	// read-only entry readOnly, which the node plugin requires (a container runtime re-enables
	// writes on a read-only bind mount otherwise).
	ReadOnly bool `json:"readOnly,omitempty"`
	tenancy.Tenancy
}

// HostDir returns the declared entry called name.
func (c *Config) HostDir(name string) (HostDir, bool) {
	for _, h := range c.HostDirs {
		if h.Name == name {
			return h, true
		}
	}
	return HostDir{}, false
}

// Language is one library that SSI injects.
type Language struct {
	// Name is a Datadog language: java, js, python, dotnet, ruby or php.
	Name string `json:"name"`
	// Version is the image tag, sha256:<digest> or tag@sha256:<digest>. Default: the
	// language's default major version.
	Version string `json:"version,omitempty"`
	// Image, when set, is the full image reference and replaces registry and version.
	Image string `json:"image,omitempty"`
}

// Injector is the apm-inject image.
type Injector struct {
	// Image, when set, is the full image reference and replaces registry and version.
	Image string `json:"image,omitempty"`
	// Version is the apm-inject tag or digest in Registry.
	Version string `json:"version,omitempty"`
}

// Default returns the configuration used when no file is given.
func Default() *Config {
	c := &Config{
		Registry:           libref.DefaultRegistry,
		Injector:           Injector{Version: DefaultInjectorVersion},
		Mode:               ModeCSI,
		ImageVolumes:       DefaultImageVolumes(),
		ExcludedNamespaces: []string{},
		ExcludedContainers: []string{"istio-proxy"},
		SSINamespaceLabel:  DefaultSSINamespaceLabel,
		DriverName:         names.DriverName,
		Drift:              Drift{RestartInterval: metav1.Duration{Duration: DefaultRestartInterval}},
	}
	for _, l := range libref.Languages {
		c.Languages = append(c.Languages, Language{Name: l, Version: defaultVersions[l]})
	}
	return c
}

// Load reads a configuration file. A field the file leaves out keeps its default; a list the
// file sets replaces the default list; "injector: {}" removes the injector. Unknown fields are
// errors, so that a typo does not silently fall back to a default.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read webhook configuration: %w", err)
	}
	return Parse(data)
}

// Parse is Load for bytes already read.
func Parse(data []byte) (*Config, error) {
	// Decoding over Default() would merge lists element by element and could not tell
	// "injector: {}" from no injector key, so decode into a zero Config and fill in what the
	// file does not mention.
	c := &Config{}
	if err := yaml.UnmarshalStrict(data, c); err != nil {
		return nil, fmt.Errorf("parse webhook configuration: %w", err)
	}
	var present map[string]any
	if err := yaml.Unmarshal(data, &present); err != nil {
		return nil, fmt.Errorf("parse webhook configuration: %w", err)
	}
	has := func(key string) bool { _, ok := present[key]; return ok }
	d := Default()
	if c.Registry == "" {
		c.Registry = d.Registry
	}
	if !has("languages") {
		c.Languages = d.Languages
	}
	if !has("injector") {
		c.Injector = d.Injector
	}
	if c.Mode == "" {
		c.Mode = d.Mode
	}
	if m, err := ParseMode(string(c.Mode)); err == nil {
		c.Mode = m // Datadog's spelling
	}
	if c.ImageVolumes.MinKubernetesVersion == "" {
		c.ImageVolumes.MinKubernetesVersion = d.ImageVolumes.MinKubernetesVersion
	}
	if c.ImageVolumes.Runtimes == nil {
		c.ImageVolumes.Runtimes = d.ImageVolumes.Runtimes
	}
	if !has("excludedContainers") {
		c.ExcludedContainers = d.ExcludedContainers
	}
	if c.SSINamespaceLabel == "" {
		c.SSINamespaceLabel = d.SSINamespaceLabel
	}
	if c.DriverName == "" {
		c.DriverName = d.DriverName
	}
	if c.Drift.RestartInterval.Duration == 0 {
		c.Drift.RestartInterval = d.Drift.RestartInterval
	}
	for i := range c.Languages {
		if c.Languages[i].Version == "" && c.Languages[i].Image == "" {
			c.Languages[i].Version = defaultVersions[c.Languages[i].Name]
		}
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// Validate reports every problem at once, each naming the field and what it accepts.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("webhook configuration: %s: %s", field, fmt.Sprintf(format, args...)))
	}
	if c.Registry == "" {
		bad("registry", "must not be empty; the Datadog default is %s", libref.DefaultRegistry)
	}
	allowed, allowErr := c.AllowList()
	if allowErr != nil {
		bad("allowedRepositories", "%v", allowErr)
	}
	checkAllowed := func(field, image string) {
		if allowErr == nil && image != "" {
			if err := allowed.Check(image); err != nil {
				var nae *repoallow.NotAllowedError
				if errors.As(err, &nae) {
					bad(field, "image %s is outside the allowed repositories (%s): add its repository to allowedRepositories (Helm: libraries.allowedRepositories), which the node plugins must allow too", image, strings.Join(nae.Allowed, ", "))
				}
			}
		}
	}
	seen := map[string]bool{}
	for i, l := range c.Languages {
		field := fmt.Sprintf("languages[%d]", i)
		if !libref.IsLanguage(l.Name) {
			bad(field+".name", "unknown language %q; use one of %s", l.Name, strings.Join(libref.Languages, ", "))
			continue
		}
		if seen[l.Name] {
			bad(field+".name", "language %q is listed twice", l.Name)
		}
		seen[l.Name] = true
		if _, err := libref.Parse(c.LanguageImage(l.Name, l.Version, l.Image)); err != nil {
			bad(field, "%v", err)
		} else {
			checkAllowed(field, c.LanguageImage(l.Name, l.Version, l.Image))
		}
	}
	if c.Injector.Image != "" || c.Injector.Version != "" {
		if _, err := libref.Parse(c.InjectorImage()); err != nil {
			bad("injector", "%v", err)
		} else {
			checkAllowed("injector", c.InjectorImage())
		}
	}
	switch c.Layout {
	case "", LayoutDirect:
	case LayoutInjector:
		if c.InjectorImage() == "" {
			bad("layout", "the injector layout needs injector.image or injector.version")
		}
	default:
		bad("layout", "unknown layout %q: use %q or %q, or leave it empty", c.Layout, LayoutInjector, LayoutDirect)
	}
	if _, err := ParseMode(string(c.Mode)); err != nil {
		bad("mode", "%v", err)
	}
	if _, err := version.ParseGeneric(c.ImageVolumes.MinKubernetesVersion); err != nil {
		bad("imageVolumes.minKubernetesVersion", "%q is not a version such as 1.35: %v", c.ImageVolumes.MinKubernetesVersion, err)
	}
	for _, rt := range sortedKeys(c.ImageVolumes.Runtimes) {
		if _, err := version.ParseGeneric(c.ImageVolumes.Runtimes[rt]); err != nil {
			bad("imageVolumes.runtimes."+rt, "%q is not a version such as 2.2: %v", c.ImageVolumes.Runtimes[rt], err)
		}
	}
	for _, ns := range c.ExcludedNamespaces {
		if msgs := validation.IsDNS1123Label(ns); len(msgs) > 0 {
			bad("excludedNamespaces", "%q is not a namespace name: %s", ns, strings.Join(msgs, "; "))
		}
	}
	for _, n := range c.ExcludedContainers {
		if msgs := validation.IsDNS1123Label(n); len(msgs) > 0 {
			bad("excludedContainers", "%q is not a container name: %s", n, strings.Join(msgs, "; "))
		}
	}
	if msgs := validation.IsQualifiedName(c.SSINamespaceLabel); len(msgs) > 0 {
		bad("ssiNamespaceLabel", "%q is not a label key: %s", c.SSINamespaceLabel, strings.Join(msgs, "; "))
	}
	if msgs := validation.IsDNS1123Subdomain(c.DriverName); len(msgs) > 0 {
		bad("driverName", "%q is not a CSI driver name: %s", c.DriverName, strings.Join(msgs, "; "))
	}
	if c.Drift.RestartInterval.Duration < 0 {
		bad("drift.restartInterval", "%s is negative; write a duration such as 5m", c.Drift.RestartInterval.Duration)
	}
	names := map[string]bool{}
	for i, h := range c.HostDirs {
		field := fmt.Sprintf("hostdirs[%d]", i)
		if err := volumeattrs.ValidateEntryName(h.Name); err != nil {
			bad(field+".name", "%v", err)
			continue
		}
		if names[h.Name] {
			bad(field+".name", "entry %q is listed twice", h.Name)
		}
		names[h.Name] = true
		if err := h.Tenancy.Validate(); err != nil {
			bad(field, "entry %q: %v", h.Name, strings.ReplaceAll(err.Error(), "\n", "; "))
		}
	}
	return errors.Join(errs...)
}

// LanguageImage returns the image of a language: image when set, else the Datadog image of
// that version in the configured registry.
func (c *Config) LanguageImage(lang, version, image string) string {
	if image != "" {
		return image
	}
	if version == "" {
		version = c.DefaultVersion(lang)
	}
	return libref.Image(c.Registry, libref.PackageName(lang), version)
}

// DefaultVersion is the configured version of a language, or its default major version when
// the configuration does not list the language.
func (c *Config) DefaultVersion(lang string) string {
	for _, l := range c.Languages {
		if l.Name == lang && l.Version != "" {
			return l.Version
		}
	}
	return defaultVersions[lang]
}

// DefaultImage is the configured image of a language (custom image or registry + version).
func (c *Config) DefaultImage(lang string) string {
	for _, l := range c.Languages {
		if l.Name == lang {
			return c.LanguageImage(lang, l.Version, l.Image)
		}
	}
	return c.LanguageImage(lang, "", "")
}

// InjectorImage is the apm-inject image reference, or "" when no injector is configured.
func (c *Config) InjectorImage() string {
	switch {
	case c.Injector.Image != "":
		return c.Injector.Image
	case c.Injector.Version != "":
		return libref.Image(c.Registry, libref.InjectorPackage, c.Injector.Version)
	}
	return ""
}

// EffectiveLayout is Layout, or the layout implied by whether an injector is configured.
func (c *Config) EffectiveLayout() Layout {
	if c.Layout != "" {
		return c.Layout
	}
	if c.InjectorImage() != "" {
		return LayoutInjector
	}
	return LayoutDirect
}

// LanguageNames returns the configured SSI languages in libref.Languages order.
func (c *Config) LanguageNames() []string {
	var out []string
	for _, l := range libref.Languages {
		if slices.ContainsFunc(c.Languages, func(x Language) bool { return x.Name == l }) {
			out = append(out, l)
		}
	}
	return out
}

// AllowList is the repositories library images may come from: Registry plus
// AllowedRepositories.
func (c *Config) AllowList() (*repoallow.List, error) {
	return repoallow.New(append([]string{c.Registry}, c.AllowedRepositories...)...)
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// Hash identifies a configuration by its meaning: the first 12 hex digits of the SHA-256 of
// its canonical form (the parsed configuration, defaults filled in, encoded as JSON with a
// fixed field order). Two files that differ only in comments, order or spelled-out defaults
// have the same hash. The webhook reports it in a metric and in each pod's status annotation,
// so that a pod says which configuration admitted it.
func (c *Config) Hash() string {
	data, err := json.Marshal(c)
	if err != nil {
		// A Config is plain data; it always encodes.
		panic(fmt.Sprintf("encode webhook configuration: %v", err))
	}
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])[:12]
}
