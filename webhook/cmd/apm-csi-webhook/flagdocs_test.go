package main

import (
	"testing"

	"github.com/apm-csi/apm-csi/hack/flagdocs"
)

// TestFlagTablesMatchFlags: the flag tables of README.md and docs/webhook.md are the flags'
// usage strings and defaults; `make docs` regenerates them. The defaults that come from the
// pod's environment are shown as that environment's names.
func TestFlagTablesMatchFlags(t *testing.T) {
	docEnv := map[string]string{"TMPDIR": "$TMPDIR"}
	fs := newFlagSet(&options{}, func(k string) string { return docEnv[k] })
	flagdocs.Check(t, fs, "webhook", "README.md", "docs/webhook.md")
}
