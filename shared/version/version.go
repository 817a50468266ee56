// Package version carries the build version, set at link time by the Makefile.
package version

// Version is overridden with -ldflags "-X github.com/apm-csi/apm-csi/shared/version.Version=...".
var Version = "dev"
