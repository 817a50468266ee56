// Package volumeattrs is the public contract of the apm-csi CSI driver: the volumeAttributes
// a pod (or the webhook on its behalf) writes into a CSI volume, and the validated Spec the
// node plugin acts on. The webhook is its main writer (Spec.Attributes), the node plugin its
// only reader (Parse). Nothing in this schema can name a host path: host directories are
// referred to by the name of an entry the node administrator declared.
package volumeattrs

import (
	"fmt"
	"maps"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/apm-csi/apm-csi/shared/libref"
)

// Kind is what a volume serves, after Datadog aliases are resolved.
type Kind string

const (
	// KindHostDir bind-mounts an admin-allowlisted host directory (or file, such as a socket).
	KindHostDir Kind = "hostdir"
	// KindLibrary serves one or more tracer library images composed into one overlay mount.
	KindLibrary Kind = "library"
	// KindPreload serves a single read-only file holding an ld.so.preload line.
	KindPreload Kind = "preload"
)

// Values of the "type" attribute. The Datadog ones are accepted so that pods written for the
// Datadog Cluster Agent's "csi" injection mode work unchanged with this driver.
const (
	TypeHostDir = string(KindHostDir)
	TypeLibrary = string(KindLibrary)
	TypePreload = string(KindPreload)

	TypeDatadogLibrary         = "DatadogLibrary"
	TypeDatadogInjectorPreload = "DatadogInjectorPreload"
	TypeAPMSocket              = "APMSocket"
	TypeDSDSocket              = "DSDSocket"
	TypeAPMSocketDirectory     = "APMSocketDirectory"
	TypeDSDSocketDirectory     = "DSDSocketDirectory"
)

// DatadogSocketTypes are the Datadog socket volume types; each maps to a hostdir entry that
// the node administrator configures.
var DatadogSocketTypes = []string{TypeAPMSocket, TypeDSDSocket, TypeAPMSocketDirectory, TypeDSDSocketDirectory}

// Attribute keys.
const (
	KeyType = "type"
	// KeyName names a hostdir entry (type hostdir).
	KeyName = "name"
	// KeyReadOnly ("true"/"false") asks for a read-only volume; the CSI readonly flag does too.
	KeyReadOnly = "readOnly"
	// KeyPreload is the absolute path (inside the container) of the shared object that the
	// ld.so.preload file names. For type preload it is the file's content (default
	// libref.LauncherPath); for type library it adds the file at PreloadFile in the volume.
	KeyPreload = "preload"
	// KeyWritableLimit bounds the writable layer of a library volume: a Kubernetes quantity
	// of bytes such as 64Mi. Without it the node's default applies; the node refuses more
	// than its administrator's maximum.
	KeyWritableLimit = "writableLimit"

	// Library entries are indexed from 0 without gaps: library.0.image, library.1.image, ...
	keyLibraryPrefix = "library."
	fieldImage       = "image"
	fieldSource      = "source"
	fieldTarget      = "target"

	// Datadog Cluster Agent "csi" mode keys.
	DDKeyPackage  = "dd.csi.datadog.com/library.package"
	DDKeyRegistry = "dd.csi.datadog.com/library.registry"
	DDKeyVersion  = "dd.csi.datadog.com/library.version"
	DDKeyImage    = "dd.csi.datadog.com/library.image"
	DDKeySource   = "dd.csi.datadog.com/library.source"
	ddPrefix      = "dd.csi.datadog.com/"

	// kubeletPrefix marks the keys kubelet adds itself (pod info, ephemeral flag, tokens).
	kubeletPrefix = "csi.storage.k8s.io/"
)

// PreloadFile is where a library volume with a preload line holds the ld.so.preload file.
const PreloadFile = "etc/ld.so.preload"

// Limits that keep one volume's mount options and work bounded.
const (
	MaxLibraries  = 16
	maxPathLength = 512
	maxNameLength = 63
)

// MinWritableLimit is the smallest writableLimit accepted: the overlay's own directories need
// a few blocks.
const MinWritableLimit int64 = 1 << 20

// maxWritableLimit keeps writableLimit far from overflowing int64; nodes set much lower
// maximums.
const maxWritableLimit int64 = 1 << 50

// LibraryKey returns the attribute key of field ("image", "source" or "target") of library i.
func LibraryKey(i int, field string) string {
	return keyLibraryPrefix + strconv.Itoa(i) + "." + field
}

// Library is one image's directory placed somewhere inside a library volume.
type Library struct {
	// Image is the OCI reference: repo:tag, repo@sha256:... or repo:tag@sha256:...
	Image string
	// Source is the absolute, clean directory inside the image to serve. Default
	// libref.LibrarySource ("/datadog-init/package").
	Source string
	// Target is the clean, relative directory inside the volume where Source appears; "" is
	// the volume root. Several libraries may share a target: their trees merge, as they did
	// when init containers copied them into one emptyDir, and the first listed wins a conflict.
	Target string
}

// Spec is a validated volume request.
type Spec struct {
	Kind Kind
	// Type is the "type" attribute as written, e.g. "DatadogLibrary" or "APMSocket".
	Type string
	// HostDir is the hostdir entry name (KindHostDir, type hostdir). Empty for Datadog socket
	// types: the node maps Type to an entry.
	HostDir string
	// Libraries in stacking order: the first one is the top layer.
	Libraries []Library
	// Preload is the ld.so.preload line (KindPreload, or KindLibrary with a preload file).
	Preload string
	// ReadOnly is the readOnly attribute; the node ORs it with the CSI readonly flag.
	ReadOnly bool
	// WritableLimit (bytes) bounds the writable layer of a library volume; 0 means the
	// node's default.
	WritableLimit int64
}

// Error is a validation error. Its message names the attribute and says what is accepted, so it
// can go straight into a gRPC InvalidArgument status or an admission denial.
type Error struct {
	Key    string
	Value  string
	Reason string
}

func (e *Error) Error() string {
	if e.Key == "" {
		return e.Reason
	}
	return fmt.Sprintf("volume attribute %q=%q: %s", e.Key, e.Value, e.Reason)
}

func errorf(key, value, format string, args ...any) error {
	return &Error{Key: key, Value: truncate(value), Reason: fmt.Sprintf(format, args...)}
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Parse validates volume attributes. Keys that kubelet adds (csi.storage.k8s.io/...) are
// ignored; any other key the type does not define is an error, so a typo is caught instead of
// silently ignored. For the Datadog types, unknown dd.csi.datadog.com/ keys are tolerated
// because newer cluster agents may add some.
func Parse(attrs map[string]string) (*Spec, error) {
	typ, ok := attrs[KeyType]
	if !ok {
		return nil, &Error{Reason: fmt.Sprintf("volume attribute %q is missing; use one of %s", KeyType, strings.Join(types(), ", "))}
	}
	spec := &Spec{Type: typ}
	ro, err := parseBool(attrs, KeyReadOnly)
	if err != nil {
		return nil, err
	}
	spec.ReadOnly = ro

	var allowed []string
	switch typ {
	case TypeHostDir:
		spec.Kind = KindHostDir
		allowed = []string{KeyName}
		n, ok := attrs[KeyName]
		if !ok {
			return nil, errorf(KeyName, "", "a hostdir volume needs the name of an entry the node administrator declared")
		}
		if err := ValidateEntryName(n); err != nil {
			return nil, errorf(KeyName, n, "%v", err)
		}
		spec.HostDir = n
	case TypeAPMSocket, TypeDSDSocket, TypeAPMSocketDirectory, TypeDSDSocketDirectory:
		spec.Kind = KindHostDir
	case TypeLibrary:
		spec.Kind = KindLibrary
		libs, keys, err := parseLibraries(attrs)
		if err != nil {
			return nil, err
		}
		spec.Libraries = libs
		allowed = append(keys, KeyPreload, KeyWritableLimit)
		if p, ok := attrs[KeyPreload]; ok {
			if err := validatePreload(p); err != nil {
				return nil, errorf(KeyPreload, p, "%v", err)
			}
			spec.Preload = p
		}
	case TypePreload:
		spec.Kind = KindPreload
		allowed = []string{KeyPreload}
		spec.Preload = libref.LauncherPath
		if p, ok := attrs[KeyPreload]; ok {
			if err := validatePreload(p); err != nil {
				return nil, errorf(KeyPreload, p, "%v", err)
			}
			spec.Preload = p
		}
	case TypeDatadogInjectorPreload:
		spec.Kind = KindPreload
		spec.Preload = libref.LauncherPath
		// The Datadog driver serves this file read-only whatever the request says.
		spec.ReadOnly = true
	case TypeDatadogLibrary:
		spec.Kind = KindLibrary
		lib, err := parseDatadogLibrary(attrs)
		if err != nil {
			return nil, err
		}
		spec.Libraries = []Library{lib}
		allowed = []string{KeyWritableLimit}
	default:
		return nil, errorf(KeyType, typ, "unknown volume type; use one of %s", strings.Join(types(), ", "))
	}

	if v, ok := attrs[KeyWritableLimit]; ok && spec.Kind == KindLibrary {
		n, err := ParseWritableLimit(v)
		if err != nil {
			return nil, err
		}
		spec.WritableLimit = n
	}

	datadog := strings.HasPrefix(typ, "Datadog") || slices.Contains(DatadogSocketTypes, typ)
	for k := range attrs {
		if k == KeyType || k == KeyReadOnly || strings.HasPrefix(k, kubeletPrefix) || slices.Contains(allowed, k) {
			continue
		}
		if datadog && strings.HasPrefix(k, ddPrefix) {
			continue
		}
		return nil, errorf(k, attrs[k], "unknown attribute for type %s", typ)
	}
	return spec, nil
}

// exponentNotation matches the decimal exponent form of a quantity (1e9, 5E+3), not the E and
// Ei suffixes.
var exponentNotation = regexp.MustCompile(`[eE][+-]?[0-9]`)

// ParseWritableLimit parses a writableLimit value: a whole number of bytes written as a
// Kubernetes quantity (64Mi, 1Gi, 500M, 1048576), at least MinWritableLimit.
func ParseWritableLimit(v string) (int64, error) {
	if len(v) > 32 {
		return 0, errorf(KeyWritableLimit, v, "must be a size such as 64Mi or 1Gi")
	}
	// Exponent notation ("1e12700019") is refused before parsing: comparing such a quantity
	// computes the power of ten, which a pod could make take minutes of the plugin's CPU.
	if exponentNotation.MatchString(v) {
		return 0, errorf(KeyWritableLimit, v, "must be a size such as 64Mi or 1Gi, without exponent notation")
	}
	q, err := resource.ParseQuantity(v)
	if err != nil {
		return 0, errorf(KeyWritableLimit, v, "must be a size such as 64Mi or 1Gi (a Kubernetes quantity of bytes)")
	}
	if q.Cmp(*resource.NewQuantity(maxWritableLimit, resource.BinarySI)) > 0 {
		return 0, errorf(KeyWritableLimit, v, "must be at most 1Pi")
	}
	// Value rounds a fraction of a byte up and wraps what int64 cannot hold: either way the
	// number no longer equals the quantity.
	n := q.Value()
	if q.Cmp(*resource.NewQuantity(n, resource.BinarySI)) != 0 {
		return 0, errorf(KeyWritableLimit, v, "must be a whole number of bytes, such as 64Mi or 1Gi")
	}
	if n < MinWritableLimit {
		return 0, errorf(KeyWritableLimit, v, "must be at least 1Mi")
	}
	return n, nil
}

// FormatWritableLimit writes n bytes as a quantity that ParseWritableLimit reads back (64Mi).
func FormatWritableLimit(n int64) string {
	return resource.NewQuantity(n, resource.BinarySI).String()
}

func types() []string {
	return append([]string{TypeHostDir, TypeLibrary, TypePreload, TypeDatadogLibrary, TypeDatadogInjectorPreload}, DatadogSocketTypes...)
}

func parseBool(attrs map[string]string, key string) (bool, error) {
	v, ok := attrs[key]
	if !ok {
		return false, nil
	}
	switch v {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, errorf(key, v, "must be \"true\" or \"false\"")
}

func parseLibraries(attrs map[string]string) ([]Library, []string, error) {
	// Find the highest index first so that a gap is reported precisely.
	maxIndex := -1
	for k, v := range attrs {
		rest, ok := strings.CutPrefix(k, keyLibraryPrefix)
		if !ok {
			continue
		}
		idx, field, ok := strings.Cut(rest, ".")
		if !ok || (field != fieldImage && field != fieldSource && field != fieldTarget) {
			return nil, nil, errorf(k, v, "library keys are library.<index>.image, library.<index>.source and library.<index>.target")
		}
		i, err := strconv.Atoi(idx)
		if err != nil || i < 0 || strconv.Itoa(i) != idx {
			return nil, nil, errorf(k, v, "library index must be a number from 0 to %d", MaxLibraries-1)
		}
		if i >= MaxLibraries {
			return nil, nil, errorf(k, v, "a volume holds at most %d libraries", MaxLibraries)
		}
		maxIndex = max(maxIndex, i)
	}
	if maxIndex < 0 {
		return nil, nil, errorf(LibraryKey(0, fieldImage), "", "a library volume needs at least one library: set library.0.image to an image reference")
	}
	var libs []Library
	var keys []string
	for i := 0; i <= maxIndex; i++ {
		ik, sk, tk := LibraryKey(i, fieldImage), LibraryKey(i, fieldSource), LibraryKey(i, fieldTarget)
		keys = append(keys, ik, sk, tk)
		img, ok := attrs[ik]
		if !ok {
			return nil, nil, errorf(ik, "", "missing: library entries are numbered from 0 without gaps and each needs an image")
		}
		if _, err := libref.Parse(img); err != nil {
			return nil, nil, errorf(ik, img, "%v", err)
		}
		lib := Library{Image: img, Source: libref.LibrarySource}
		if s, ok := attrs[sk]; ok {
			src, err := cleanSource(s)
			if err != nil {
				return nil, nil, errorf(sk, s, "%v", err)
			}
			lib.Source = src
		}
		if t, ok := attrs[tk]; ok {
			tgt, err := CleanTarget(t)
			if err != nil {
				return nil, nil, errorf(tk, t, "%v", err)
			}
			lib.Target = tgt
		}
		libs = append(libs, lib)
	}
	return libs, keys, nil
}

func parseDatadogLibrary(attrs map[string]string) (Library, error) {
	if img, ok := attrs[DDKeyImage]; ok {
		if _, err := libref.Parse(img); err != nil {
			return Library{}, errorf(DDKeyImage, img, "%v", err)
		}
		lib := Library{Image: img, Source: libref.LibrarySource}
		if s, ok := attrs[DDKeySource]; ok {
			src, err := cleanSource(s)
			if err != nil {
				return Library{}, errorf(DDKeySource, s, "%v", err)
			}
			lib.Source = src
		}
		return lib, nil
	}
	pkg := attrs[DDKeyPackage]
	if pkg == "" {
		return Library{}, errorf(DDKeyPackage, "", "a DatadogLibrary volume needs a package (e.g. dd-lib-python-init or apm-inject) or an image")
	}
	if pkg != libref.InjectorPackage {
		if _, ok := libref.LanguageOfPackage(pkg); !ok {
			return Library{}, errorf(DDKeyPackage, pkg, "unknown package; use apm-inject or dd-lib-<lang>-init with lang one of %s", strings.Join(libref.Languages, ", "))
		}
	}
	registry := attrs[DDKeyRegistry]
	if registry == "" {
		registry = libref.DefaultRegistry
	}
	version := attrs[DDKeyVersion]
	if version == "" {
		return Library{}, errorf(DDKeyVersion, "", "a DatadogLibrary volume needs a version: a tag, sha256:<digest> or tag@sha256:<digest>")
	}
	img := libref.Image(registry, pkg, version)
	if _, err := libref.Parse(img); err != nil {
		return Library{}, errorf(DDKeyVersion, version, "%v", err)
	}
	return Library{Image: img, Source: libref.SourceForPackage(pkg)}, nil
}

// cleanSource validates a directory inside an image: absolute, clean, no "..".
func cleanSource(s string) (string, error) {
	if err := checkPathChars(s); err != nil {
		return "", err
	}
	if !strings.HasPrefix(s, "/") {
		return "", fmt.Errorf("must be an absolute directory inside the image, such as %s", libref.LibrarySource)
	}
	if hasDotDot(s) {
		return "", fmt.Errorf("must not contain \"..\"")
	}
	return path.Clean(s), nil
}

// CleanTarget validates a directory inside the volume: relative, no "..", cleaned; "" and "."
// both mean the volume root and return "".
func CleanTarget(t string) (string, error) {
	if err := checkPathChars(t); err != nil {
		return "", err
	}
	if strings.HasPrefix(t, "/") {
		return "", fmt.Errorf("must be relative to the volume root, such as %s/python", libref.LibraryTargetDir)
	}
	if hasDotDot(t) {
		return "", fmt.Errorf("must not contain \"..\"")
	}
	c := path.Clean(t)
	if c == "." {
		return "", nil
	}
	return c, nil
}

func validatePreload(p string) error {
	if err := checkPathChars(p); err != nil {
		return err
	}
	if !strings.HasPrefix(p, "/") || hasDotDot(p) || path.Clean(p) != p {
		return fmt.Errorf("must be a clean absolute path of a shared object inside the container, such as %s", libref.LauncherPath)
	}
	if strings.ContainsAny(p, " \t:") {
		return fmt.Errorf("must be a single path without spaces or ':'")
	}
	return nil
}

func checkPathChars(p string) error {
	if len(p) > maxPathLength {
		return fmt.Errorf("is %d characters long, the limit is %d", len(p), maxPathLength)
	}
	for _, r := range p {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("contains a control character")
		}
	}
	// Overlayfs separates lower dirs with ':' and mount options with ','; neither may appear
	// in anything that ends up in mount options.
	if strings.ContainsAny(p, ",:\\") {
		return fmt.Errorf("must not contain ',', ':' or '\\'")
	}
	return nil
}

func hasDotDot(p string) bool {
	return slices.Contains(strings.Split(p, "/"), "..")
}

// ValidateEntryName checks a hostdir entry name: a DNS-label-like word, never a path.
func ValidateEntryName(n string) error {
	if n == "" {
		return fmt.Errorf("entry name is empty")
	}
	if len(n) > maxNameLength {
		return fmt.Errorf("entry name is longer than %d characters", maxNameLength)
	}
	if strings.ContainsAny(n, "/\x00") || strings.Contains(n, "..") {
		return fmt.Errorf("entry name must not contain '/', '..' or NUL: it names an entry, not a path")
	}
	for i, r := range n {
		ok := r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.'
		if !ok || (i == 0 && (r == '-' || r == '.')) {
			return fmt.Errorf("entry name may contain only lower-case letters, digits, '-', '_' and '.', and must start with a letter or digit")
		}
	}
	return nil
}

// Attributes encodes the spec as volume attributes: the inverse of Parse for specs written with
// the apm-csi types. Datadog specs are encoded in apm-csi's own form.
func (s *Spec) Attributes() map[string]string {
	a := map[string]string{}
	if s.ReadOnly {
		a[KeyReadOnly] = "true"
	}
	switch s.Kind {
	case KindHostDir:
		a[KeyType] = TypeHostDir
		a[KeyName] = s.HostDir
	case KindPreload:
		a[KeyType] = TypePreload
		if s.Preload != "" && s.Preload != libref.LauncherPath {
			a[KeyPreload] = s.Preload
		}
	case KindLibrary:
		a[KeyType] = TypeLibrary
		for i, l := range s.Libraries {
			a[LibraryKey(i, fieldImage)] = l.Image
			if l.Source != "" && l.Source != libref.LibrarySource {
				a[LibraryKey(i, fieldSource)] = l.Source
			}
			if l.Target != "" {
				a[LibraryKey(i, fieldTarget)] = l.Target
			}
		}
		if s.Preload != "" {
			a[KeyPreload] = s.Preload
		}
		if s.WritableLimit != 0 {
			a[KeyWritableLimit] = FormatWritableLimit(s.WritableLimit)
		}
	}
	return a
}

// Redact returns a copy of attrs without kubelet's service account tokens and anything else
// that may carry a secret, for logging.
func Redact(attrs map[string]string) map[string]string {
	out := maps.Clone(attrs)
	for k := range out {
		lk := strings.ToLower(k)
		if strings.Contains(lk, "token") || strings.Contains(lk, "secret") || strings.Contains(lk, "password") {
			out[k] = "<redacted>"
		}
	}
	return out
}
