package mutation

import (
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// envOp is how one variable is changed. No op ever replaces a value the user wrote.
type envOp int

const (
	// opSetIfAbsent adds the variable only when the container does not define it.
	opSetIfAbsent envOp = iota
	// opRequire adds the variable, and refuses the container when it is already set to a
	// different value (a tracer cannot work with another profiler configured).
	opRequire
	// opAppend adds value to the end of a list variable (separator sep).
	opAppend
	// opPrepend adds value to the front of a list variable (separator sep).
	opPrepend
)

// envEdit is one variable the tracer wiring needs.
type envEdit struct {
	name  string
	op    envOp
	sep   string
	value string
}

// lastEnv returns the index of the definition of name that wins (Kubernetes applies the last
// one), or -1.
func lastEnv(c *corev1.Container, name string) int {
	for i := len(c.Env) - 1; i >= 0; i-- {
		if c.Env[i].Name == name {
			return i
		}
	}
	return -1
}

// envBlocker returns why the edits cannot be applied to c, or "". A variable set through
// valueFrom cannot be extended without resolving it, which the webhook cannot do, so such a
// container is left alone rather than having its value replaced.
func envBlocker(c *corev1.Container, edits []envEdit) string {
	for _, e := range edits {
		i := lastEnv(c, e.name)
		if i < 0 {
			continue
		}
		if c.Env[i].ValueFrom != nil {
			return fmt.Sprintf("%s is set with valueFrom", e.name)
		}
		if e.op == opRequire && c.Env[i].Value != e.value {
			return fmt.Sprintf("%s is already set to %q", e.name, c.Env[i].Value)
		}
	}
	return envFromBlocker(c, edits)
}

// envFromBlocker returns why envFrom stops the edits, or "". A variable a container takes
// from a ConfigMap or Secret through envFrom has a value the webhook cannot read, and an env
// entry (which is what the webhook writes) wins over envFrom: writing it would silently
// replace the user's value (LD_PRELOAD, JAVA_TOOL_OPTIONS, ...) instead of extending it. So a
// container is left alone when any variable the webhook writes may come from envFrom and is
// not also defined in env (an env entry already wins, and is extended as usual). A source
// with a prefix can only define names that start with it.
func envFromBlocker(c *corev1.Container, edits []envEdit) string {
	var names []string
	var sources []string
	for _, e := range edits {
		if lastEnv(c, e.name) >= 0 {
			continue
		}
		for _, src := range c.EnvFrom {
			if !strings.HasPrefix(e.name, src.Prefix) {
				continue
			}
			if !slices.Contains(names, e.name) {
				names = append(names, e.name)
			}
			if d := describeEnvFrom(src); !slices.Contains(sources, d) {
				sources = append(sources, d)
			}
		}
	}
	if len(names) == 0 {
		return ""
	}
	return fmt.Sprintf("%s may be set by envFrom (%s), whose value the webhook cannot read and would override; define %[3]s in env to have %[3]s extended",
		strings.Join(names, ", "), strings.Join(sources, ", "), pronoun(len(names)))
}

func pronoun(n int) string {
	if n == 1 {
		return "it"
	}
	return "them"
}

func describeEnvFrom(src corev1.EnvFromSource) string {
	var d string
	switch {
	case src.ConfigMapRef != nil:
		d = "configMapRef " + src.ConfigMapRef.Name
	case src.SecretRef != nil:
		d = "secretRef " + src.SecretRef.Name
	default:
		d = "a source"
	}
	if src.Prefix != "" {
		d += fmt.Sprintf(" with prefix %q", src.Prefix)
	}
	return d
}

// applyEnv applies edits that envBlocker accepted. A value already present in a list is not
// added twice, so wiring that another injector already did stays as it is.
func applyEnv(c *corev1.Container, edits []envEdit) {
	for _, e := range edits {
		i := lastEnv(c, e.name)
		if i < 0 {
			c.Env = append(c.Env, corev1.EnvVar{Name: e.name, Value: e.value})
			continue
		}
		old := c.Env[i].Value
		switch e.op {
		case opAppend, opPrepend:
			if old == "" {
				c.Env[i].Value = e.value
				continue
			}
			if listContains(old, e.sep, e.value) {
				continue
			}
			if e.op == opAppend {
				c.Env[i].Value = old + e.sep + e.value
			} else {
				c.Env[i].Value = e.value + e.sep + old
			}
		}
	}
}

func listContains(list, sep, item string) bool {
	var parts []string
	if strings.TrimSpace(sep) == "" {
		parts = strings.Fields(list)
	} else {
		parts = strings.Split(list, sep)
	}
	return slices.ContainsFunc(parts, func(p string) bool {
		return strings.TrimSpace(p) == item || strings.TrimSuffix(strings.TrimSpace(p), "/") == strings.TrimSuffix(item, "/")
	})
}
