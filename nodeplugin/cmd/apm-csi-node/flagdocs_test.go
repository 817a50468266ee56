package main

import (
	"testing"

	"github.com/apm-csi/apm-csi/hack/flagdocs"
)

// TestFlagTablesMatchFlags: the flag tables of README.md and docs/node-plugin.md are the
// flags' usage strings and defaults; `make docs` regenerates them.
func TestFlagTablesMatchFlags(t *testing.T) {
	flagdocs.Check(t, newFlagSet(&options{}), "node", "README.md", "docs/node-plugin.md")
}
