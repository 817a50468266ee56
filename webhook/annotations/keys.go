// Package annotations defines the pod and namespace labels and annotations the webhook reads
// and writes, and parses the ones users write by hand. The parsers are pure and fuzzed: their
// input comes straight from users' manifests.
package annotations

import "github.com/apm-csi/apm-csi/shared/names"

// Labels.
const (
	// DatadogEnabled is Datadog's pod label: "true" asks for instrumentation in any namespace
	// that is not excluded, "false" opts the pod out even in an SSI namespace.
	DatadogEnabled = "admission.datadoghq.com/enabled"
	// Volumes is the pod label ("enabled") that makes the API server call the webhook for a pod
	// that is not otherwise instrumented but asks for manual volumes. Annotations cannot be
	// selected on, so the label is what keeps every other pod away from the webhook.
	Volumes = names.Prefix + "volumes"
)

// Values of the SSI namespace label (config.SSINamespaceLabel).
const (
	// SSIEnabled instruments every pod of the namespace.
	SSIEnabled = "enabled"
	// SSIRewrite only converts init-container injection that another injector added.
	SSIRewrite = "rewrite"
	// VolumesEnabled is the value of the Volumes label.
	VolumesEnabled = "enabled"
)

// Annotations the webhook writes.
const (
	// InjectionStatus records what the webhook did: "injected", "skipped" or "error",
	// followed by ": <reason>" where there is one. Its presence marks a pod as already
	// processed, so that reinvocation leaves the pod as it is.
	InjectionStatus = names.Prefix + "injection-status"
	// InjectedLibraries lists what the pod's volumes serve: "<lang>=<image>,...", with
	// "injector=<image>" for apm-inject, "otel-<lang>=<image>" for converted OpenTelemetry
	// libraries and "<volume>=<image>" for the libraries of manual volumes.
	InjectedLibraries = names.Prefix + "injected-libraries"
	// Preload holds the content of /etc/ld.so.preload in image-volume mode: a downward-API
	// volume renders it into a file that containers mount with subPath, so that no init
	// container has to write it.
	Preload = names.Prefix + "ld.so.preload"
)

// Status values (the word before the reason in InjectionStatus).
const (
	StatusInjected = "injected"
	StatusSkipped  = "skipped"
	StatusError    = "error"
)

// Annotations users write.
const (
	// InjectionMode ("csi", "image-volume", "init-container" or "auto") on a pod or namespace
	// overrides the configured mode.
	InjectionMode = names.Prefix + "injection-mode"
	// Libraries on a namespace is the namespace's default library set; on a pod it is the pod's
	// set. Syntax: comma-separated <lang>, <lang>:<version> or <lang>=<image>.
	Libraries = names.Prefix + "libraries"
	// ContainerLanguages restricts which containers get which languages:
	// "<container>=<lang>,<lang>;<container>=<lang>". Containers not listed get none.
	ContainerLanguages = names.Prefix + "container-languages"
	// VolumePrefix starts a manual volume annotation: apm-csi.io/volume.<name>.
	VolumePrefix = names.Prefix + "volume."
)

// Datadog's pod annotations for library choice.
const (
	DatadogPrefix = "admission.datadoghq.com/"
	// DatadogAllVersion sets the version of every language.
	DatadogAllVersion = DatadogPrefix + "all-lib.version"
	// DatadogInjectionMode is the Datadog Cluster Agent's per-pod injection mode: csi,
	// image_volume, init_container or auto.
	DatadogInjectionMode = DatadogPrefix + "apm-inject.injection-mode"
	datadogLibSuffix     = "-lib.version"
	datadogImgSuffix     = "-lib.custom-image"
)

// DatadogVersion is admission.datadoghq.com/<lang>-lib.version.
func DatadogVersion(lang string) string { return DatadogPrefix + lang + datadogLibSuffix }

// DatadogCustomImage is admission.datadoghq.com/<lang>-lib.custom-image.
func DatadogCustomImage(lang string) string { return DatadogPrefix + lang + datadogImgSuffix }
