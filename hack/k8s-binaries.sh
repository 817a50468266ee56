#!/usr/bin/env bash
# Builds the Kubernetes server binaries that the integration and end-to-end tests run
# (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl) from source
# through the Go module proxy, and caches them by version.
#
# Why a generated module: `go install k8s.io/kubernetes/cmd/...@vX` refuses because
# k8s.io/kubernetes replaces its staging modules with local paths. A throwaway module that
# requires k8s.io/kubernetes and re-points each staging module at its published v0.Y.Z builds.
# Its go directive is the one k8s.io/kubernetes itself declares.
#
# Usage: hack/k8s-binaries.sh            prints the directory holding the binaries
# Env:   K8S_VERSION   Kubernetes version (default 1.37.2, the newest supported minor)
#        K8S_BINARIES  space-separated subset to build (default: all five); the deploy
#                      validation on an older minor only needs "kube-apiserver"
#        APM_CSI_CACHE cache directory (default ~/.cache/apm-csi)
set -euo pipefail

version="${K8S_VERSION:-1.37.2}"
cache="${APM_CSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apm-csi}"
out="$cache/k8s/v$version/bin"
read -r -a bins <<<"${K8S_BINARIES:-kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl}"

missing_bins() {
	local b
	for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || echo "$b"; done
}

if [[ -z "$(missing_bins)" ]]; then
	echo "$out"
	exit 0
fi

minor="${version#*.}"
minor="${minor%%.*}"
patch="${version##*.}"
staging_version="v0.${minor}.${patch}"
work="$cache/k8s/v$version/module"
mkdir -p "$work" "$out"
exec 9>"$cache/k8s/v$version.lock"
flock 9
mapfile -t todo < <(missing_bins)
if ((${#todo[@]} == 0)); then
	echo "$out"
	exit 0
fi

# The first http(s) entry of GOPROXY (entries are separated by "," or "|"; "direct" and "off"
# are not URLs).
proxy_url() {
	local entry
	IFS=',|' read -r -a entries <<<"$(go env GOPROXY)"
	for entry in "${entries[@]}"; do
		case "$entry" in http://* | https://*) echo "${entry%/}"; return 0 ;; esac
	done
	return 1
}

echo "building Kubernetes v$version: ${todo[*]} (a cold build of all five takes ~10-15 min on 2 cores)" >&2
if [[ ! -s "$work/go.mod" ]]; then
	modfile=""
	if proxy="$(proxy_url)"; then
		modfile="$(curl -fsSL "$proxy/k8s.io/kubernetes/@v/v$version.mod" 2>/dev/null || true)"
	fi
	if [[ -z "$modfile" ]]; then
		# Fall back to the go command, which honours GOPROXY/GONOSUMDB settings itself.
		tmp="$(mktemp -d)"
		(cd "$tmp" && go mod init probe >/dev/null 2>&1 && go mod download -json "k8s.io/kubernetes@v$version" >/dev/null)
		modfile="$(cat "$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/v$version.mod")"
		rm -rf "$tmp"
	fi
	godirective="$(awk '$1 == "go" {print $2; exit}' <<<"$modfile")"
	{
		echo "module apm-csi.local/k8s-binaries"
		echo
		echo "go ${godirective:-1.24.0}"
		echo
		echo "require k8s.io/kubernetes v$version"
		echo
		echo "replace ("
		grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' <<<"$modfile" |
			awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
		echo ")"
	} >"$work/go.mod.tmp"
	mv "$work/go.mod.tmp" "$work/go.mod"
	rm -f "$work/go.sum"
fi

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
[[ -s go.sum ]] || GOFLAGS=-mod=mod go mod tidy -e >&2
pkgs=()
for b in "${todo[@]}"; do
	pkgs+=("k8s.io/kubernetes/cmd/$b")
done
start=$SECONDS
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$version -X k8s.io/client-go/pkg/version.gitVersion=v$version" -o "$out/" "${pkgs[@]}" >&2
echo "built Kubernetes v$version ${todo[*]} in $((SECONDS - start)) s" >&2
if [[ -n "$(missing_bins)" ]]; then
	echo "k8s-binaries: $(missing_bins | tr '\n' ' ')missing in $out after the build" >&2
	exit 1
fi
echo "$out"
