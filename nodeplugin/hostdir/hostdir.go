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

	"github.com/apm-csi/apm-csi/shared/repoallow"
	"github.com/apm-csi/apm-csi/shared/tenancy"
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

	// Who may use the entry (package tenancy). Namespaces is required: ["*"] for every
	// namespace, written explicitly. The node plugin enforces Namespaces and ServiceAccounts
	// against what kubelet reports for the pod; NamespaceSelector is evaluated by the webhook.
	Namespaces        []string `json:"namespaces,omitempty"`
	NamespaceSelector string   `json:"namespaceSelector,omitempty"`
	ServiceAccounts   []string `json:"serviceAccounts,omitempty"`
}

// Tenancy returns who may use the entry.
func (e Entry) Tenancy() tenancy.Tenancy {
	return tenancy.Tenancy{Namespaces: e.Namespaces, NamespaceSelector: e.NamespaceSelector, ServiceAccounts: e.ServiceAccounts}
}

// Flag option words after NAME=PATH.
const (
	optionReadOnly          = "ro"
	optionCreate            = "create"
	optionNamespaces        = "namespaces"
	optionServiceAccounts   = "service-accounts"
	optionNamespaceSelector = "namespace-selector"
)

// FlagSyntax is the --hostdir syntax, for messages.
const FlagSyntax = "NAME=PATH[,ro][,create],namespaces=NS1|NS2|*[,service-accounts=NS/SA|NS/SA][,namespace-selector=KEY=VALUE&KEY2 in (A|B)]"

// Separators inside a flag option value: ',' already separates the options.
const (
	flagListSep        = "|"
	flagRequirementSep = "&"
)

// ParseEntry parses the --hostdir flag syntax (FlagSyntax). Lists are separated by '|'; in a
// namespace selector, written in Kubernetes label selector syntax, '&' separates requirements
// and '|' the values of "in (...)" and "notin (...)", where the selector syntax has commas.
func ParseEntry(s string) (Entry, error) {
	name, rest, ok := strings.Cut(s, "=")
	if !ok {
		return Entry{}, fmt.Errorf("hostdir %q: want %s", s, FlagSyntax)
	}
	fields := strings.Split(rest, ",")
	e := Entry{Name: name, Path: fields[0]}
	seen := map[string]bool{}
	for _, opt := range fields[1:] {
		key, val, hasValue := strings.Cut(opt, "=")
		if seen[key] {
			return Entry{}, fmt.Errorf("hostdir %q: option %q is given twice", s, key)
		}
		seen[key] = true
		switch {
		case key == optionReadOnly && !hasValue:
			e.ReadOnly = true
		case key == optionCreate && !hasValue:
			e.Create = true
		case key == optionNamespaces && hasValue:
			e.Namespaces = splitFlagList(val)
			if len(e.Namespaces) == 0 {
				return Entry{}, fmt.Errorf("hostdir %q: namespaces= is empty: list namespaces (namespaces=team-a|team-b), or write namespaces=* to let every namespace use the entry", s)
			}
		case key == optionServiceAccounts && hasValue:
			e.ServiceAccounts = splitFlagList(val)
			if len(e.ServiceAccounts) == 0 {
				return Entry{}, fmt.Errorf("hostdir %q: service-accounts= is empty: list NAMESPACE/NAME|..., or leave the option out", s)
			}
		case key == optionNamespaceSelector && hasValue:
			if val == "" {
				return Entry{}, fmt.Errorf("hostdir %q: namespace-selector= is empty: write KEY=VALUE, or leave the option out", s)
			}
			e.NamespaceSelector = strings.NewReplacer(flagRequirementSep, ",", flagListSep, ",").Replace(val)
		default:
			return Entry{}, fmt.Errorf("hostdir %q: unknown option %q; the syntax is %s", s, opt, FlagSyntax)
		}
	}
	if err := e.Validate(); err != nil {
		return Entry{}, err
	}
	return e.normalize(), nil
}

func splitFlagList(v string) []string {
	if v == "" {
		return nil
	}
	return strings.Split(v, flagListSep)
}

// String returns the flag syntax of e; ParseEntry(e.String()) equals e for a valid entry
// (after ParseEntry or ParseConfig normalised its selector).
func (e Entry) String() string {
	s := e.Name + "=" + e.Path
	if e.ReadOnly {
		s += "," + optionReadOnly
	}
	if e.Create {
		s += "," + optionCreate
	}
	if len(e.Namespaces) > 0 {
		s += "," + optionNamespaces + "=" + strings.Join(e.Namespaces, flagListSep)
	}
	if len(e.ServiceAccounts) > 0 {
		s += "," + optionServiceAccounts + "=" + strings.Join(e.ServiceAccounts, flagListSep)
	}
	if e.NamespaceSelector != "" {
		s += "," + optionNamespaceSelector + "=" + selectorToFlag(e.NamespaceSelector)
	}
	return s
}

// selectorToFlag writes a label selector in the flag's form: commas between requirements
// become '&', commas inside parentheses '|'.
func selectorToFlag(sel string) string {
	var b strings.Builder
	depth := 0
	for _, c := range sel {
		switch {
		case c == '(':
			depth++
		case c == ')':
			depth--
		case c == ',' && depth > 0:
			b.WriteString(flagListSep)
			continue
		case c == ',':
			b.WriteString(flagRequirementSep)
			continue
		}
		b.WriteRune(c)
	}
	return b.String()
}

// normalize puts the selector in its canonical form.
func (e Entry) normalize() Entry {
	e.NamespaceSelector = e.Tenancy().Normalize().NamespaceSelector
	return e
}

// Validate checks the name (the same rule volumes are checked against), the path (absolute,
// clean, not the host root, free of the characters the flag syntax reserves) and the tenancy:
// an entry that does not say who may use it is refused.
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
	if err := e.Tenancy().Validate(); err != nil {
		return fmt.Errorf("hostdir %q: %w", e.Name, err)
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
	allowed := "none are declared (the node administrator adds them with --hostdir " + FlagSyntax + ")"
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
	// AllowedRepositories and PullSecretScopes extend the library cache's
	// --allowed-repository and --pull-secret-scope flags.
	AllowedRepositories []string                `json:"allowedRepositories,omitempty"`
	PullSecretScopes    []repoallow.SecretScope `json:"pullSecretScopes,omitempty"`
}

// ParseConfig decodes a config file strictly: an unknown field is an error, not ignored.
func ParseConfig(data []byte) (Config, error) {
	var c Config
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	for i, e := range c.HostDirs {
		// An empty list would read as "no restriction": refuse it, as the flag syntax does.
		if e.ServiceAccounts != nil && len(e.ServiceAccounts) == 0 {
			return Config{}, fmt.Errorf("config: hostdir %q: serviceAccounts is empty: list NAMESPACE/NAME entries, or leave the field out to allow every service account of the entry's namespaces", e.Name)
		}
		if err := e.Validate(); err != nil {
			return Config{}, fmt.Errorf("config: %w", err)
		}
		c.HostDirs[i] = e.normalize()
	}
	for typ, name := range c.DatadogSockets {
		if err := validateSocketMapping(typ, name); err != nil {
			return Config{}, fmt.Errorf("config: %w", err)
		}
	}
	for _, r := range c.AllowedRepositories {
		if _, err := repoallow.Normalize(r); err != nil {
			return Config{}, fmt.Errorf("config: allowedRepositories: %w", err)
		}
	}
	for i := range c.PullSecretScopes {
		if err := c.PullSecretScopes[i].Normalize(); err != nil {
			return Config{}, fmt.Errorf("config: pullSecretScopes: %w", err)
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
