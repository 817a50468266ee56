#!/usr/bin/env bash
# Builds the Kubernetes server binaries that the integration and end-to-end tests run
# (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl) from source
# through the Go module proxy, and caches them by version.
#
# Why a generated module: `go install k8s.io/kubernetes/cmd/...@vX` refuses because
# k8s.io/kubernetes replaces its staging modules with local paths. A throwaway module that
# requires k8s.io/kubernetes and re-points each staging module at its published v0.Y.Z builds.
#
# Usage: hack/k8s-binaries.sh            prints the directory holding the binaries
# Env:   K8S_VERSION (default 1.34.2), APM_CSI_CACHE (default ~/.cache/apm-csi)
set -euo pipefail

version="${K8S_VERSION:-1.34.2}"
cache="${APM_CSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apm-csi}"
out="$cache/k8s/v$version/bin"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)

complete() {
	for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || return 1; done
}

if complete; then
	echo "$out"
	exit 0
fi

minor="${version#*.}"
staging_version="v0.${minor}"
work="$cache/k8s/v$version/module"
mkdir -p "$work" "$out"
exec 9>"$cache/k8s/v$version.lock"
flock 9
if complete; then
	echo "$out"
	exit 0
fi

echo "building Kubernetes v$version binaries (cold build takes ~10 min on 2 cores)" >&2
modfile="$(curl -fsSL "${GOPROXY_BASE:-https://proxy.golang.org}/k8s.io/kubernetes/@v/v$version.mod" 2>/dev/null || true)"
if [[ -z "$modfile" ]]; then
	# Fall back to the go command, which honours GOPROXY/GONOSUMDB settings itself.
	tmp="$(mktemp -d)"
	(cd "$tmp" && go mod init probe >/dev/null 2>&1 && go mod download -json "k8s.io/kubernetes@v$version" >/dev/null)
	modfile="$(cat "$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/v$version.mod")"
	rm -rf "$tmp"
fi

{
	echo "module apm-csi.local/k8s-binaries"
	echo
	echo "go 1.24.0"
	echo
	echo "require k8s.io/kubernetes v$version"
	echo
	echo "replace ("
	grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' <<<"$modfile" |
		awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
	echo ")"
} >"$work/go.mod"

cat >"$work/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO

cd "$work"
GOFLAGS=-mod=mod go mod tidy -e >&2
for b in "${bins[@]}"; do
	pkgs+=("k8s.io/kubernetes/cmd/$b")
done
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$version -X k8s.io/client-go/pkg/version.gitVersion=v$version" -o "$out/" "${pkgs[@]}" >&2
complete
echo "$out"
