#!/usr/bin/env bash
# Builds golangci-lint through the Go module proxy, caches it by version, and prints the
# binary's path. golangci-lint must be built with a Go at least as new as the module it lints,
# so it is built with the project's Go rather than downloaded.
#
# Usage: hack/golangci-lint.sh        prints the path of the golangci-lint binary
# Env:   GOLANGCI_LINT_VERSION (default v2.15.0), APM_CSI_CACHE (default ~/.cache/apm-csi)
set -euo pipefail

version="${GOLANGCI_LINT_VERSION:-v2.15.0}"
cache="${APM_CSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apm-csi}"
goversion="$(go env GOVERSION)"
dir="$cache/golangci-lint/$version-$goversion"
bin="$dir/golangci-lint"

if [[ -x "$bin" ]]; then
	echo "$bin"
	exit 0
fi

mkdir -p "$dir"
exec 9>"$dir.lock"
flock 9
if [[ -x "$bin" ]]; then
	echo "$bin"
	exit 0
fi

echo "building golangci-lint $version with $goversion through the Go module proxy (a few minutes cold)" >&2
# GOBIN must be absolute; GOFLAGS=-mod=mod keeps a caller's -mod=vendor from leaking in, and
# building outside any module (cd to the cache dir) makes `go install pkg@version` ignore the
# project's go.mod.
tmp="$dir/.gobin"
rm -rf "$tmp"
mkdir -p "$tmp"
(
	cd "$dir"
	CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-mod=mod go install -trimpath \
		"github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$version" >&2
)
mv "$tmp/golangci-lint" "$bin"
rm -rf "$tmp"
"$bin" version >&2
echo "$bin"
