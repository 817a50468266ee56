#!/usr/bin/env bash
# Builds helm through the Go module proxy (no download from get.helm.sh or GitHub, which this
# project's machines cannot reach), caches it by version, and prints the binary's path.
#
# Usage: hack/helm.sh                 prints the path of the helm binary
# Env:   HELM_VERSION (default v3.22.0), APM_CSI_CACHE (default ~/.cache/apm-csi)
set -euo pipefail

version="${HELM_VERSION:-v3.22.0}"
cache="${APM_CSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apm-csi}"
dir="$cache/helm/$version"
bin="$dir/helm"

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

echo "building helm $version through the Go module proxy (a few minutes cold)" >&2
# Build flags of helm's own release Makefile: the version stamp (`helm version`) and the
# default Kubernetes version of `helm template`/`helm lint` without a cluster, which helm
# derives from the k8s.io/client-go it is built with (v0.X.Y means Kubernetes 1.X). Without
# them helm assumes Kubernetes 1.20, and charts with a kubeVersion constraint fail to render.
gomod="$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "helm.sh/helm/v3@$version" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')"
clientgo="$(awk '$1 == "k8s.io/client-go" {print $2}' "$gomod")"
if [[ ! "$clientgo" =~ ^v0\.([0-9]+)\. ]]; then
	echo "hack/helm.sh: cannot read the k8s.io/client-go version from $gomod" >&2
	exit 1
fi
k8s_minor="${BASH_REMATCH[1]}"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$version"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
	ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done
# GOBIN must be absolute; GOFLAGS=-mod=mod keeps a caller's -mod=vendor from leaking in, and
# building outside any module (cd to the cache dir) makes `go install pkg@version` ignore the
# project's go.mod.
tmp="$dir/.gobin"
rm -rf "$tmp"
mkdir -p "$tmp"
(
	cd "$dir"
	CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-mod=mod go install -trimpath -ldflags "$ldflags" \
		"helm.sh/helm/v3/cmd/helm@$version" >&2
)
mv "$tmp/helm" "$bin"
rm -rf "$tmp"
"$bin" version --short >&2
echo "$bin"
