// Package hostdir holds the node administrator's allowlist of host directories (and single
// files such as unix sockets) that pods may mount through `type: hostdir` volumes. Pods name an
// entry; only the administrator, through --hostdir flags or the config file, names host paths.
package hostdir

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// Entry is one allowlisted host path.
type Entry struct {
	// Name is what a volume's "name" attribute refers to.
	Name string `json:"name"`
	// Path is the absolute host path: a directory, or a single file such as a unix socket.
	Path string `json:"path"`
	// ReadOnly entries are always mounted read-only, and a writable request for one is refused.
	ReadOnly bool `json:"readOnly,omitempty"`
	// Create makes a missing Path a directory at publish time instead of refusing the volume.
	Create bool `json:"create,omitempty"`
}

// Flag option words after NAME=PATH.
const (
	optionReadOnly = "ro"
	optionCreate   = "create"
)

// ParseEntry parses the --hostdir flag syntax NAME=PATH[,ro][,create].
func ParseEntry(s string) (Entry, error) {
	name, rest, ok := strings.Cut(s, "=")
	if !ok {
		return Entry{}, fmt.Errorf("hostdir %q: want NAME=PATH[,ro][,create]", s)
	}
	fields := strings.Split(rest, ",")
	e := Entry{Name: name, Path: fields[0]}
	for _, opt := range fields[1:] {
		switch opt {
		case optionReadOnly:
			e.ReadOnly = true
		case optionCreate:
			e.Create = true
		default:
			return Entry{}, fmt.Errorf("hostdir %q: unknown option %q; options are %q and %q", s, opt, optionReadOnly, optionCreate)
		}
	}
	if err := e.Validate(); err != nil {
		return Entry{}, err
	}
	return e, nil
}

// String returns the flag syntax of e; ParseEntry(e.String()) == e for a valid entry.
func (e Entry) String() string {
	s := e.Name + "=" + e.Path
	if e.ReadOnly {
		s += "," + optionReadOnly
	}
	if e.Create {
		s += "," + optionCreate
	}
	return s
}

// Validate checks the name (the same rule volumes are checked against) and the path: absolute,
// clean, not the host root, and free of the characters the flag syntax reserves.
func (e Entry) Validate() error {
	if err := volumeattrs.ValidateEntryName(e.Name); err != nil {
		return fmt.Errorf("hostdir %q: %v", e.Name, err)
	}
	p := e.Path
	switch {
	case p == "":
		return fmt.Errorf("hostdir %q: empty path", e.Name)
	case strings.ContainsAny(p, ",\x00\n"):
		return fmt.Errorf("hostdir %q: path %q must not contain ',', NUL or a newline", e.Name, p)
	case !filepath.IsAbs(p) || filepath.Clean(p) != p:
		return fmt.Errorf("hostdir %q: path %q must be absolute and clean (no '..', no trailing '/')", e.Name, p)
	case p == "/":
		return fmt.Errorf("hostdir %q: the host root cannot be shared", e.Name)
	}
	return nil
}

// Set is a validated allowlist, looked up by name.
type Set struct {
	entries map[string]Entry
}

// NewSet validates entries and refuses duplicate names.
func NewSet(entries []Entry) (*Set, error) {
	s := &Set{entries: make(map[string]Entry, len(entries))}
	for _, e := range entries {
		if err := e.Validate(); err != nil {
			return nil, err
		}
		if _, dup := s.entries[e.Name]; dup {
			return nil, fmt.Errorf("hostdir %q is declared twice", e.Name)
		}
		s.entries[e.Name] = e
	}
	return s, nil
}

// Names returns the declared entry names, sorted.
func (s *Set) Names() []string {
	return slices.Sorted(maps.Keys(s.entries))
}

// Lookup returns the entry called name. Its error lists the declared entries, so that the
// person reading a pod event knows what to write instead.
func (s *Set) Lookup(name string) (Entry, error) {
	if e, ok := s.entries[name]; ok {
		return e, nil
	}
	allowed := "none are declared (the node administrator adds them with --hostdir NAME=PATH)"
	if names := s.Names(); len(names) > 0 {
		allowed = "declared entries: " + strings.Join(names, ", ")
	}
	return Entry{}, fmt.Errorf("hostdir entry %q is not declared on this node; %s", name, allowed)
}

// Config is the --config file: the same settings as the repeatable flags, for deployments that
// keep them in a ConfigMap. JSON or YAML.
type Config struct {
	HostDirs []Entry `json:"hostdirs"`
	// DatadogSockets maps a Datadog socket volume type (APMSocket, DSDSocket,
	// APMSocketDirectory, DSDSocketDirectory) to the name of a hostdir entry.
	DatadogSockets map[string]string `json:"datadogSockets,omitempty"`
}

// ParseConfig decodes a config file strictly: an unknown field is an error, not ignored.
func ParseConfig(data []byte) (Config, error) {
	var c Config
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	for _, e := range c.HostDirs {
		if err := e.Validate(); err != nil {
			return Config{}, fmt.Errorf("config: %w", err)
		}
	}
	for typ, name := range c.DatadogSockets {
		if err := validateSocketMapping(typ, name); err != nil {
			return Config{}, fmt.Errorf("config: %w", err)
		}
	}
	return c, nil
}

// LoadConfig reads and parses a config file.
func LoadConfig(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, err
	}
	return ParseConfig(data)
}

// DefaultDatadogSockets is the entry each Datadog socket type maps to unless configured.
func DefaultDatadogSockets() map[string]string {
	return map[string]string{
		volumeattrs.TypeAPMSocket:          "apm-socket",
		volumeattrs.TypeDSDSocket:          "dsd-socket",
		volumeattrs.TypeAPMSocketDirectory: "apm-socket-dir",
		volumeattrs.TypeDSDSocketDirectory: "dsd-socket-dir",
	}
}

// ParseSocketMapping parses the --datadog-socket-entry syntax TYPE=ENTRY.
func ParseSocketMapping(s string) (typ, entry string, err error) {
	typ, entry, ok := strings.Cut(s, "=")
	if !ok {
		return "", "", fmt.Errorf("datadog socket entry %q: want TYPE=ENTRY, e.g. APMSocket=apm-socket", s)
	}
	if err := validateSocketMapping(typ, entry); err != nil {
		return "", "", err
	}
	return typ, entry, nil
}

func validateSocketMapping(typ, entry string) error {
	if !slices.Contains(volumeattrs.DatadogSocketTypes, typ) {
		return fmt.Errorf("datadog socket type %q: use one of %s", typ, strings.Join(volumeattrs.DatadogSocketTypes, ", "))
	}
	if err := volumeattrs.ValidateEntryName(entry); err != nil {
		return fmt.Errorf("datadog socket type %s: %v", typ, err)
	}
	return nil
}
