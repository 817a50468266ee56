package flagenv

import (
	"flag"
	"io"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestApply(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var list, given Strings
	fs.Var(&list, "list", "repeatable")
	fs.Var(&given, "given", "repeatable")
	single := fs.String("single-value", "", "")
	wait := fs.Duration("wait", time.Second, "")
	if err := fs.Parse([]string{"--given", "from-flag"}); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{
		"P_LIST":         " a ;b\n\nc;",
		"P_GIVEN":        "from-env",
		"P_SINGLE_VALUE": "x;y",
		"P_WAIT":         "",
	}
	if err := Apply(fs, "P_", func(k string) string { return env[k] }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(list, Strings{"a", "b", "c"}) {
		t.Errorf("repeatable flag from its variable = %q, want [a b c]", list)
	}
	if !slices.Equal(given, Strings{"from-flag"}) {
		t.Errorf("a flag on the command line must win over its variable: %q", given)
	}
	if *single != "x;y" {
		t.Errorf("a flag that is not repeatable takes its variable whole: %q", *single)
	}
	if *wait != time.Second {
		t.Errorf("an empty variable must leave the default: %s", *wait)
	}
}

func TestApplyNamesTheVariableOfABadValue(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.Duration("wait", time.Second, "")
	_ = fs.Parse(nil)
	err := Apply(fs, "P_", func(k string) string { return map[string]string{"P_WAIT": "soon"}[k] })
	if err == nil || !strings.HasPrefix(err.Error(), `P_WAIT="soon": `) {
		t.Fatalf("Apply = %v, want an error naming P_WAIT and its value", err)
	}
}
