// Package flagenv sets command-line flags from environment variables: flag --state-dir from
// PREFIX_STATE_DIR. A flag given on the command line wins over its variable. A flag whose
// value is Repeatable takes several values in one variable, separated by ';' or newlines.
package flagenv

import (
	"flag"
	"fmt"
	"strings"
)

// Repeatable is a flag value that collects every occurrence of its flag. Flag values declare
// it themselves, so the variable of a new repeatable flag is split with no list to keep.
type Repeatable interface {
	flag.Value
	IsRepeatable() bool
}

// IsRepeatable reports whether f's value is Repeatable.
func IsRepeatable(f *flag.Flag) bool {
	r, ok := f.Value.(Repeatable)
	return ok && r.IsRepeatable()
}

// Name is the variable of flagName: prefix, then the name in upper case with '-' as '_'.
func Name(prefix, flagName string) string {
	return prefix + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// Apply sets every flag of the parsed fs that was not given on the command line from its
// variable, if that is set and not empty. The error names the variable and its value.
func Apply(fs *flag.FlagSet, prefix string, getenv func(string) string) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		name := Name(prefix, f.Name)
		v := getenv(name)
		if given[f.Name] || v == "" || err != nil {
			return
		}
		values := []string{v}
		if IsRepeatable(f) {
			values = values[:0]
			for _, part := range strings.FieldsFunc(v, func(c rune) bool { return c == ';' || c == '\n' }) {
				if part = strings.TrimSpace(part); part != "" {
					values = append(values, part)
				}
			}
		}
		for _, part := range values {
			if setErr := f.Value.Set(part); setErr != nil {
				err = fmt.Errorf("%s=%q: %w", name, v, setErr)
				return
			}
		}
	})
	return err
}

// Strings is a repeatable flag value that collects every value given.
type Strings []string

func (s *Strings) String() string { return strings.Join(*s, ";") }

func (s *Strings) Set(v string) error {
	*s = append(*s, v)
	return nil
}

// IsRepeatable is true: a variable feeds several values.
func (*Strings) IsRepeatable() bool { return true }
