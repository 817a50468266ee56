package mutation

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
	"github.com/apm-csi/apm-csi/webhook/annotations"
	"github.com/apm-csi/apm-csi/webhook/config"
)

// ssiResult is the single step instrumentation part of a decision.
type ssiResult struct {
	outcome   Outcome
	reason    string
	mode      config.Mode
	layout    config.Layout
	libraries []string
	warnings  []string
}

func ssiError(format string, args ...any) ssiResult {
	msg := fmt.Sprintf(format, args...)
	return ssiResult{outcome: OutcomeError, reason: msg, warnings: []string{"apm-csi: pod admitted without instrumentation: " + msg}}
}

// applySSI instruments pod (a copy it may change) when it is an SSI target. Problems never
// deny: the pod is admitted uninstrumented and the result says why.
func (m *Mutator) applySSI(pod *corev1.Pod, in Input) ssiResult {
	if res, target := m.ssiTarget(pod, in); !target {
		return res
	}
	var nsLabels, nsAnnotations map[string]string
	if in.Namespace != nil {
		nsLabels, nsAnnotations = in.Namespace.Labels, in.Namespace.Annotations
	}
	rewriteOnly := m.cfg.RewriteOnly || nsLabels[m.cfg.SSINamespaceLabel] == annotations.SSIRewrite

	if windows, pin := windowsPod(pod); windows {
		return ssiResult{outcome: OutcomeSkipped, reason: fmt.Sprintf("Windows pods cannot load the Linux tracer libraries (%s)", pin)}
	}
	mode, modeNote, err := m.resolveMode(pod, nsAnnotations, in)
	if err != nil {
		return ssiError("%v", err)
	}
	if f := detectForeign(pod); f.found() {
		if mode != config.ModeCSI {
			return ssiResult{outcome: OutcomeSkipped, reason: joinReason(fmt.Sprintf("already instrumented by init containers %s; %s mode keeps them", strings.Join(f.initNames(), ", "), mode), modeNote)}
		}
		return m.rewrite(pod, f)
	}
	if rewriteOnly {
		// Not annotated: if another injector instruments the pod after this webhook, the API
		// server calls it again (reinvocation) and the rewrite happens then.
		return ssiResult{outcome: OutcomeIgnored, reason: "rewrite only, and the pod carries no init-container injection"}
	}
	libs, perContainer, err := m.selectLibraries(pod, nsAnnotations)
	if err != nil {
		return ssiError("%v", err)
	}
	res := m.inject(pod, mode, libs, perContainer, in.Now)
	res.reason = joinReason(res.reason, modeNote)
	return res
}

// ssiTarget reports whether SSI applies to the pod (opted in by label, or in an SSI or
// rewrite namespace and not opted out); when it does not, the result says why.
func (m *Mutator) ssiTarget(pod *corev1.Pod, in Input) (ssiResult, bool) {
	switch pod.Labels[annotations.DatadogEnabled] {
	case "false":
		return ssiResult{outcome: OutcomeIgnored, reason: "opted out by " + annotations.DatadogEnabled + "=false"}, false
	case "true":
	default:
		if in.Namespace == nil {
			if pod.Labels[annotations.Volumes] == annotations.VolumesEnabled {
				// Called for manual volumes only; SSI does not depend on the namespace.
				return ssiResult{outcome: OutcomeIgnored}, false
			}
			return ssiError("namespace %s could not be read: %v", pod.Namespace, in.NamespaceError), false
		}
		switch in.Namespace.Labels[m.cfg.SSINamespaceLabel] {
		case annotations.SSIEnabled, annotations.SSIRewrite:
		default:
			return ssiResult{outcome: OutcomeIgnored, reason: "not an SSI target"}, false
		}
	}
	return ssiResult{}, true
}

// selectLibraries returns the languages SSI injects into the pod with their images, in
// libref.Languages order, and the per-container choice (nil: every container gets them all).
// The pod's own choice wins over its namespace's, which wins over the configuration.
func (m *Mutator) selectLibraries(pod *corev1.Pod, nsAnnotations map[string]string) ([]chosenLibrary, map[string][]string, error) {
	choices, err := podLibraryChoices(pod.Annotations)
	if err != nil {
		return nil, nil, err
	}
	if len(choices) == 0 {
		if v, ok := pod.Annotations[annotations.DatadogAllVersion]; ok {
			if err := annotations.ValidateVersion(v); err != nil {
				return nil, nil, fmt.Errorf("annotation %s: %v", annotations.DatadogAllVersion, err)
			}
			for _, l := range libref.Languages {
				choices = append(choices, annotations.LibraryChoice{Language: l, Version: v})
			}
		}
	}
	if len(choices) == 0 {
		if v, ok := nsAnnotations[annotations.Libraries]; ok {
			c, err := annotations.ParseLibraries("namespace "+annotations.Libraries, v)
			if err != nil {
				return nil, nil, err
			}
			choices = c
		}
	}
	if len(choices) == 0 {
		for _, l := range m.cfg.Languages {
			choices = append(choices, annotations.LibraryChoice{Language: l.Name, Version: l.Version, Image: l.Image})
		}
	}
	var libs []chosenLibrary
	for _, lang := range libref.Languages {
		i := slices.IndexFunc(choices, func(c annotations.LibraryChoice) bool { return c.Language == lang })
		if i < 0 {
			continue
		}
		c := choices[i]
		img := m.cfg.LanguageImage(lang, c.Version, c.Image)
		if _, err := libref.Parse(img); err != nil {
			return nil, nil, fmt.Errorf("library %s: %v", c, err)
		}
		if err := m.allowed.Check(img); err != nil {
			return nil, nil, fmt.Errorf("library %s: %v", c, err)
		}
		libs = append(libs, chosenLibrary{Language: lang, Image: img})
	}

	v, ok := pod.Annotations[annotations.ContainerLanguages]
	if !ok {
		return libs, nil, nil
	}
	perContainer, err := annotations.ParseContainerLanguages(v)
	if err != nil {
		return nil, nil, err
	}
	for _, name := range sortedKeys(perContainer) {
		if !hasContainer(pod, name) {
			return nil, nil, fmt.Errorf("annotation %s names container %s, which the pod does not have", annotations.ContainerLanguages, name)
		}
		for _, l := range perContainer[name] {
			if !slices.ContainsFunc(libs, func(c chosenLibrary) bool { return c.Language == l }) {
				return nil, nil, fmt.Errorf("annotation %s gives %s to container %s, but %s is not among the pod's libraries (%s); add it with %s or %s",
					annotations.ContainerLanguages, l, name, l, strings.Join(languagesOf(libs), ", "), annotations.DatadogVersion(l), annotations.Libraries)
			}
		}
	}
	return libs, perContainer, nil
}

// podLibraryChoices reads the pod's explicit choice: Datadog's per-language annotations and
// apm-csi.io/libraries. Keys are read in sorted order so that the first error is stable.
func podLibraryChoices(podAnnotations map[string]string) ([]annotations.LibraryChoice, error) {
	datadog := map[string]annotations.LibraryChoice{}
	for _, k := range sortedKeys(podAnnotations) {
		rest, ok := strings.CutPrefix(k, annotations.DatadogPrefix)
		if !ok || k == annotations.DatadogAllVersion {
			continue
		}
		v := podAnnotations[k]
		var lang string
		switch {
		case strings.HasSuffix(rest, "-lib.version"):
			lang = strings.TrimSuffix(rest, "-lib.version")
			if err := annotations.ValidateVersion(v); err != nil {
				return nil, fmt.Errorf("annotation %s: %v; write a tag such as v1.40.0 or a digest", k, err)
			}
			if _, hasImage := datadog[lang]; !hasImage {
				datadog[lang] = annotations.LibraryChoice{Language: lang, Version: v}
			}
		case strings.HasSuffix(rest, "-lib.custom-image"):
			lang = strings.TrimSuffix(rest, "-lib.custom-image")
			if _, err := libref.Parse(v); err != nil {
				return nil, fmt.Errorf("annotation %s: %v", k, err)
			}
			// The custom image wins over the version, as in Datadog's webhook.
			datadog[lang] = annotations.LibraryChoice{Language: lang, Image: v}
		default:
			continue
		}
		if !libref.IsLanguage(lang) {
			return nil, fmt.Errorf("annotation %s: %q is not a supported language; use one of %s", k, lang, strings.Join(libref.Languages, ", "))
		}
	}
	var choices []annotations.LibraryChoice
	for _, lang := range sortedKeys(datadog) {
		choices = append(choices, datadog[lang])
	}
	if v, ok := podAnnotations[annotations.Libraries]; ok {
		list, err := annotations.ParseLibraries(annotations.Libraries, v)
		if err != nil {
			return nil, err
		}
		for _, c := range list {
			if old, dup := datadog[c.Language]; dup {
				return nil, fmt.Errorf("language %s is chosen twice (%s by %s annotations and %s by %s); keep one",
					c.Language, old, annotations.DatadogPrefix, c, annotations.Libraries)
			}
			choices = append(choices, c)
		}
	}
	return choices, nil
}

// inject adds the libraries volume (CSI, image volumes, or emptyDir + init containers), mounts
// and env.
func (m *Mutator) inject(pod *corev1.Pod, mode config.Mode, libs []chosenLibrary, perContainer map[string][]string, now time.Time) ssiResult {
	layout := m.cfg.EffectiveLayout()
	var notes []string
	if layout == config.LayoutDirect {
		if i := slices.IndexFunc(libs, func(l chosenLibrary) bool { return l.Language == "php" }); i >= 0 {
			libs = slices.Delete(slices.Clone(libs), i, i+1)
			notes = append(notes, "php needs the injector layout and is not injected")
		}
	}
	if len(libs) == 0 {
		return ssiResult{outcome: OutcomeSkipped, reason: joinReason("no library to inject", strings.Join(notes, "; "))}
	}

	// Decide per container first, so that the volume holds only the languages used.
	type plan struct {
		c     *corev1.Container
		langs []string
	}
	planFor := func(mode config.Mode) ([]plan, []string) {
		var plans []plan
		var notes []string
		for _, c := range targetContainers(pod) {
			if slices.Contains(m.cfg.ExcludedContainers, c.Name) {
				continue
			}
			langs := languagesOf(libs)
			if perContainer != nil {
				langs = perContainer[c.Name]
				if len(langs) == 0 {
					continue
				}
			}
			edits := containerEnv(mode, layout, langs, now)
			if why := envBlocker(c, edits); why != "" {
				notes = append(notes, fmt.Sprintf("container %s not instrumented: %s", c.Name, why))
				continue
			}
			if why := mountConflict(c, modeMounts(mode, layout, langs, langs, nil)); why != "" {
				notes = append(notes, fmt.Sprintf("container %s not instrumented: %s", c.Name, why))
				continue
			}
			plans = append(plans, plan{c: c, langs: langs})
		}
		return plans, notes
	}
	plans, planNotes := planFor(mode)
	if mode == config.ModeImageVolume && layout == config.LayoutDirect {
		// The direct layout merges every library at /datadog-lib; an image volume mount
		// serves one image, so a container that gets several languages cannot have them.
		if i := slices.IndexFunc(plans, func(p plan) bool { return len(p.langs) > 1 }); i >= 0 {
			mode = config.ModeInitContainer
			notes = append(notes, fmt.Sprintf("container %s gets %d languages, which the direct layout merges at %s and one image volume per mount cannot serve: fell back to init-container mode (use the injector layout, or one language per container with %s)",
				plans[i].c.Name, len(plans[i].langs), DirectMountPath, annotations.ContainerLanguages))
			plans, planNotes = planFor(mode)
		}
	}
	notes = append(notes, planNotes...)
	if len(plans) == 0 {
		return ssiResult{outcome: OutcomeSkipped, reason: joinReason("no container to instrument", strings.Join(notes, "; "))}
	}
	var used []chosenLibrary
	for _, l := range libs {
		if slices.ContainsFunc(plans, func(p plan) bool { return slices.Contains(p.langs, l.Language) }) {
			used = append(used, l)
		}
	}
	usedLangs := languagesOf(used)

	spec := volumeSpec(layout, m.cfg.InjectorImage(), used)
	attrs := spec.Attributes()
	if _, err := volumeattrs.Parse(attrs); err != nil {
		return ssiError("the library volume would be invalid: %v", err)
	}
	var keys, recorded []string
	if layout == config.LayoutInjector {
		keys = append(keys, "injector")
	}
	keys = append(keys, usedLangs...)
	for i, lib := range spec.Libraries {
		recorded = append(recorded, keys[i]+"="+lib.Image)
	}

	var podAnnotations map[string]string
	switch mode {
	case config.ModeCSI:
		pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: VolumeName, VolumeSource: corev1.VolumeSource{
			CSI: &corev1.CSIVolumeSource{Driver: m.cfg.DriverName, VolumeAttributes: attrs},
		}})
	case config.ModeImageVolume:
		dotnetLogs := layout == config.LayoutDirect && slices.Contains(usedLangs, "dotnet")
		for _, name := range imageVolumeNames(keys, spec.Preload != "", dotnetLogs) {
			if slices.ContainsFunc(pod.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == name }) {
				return ssiResult{outcome: OutcomeSkipped, reason: fmt.Sprintf("the pod already has a volume named %s that apm-csi did not add; rename that volume to have the pod instrumented", name)}
			}
		}
		var vols []corev1.Volume
		vols, podAnnotations = imageVolumes(spec, keys, dotnetLogs)
		pod.Spec.Volumes = append(pod.Spec.Volumes, vols...)
	case config.ModeInitContainer:
		pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: VolumeName, VolumeSource: corev1.VolumeSource{
			EmptyDir: &corev1.EmptyDirVolumeSource{},
		}})
		// First, so that native sidecars and other init containers already see the libraries.
		pod.Spec.InitContainers = append(copyInitContainers(spec, keys), pod.Spec.InitContainers...)
	}
	source := imageSubPaths(spec, keys)
	var names []string
	for _, p := range plans {
		p.c.VolumeMounts = append(p.c.VolumeMounts, modeMounts(mode, layout, p.langs, usedLangs, source)...)
		applyEnv(p.c, containerEnv(mode, layout, p.langs, now))
		names = append(names, p.c.Name)
	}
	if len(podAnnotations) > 0 {
		if pod.Annotations == nil {
			pod.Annotations = map[string]string{}
		}
		maps.Copy(pod.Annotations, podAnnotations)
	}
	reason := fmt.Sprintf("%s mode, %s layout, containers %s", mode, layout, strings.Join(names, ","))
	return ssiResult{
		outcome:   OutcomeInjected,
		reason:    joinReason(reason, strings.Join(notes, "; ")),
		mode:      mode,
		layout:    layout,
		libraries: recorded,
	}
}

// targetContainers are the long-running containers: native sidecars (init containers with
// restartPolicy Always) and regular containers. One-shot init containers are not instrumented.
func targetContainers(pod *corev1.Pod) []*corev1.Container {
	var out []*corev1.Container
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		if c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			out = append(out, c)
		}
	}
	for i := range pod.Spec.Containers {
		out = append(out, &pod.Spec.Containers[i])
	}
	return out
}

// mountConflict reports a mount path the container already uses.
func mountConflict(c *corev1.Container, mounts []corev1.VolumeMount) string {
	for _, want := range mounts {
		for _, have := range c.VolumeMounts {
			if have.MountPath == want.MountPath {
				return fmt.Sprintf("it already mounts volume %s at %s", have.Name, have.MountPath)
			}
		}
	}
	return ""
}

func hasContainer(pod *corev1.Pod, name string) bool {
	find := func(cs []corev1.Container) bool {
		return slices.ContainsFunc(cs, func(c corev1.Container) bool { return c.Name == name })
	}
	return find(pod.Spec.Containers) || find(pod.Spec.InitContainers)
}

func languagesOf(libs []chosenLibrary) []string {
	out := make([]string, 0, len(libs))
	for _, l := range libs {
		out = append(out, l.Language)
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
