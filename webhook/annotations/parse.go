package annotations

import (
	"fmt"
	"path"
	"slices"
	"strings"
	"unicode"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// Error is a bad annotation. Its message names the annotation, the bad value and the fix,
// because it goes verbatim into an admission denial that a person reads in kubectl.
type Error struct {
	Annotation string
	Value      string
	Problem    string
	Fix        string
}

func (e *Error) Error() string {
	msg := fmt.Sprintf("annotation %s: bad value %q: %s", e.Annotation, e.Value, e.Problem)
	if e.Fix != "" {
		msg += "; fix: " + e.Fix
	}
	return msg
}

func bad(annotation, value, problem, fix string) *Error {
	if len(value) > 120 {
		value = value[:120] + "..."
	}
	return &Error{Annotation: annotation, Value: value, Problem: problem, Fix: fix}
}

// Limits that keep one annotation's work bounded.
const (
	// MaxVolumes is how many manual volumes one pod may ask for.
	MaxVolumes = 16
	// maxMountPath bounds a mount path.
	maxMountPath = 512
	// maxVolumeName keeps "volume.<name>", the name part of the annotation key, within the
	// 63 characters Kubernetes allows.
	maxVolumeName = 63 - len("volume.")
)

var languageList = strings.Join(libref.Languages, ", ")

// LibraryChoice is one language with, optionally, its version or full image.
type LibraryChoice struct {
	Language string
	// Version is a tag, sha256:<digest> or tag@sha256:<digest>; empty means the configured one.
	Version string
	// Image is a full image reference that replaces registry and version.
	Image string
}

// String formats the choice in the syntax ParseLibraries reads.
func (c LibraryChoice) String() string {
	switch {
	case c.Image != "":
		return c.Language + "=" + c.Image
	case c.Version != "":
		return c.Language + ":" + c.Version
	}
	return c.Language
}

// ParseLibraries parses the Libraries annotation: comma-separated <lang>, <lang>:<version> or
// <lang>=<image>. annotation is the key, used in errors.
func ParseLibraries(annotation, value string) ([]LibraryChoice, error) {
	var out []LibraryChoice
	for item := range strings.SplitSeq(value, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		c, err := parseLibraryChoice(annotation, item)
		if err != nil {
			return nil, err
		}
		if slices.ContainsFunc(out, func(x LibraryChoice) bool { return x.Language == c.Language }) {
			return nil, bad(annotation, item, fmt.Sprintf("language %s is listed twice", c.Language), "list each language once")
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, bad(annotation, value, "no library listed", "list languages, e.g. java,python:v3 or java=registry.example.com/dd-lib-java-init:v1.40.0")
	}
	return out, nil
}

var libraryFix = "write <lang>, <lang>:<version> or <lang>=<image> with lang one of " + languageList

func parseLibraryChoice(annotation, item string) (LibraryChoice, error) {
	if lang, img, ok := strings.Cut(item, "="); ok {
		lang = strings.TrimSpace(lang)
		img = strings.TrimSpace(img)
		if !libref.IsLanguage(lang) {
			return LibraryChoice{}, bad(annotation, item, fmt.Sprintf("unknown language %q", lang), libraryFix)
		}
		if _, err := libref.Parse(img); err != nil {
			return LibraryChoice{}, bad(annotation, item, err.Error(), "give a full image reference with a tag or digest, e.g. registry.example.com/dd-lib-java-init:v1.40.0")
		}
		return LibraryChoice{Language: lang, Image: img}, nil
	}
	lang, version, hasVersion := strings.Cut(item, ":")
	if !libref.IsLanguage(lang) {
		return LibraryChoice{}, bad(annotation, item, fmt.Sprintf("unknown language %q", lang), libraryFix)
	}
	if !hasVersion {
		return LibraryChoice{Language: lang}, nil
	}
	if err := ValidateVersion(version); err != nil {
		return LibraryChoice{}, bad(annotation, item, err.Error(), "write a tag such as v1.40.0, sha256:<64 hex digits> or v1.40.0@sha256:<64 hex digits>")
	}
	return LibraryChoice{Language: lang, Version: version}, nil
}

// ValidateVersion checks a library version: a tag, sha256:<digest> or tag@sha256:<digest>.
func ValidateVersion(version string) error {
	if version == "" {
		return fmt.Errorf("empty version")
	}
	if _, err := libref.Parse(libref.Image(libref.DefaultRegistry, "x", version)); err != nil {
		return fmt.Errorf("invalid version %q", version)
	}
	return nil
}

// ParseContainerLanguages parses the ContainerLanguages annotation:
// "<container>=<lang>,<lang>;<container>=<lang>". An empty language list means none.
func ParseContainerLanguages(value string) (map[string][]string, error) {
	out := map[string][]string{}
	for entry := range strings.SplitSeq(value, ";") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		name, langs, ok := strings.Cut(entry, "=")
		name = strings.TrimSpace(name)
		if !ok {
			return nil, bad(ContainerLanguages, entry, "missing '='", "write <container>=<lang>,<lang>; entries separated by ';'")
		}
		if msgs := validation.IsDNS1123Label(name); len(msgs) > 0 {
			return nil, bad(ContainerLanguages, entry, fmt.Sprintf("%q is not a container name", name), "write <container>=<lang>,<lang>")
		}
		if _, dup := out[name]; dup {
			return nil, bad(ContainerLanguages, entry, fmt.Sprintf("container %s is listed twice", name), "list each container once")
		}
		list := []string{}
		for l := range strings.SplitSeq(langs, ",") {
			l = strings.TrimSpace(l)
			if l == "" {
				continue
			}
			if !libref.IsLanguage(l) {
				return nil, bad(ContainerLanguages, entry, fmt.Sprintf("unknown language %q", l), "use languages from "+languageList)
			}
			if !slices.Contains(list, l) {
				list = append(list, l)
			}
		}
		out[name] = list
	}
	if len(out) == 0 {
		return nil, bad(ContainerLanguages, value, "no container listed", "write <container>=<lang>,<lang>; entries separated by ';'")
	}
	return out, nil
}

// Volume is a manual inline volume asked for with apm-csi.io/volume.<name>.
type Volume struct {
	// Name is the pod volume name (the <name> of the annotation key).
	Name string
	// Libraries (a library volume) are language names with optional versions or image
	// references; exactly one of Libraries and HostDir is set.
	Libraries []VolumeLibrary
	// HostDir names a host directory entry the node administrator declared.
	HostDir string
	// Source is the directory served from each image entry (not from language entries).
	Source string
	// MountPath, when set, is where the volume is mounted in the chosen containers; without it
	// the pod mounts the volume itself through its own volumeMounts.
	MountPath string
	// Containers that get the mount; empty means every container the webhook may touch.
	Containers []string
	ReadOnly   bool
}

// VolumeLibrary is one entry of a manual library volume.
type VolumeLibrary struct {
	// Language and Version name a Datadog library (Version empty: the configured one).
	Language string
	Version  string
	// Image is a full image reference instead of a language.
	Image string
}

func (l VolumeLibrary) String() string {
	switch {
	case l.Image != "":
		return l.Image
	case l.Version != "":
		return l.Language + ":" + l.Version
	}
	return l.Language
}

// Fields of a manual volume annotation.
const (
	fieldLibraries  = "libraries"
	fieldHostDir    = "hostdir"
	fieldSource     = "source"
	fieldMountPath  = "mountPath"
	fieldContainers = "containers"
	fieldReadOnly   = "readOnly"
)

var volumeFields = []string{fieldLibraries, fieldHostDir, fieldSource, fieldMountPath, fieldContainers, fieldReadOnly}

// IsVolumeKey reports whether an annotation key belongs to the manual volume syntax, including
// misspelt ones (apm-csi.io/volume, apm-csi.io/volumes.x) that ParseVolume then rejects with a
// precise message instead of ignoring.
func IsVolumeKey(key string) bool {
	return strings.HasPrefix(key, strings.TrimSuffix(VolumePrefix, "."))
}

// ParseVolume parses one manual volume annotation:
//
//	apm-csi.io/volume.<name>: "libraries=<entry>,<entry>; mountPath=/path[; containers=a,b][; readOnly=true]"
//	apm-csi.io/volume.<name>: "hostdir=<entry>; mountPath=/path[; containers=a,b][; readOnly=true]"
//
// A library entry is <lang>, <lang>:<version> or an image reference (with a '/' and a tag or
// digest); "source=/dir" sets the directory served from image entries.
func ParseVolume(key, value string) (*Volume, error) {
	name, ok := strings.CutPrefix(key, VolumePrefix)
	if !ok {
		return nil, bad(key, value, "unknown annotation", "manual volumes are declared as "+VolumePrefix+"<name>")
	}
	if msgs := validation.IsDNS1123Label(name); len(msgs) > 0 || len(name) > maxVolumeName {
		return nil, bad(key, value, fmt.Sprintf("volume name %q is not a DNS label of at most %d characters", name, maxVolumeName), "name the volume with lower-case letters, digits and '-', e.g. "+VolumePrefix+"tracer")
	}
	v := &Volume{Name: name}
	seen := map[string]bool{}
	for field := range strings.SplitSeq(value, ";") {
		field = strings.TrimSpace(field)
		if field == "" {
			continue
		}
		k, val, ok := strings.Cut(field, "=")
		k, val = strings.TrimSpace(k), strings.TrimSpace(val)
		if !ok {
			return nil, bad(key, field, "a field must be <key>=<value>", "separate fields with ';', e.g. libraries=java; mountPath=/datadog-lib")
		}
		if !slices.Contains(volumeFields, k) {
			return nil, bad(key, field, fmt.Sprintf("unknown field %q", k), "use the fields "+strings.Join(volumeFields, ", "))
		}
		if seen[k] {
			return nil, bad(key, field, fmt.Sprintf("field %s is given twice", k), "give each field once")
		}
		seen[k] = true
		if err := v.setField(key, field, k, val); err != nil {
			return nil, err
		}
	}
	switch {
	case seen[fieldLibraries] == seen[fieldHostDir]:
		return nil, bad(key, value, "a volume serves either libraries or a host directory", "give exactly one of libraries=<lang>,... or hostdir=<entry>")
	case seen[fieldSource] && !slices.ContainsFunc(v.Libraries, func(l VolumeLibrary) bool { return l.Image != "" }):
		return nil, bad(key, value, "source applies to image entries and the volume lists none", "remove source, or list an image reference in libraries")
	case len(v.Containers) > 0 && v.MountPath == "":
		return nil, bad(key, value, "containers without mountPath mounts nothing", "add mountPath=/path, or remove containers and mount the volume in your own volumeMounts")
	}
	return v, nil
}

func (v *Volume) setField(key, field, k, val string) error {
	switch k {
	case fieldLibraries:
		for item := range strings.SplitSeq(val, ",") {
			item = strings.TrimSpace(item)
			if item == "" {
				continue
			}
			lib, err := parseVolumeLibrary(key, item)
			if err != nil {
				return err
			}
			if slices.Contains(v.Libraries, lib) {
				return bad(key, item, "library listed twice", "list each library once")
			}
			v.Libraries = append(v.Libraries, lib)
		}
		if len(v.Libraries) == 0 {
			return bad(key, field, "no library listed", "list languages or images, e.g. libraries=java:v1.40.0,python")
		}
		if len(v.Libraries) > volumeattrs.MaxLibraries {
			return bad(key, field, fmt.Sprintf("%d libraries, a volume holds at most %d", len(v.Libraries), volumeattrs.MaxLibraries), "split the libraries over several volumes")
		}
	case fieldHostDir:
		if err := volumeattrs.ValidateEntryName(val); err != nil {
			return bad(key, field, err.Error(), "name an entry your node administrator declared, e.g. hostdir=datadog-apm-socket")
		}
		v.HostDir = val
	case fieldSource:
		if !strings.HasPrefix(val, "/") || path.Clean(val) != val || strings.ContainsAny(val, ",:\\") || hasControl(val) {
			return bad(key, field, "source must be a clean absolute directory inside the image", "e.g. source=/autoinstrumentation")
		}
		v.Source = val
	case fieldMountPath:
		if err := validateMountPath(val); err != nil {
			return bad(key, field, err.Error(), "give an absolute path such as mountPath=/datadog-lib")
		}
		v.MountPath = val
	case fieldContainers:
		for c := range strings.SplitSeq(val, ",") {
			c = strings.TrimSpace(c)
			if c == "" {
				continue
			}
			if msgs := validation.IsDNS1123Label(c); len(msgs) > 0 {
				return bad(key, field, fmt.Sprintf("%q is not a container name", c), "list container names separated by ',', e.g. containers=app,worker")
			}
			if slices.Contains(v.Containers, c) {
				return bad(key, field, fmt.Sprintf("container %s is listed twice", c), "list each container once")
			}
			v.Containers = append(v.Containers, c)
		}
		if len(v.Containers) == 0 {
			return bad(key, field, "no container listed", "list container names, or remove the field to mount into every container")
		}
	case fieldReadOnly:
		switch val {
		case "true":
			v.ReadOnly = true
		case "false":
			v.ReadOnly = false
		default:
			return bad(key, field, "readOnly must be true or false", "write readOnly=true or readOnly=false")
		}
	}
	return nil
}

func parseVolumeLibrary(key, item string) (VolumeLibrary, error) {
	if strings.ContainsFunc(item, unicode.IsSpace) {
		return VolumeLibrary{}, bad(key, item, "a library entry contains a space", "separate fields with ';' and libraries with ',', e.g. libraries=java,python; mountPath=/datadog-lib")
	}
	if strings.Contains(item, "/") {
		if _, err := libref.Parse(item); err != nil {
			return VolumeLibrary{}, bad(key, item, err.Error(), "give an image reference with a tag or digest, e.g. registry.example.com/team/lib:1.0")
		}
		return VolumeLibrary{Image: item}, nil
	}
	lang, version, hasVersion := strings.Cut(item, ":")
	if !libref.IsLanguage(lang) {
		return VolumeLibrary{}, bad(key, item, fmt.Sprintf("unknown library %q", lang), "name a language ("+languageList+"), optionally with a version (java:v1.40.0), or an image reference with a tag or digest")
	}
	if !hasVersion {
		return VolumeLibrary{Language: lang}, nil
	}
	if err := ValidateVersion(version); err != nil {
		return VolumeLibrary{}, bad(key, item, err.Error(), "write a tag such as java:v1.40.0 or a digest such as java:sha256:<64 hex digits>")
	}
	return VolumeLibrary{Language: lang, Version: version}, nil
}

func validateMountPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("empty mount path")
	case len(p) > maxMountPath:
		return fmt.Errorf("mount path is longer than %d characters", maxMountPath)
	case !strings.HasPrefix(p, "/"):
		return fmt.Errorf("mount path must be absolute")
	case p == "/":
		return fmt.Errorf("mount path must not be the container's root")
	case path.Clean(p) != p:
		return fmt.Errorf("mount path must be clean (no '..', '//', '.' or trailing '/')")
	case strings.ContainsAny(p, ":,;=\\") || hasControl(p):
		return fmt.Errorf("mount path must not contain ':', ',', ';', '=', '\\' or control characters")
	}
	return nil
}

func hasControl(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

// Format writes the volume in the canonical annotation syntax that ParseVolume reads.
func (v *Volume) Format() (key, value string) {
	var fields []string
	if v.HostDir != "" {
		fields = append(fields, fieldHostDir+"="+v.HostDir)
	} else {
		var libs []string
		for _, l := range v.Libraries {
			libs = append(libs, l.String())
		}
		fields = append(fields, fieldLibraries+"="+strings.Join(libs, ","))
	}
	if v.Source != "" {
		fields = append(fields, fieldSource+"="+v.Source)
	}
	if v.MountPath != "" {
		fields = append(fields, fieldMountPath+"="+v.MountPath)
	}
	if len(v.Containers) > 0 {
		fields = append(fields, fieldContainers+"="+strings.Join(v.Containers, ","))
	}
	if v.ReadOnly {
		fields = append(fields, fieldReadOnly+"=true")
	}
	return VolumePrefix + v.Name, strings.Join(fields, "; ")
}

// ParseVolumes parses every manual volume annotation of a pod, in key order so that the
// result (and so the pod the webhook writes) does not depend on map iteration.
func ParseVolumes(podAnnotations map[string]string) ([]*Volume, error) {
	var keys []string
	for k := range podAnnotations {
		if IsVolumeKey(k) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	if len(keys) > MaxVolumes {
		return nil, bad(keys[MaxVolumes], podAnnotations[keys[MaxVolumes]], fmt.Sprintf("%d manual volumes, the limit is %d", len(keys), MaxVolumes), "combine libraries into fewer volumes")
	}
	var out []*Volume
	for _, k := range keys {
		v, err := ParseVolume(k, podAnnotations[k])
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}
