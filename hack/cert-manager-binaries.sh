#!/usr/bin/env bash
# Builds cert-manager's controller, webhook and cainjector through the Go module proxy from the
# github.com/cert-manager/cert-manager module, caches them by version, and keeps that release's
# Helm chart (with its CRDs) next to them, so the local cluster installs the real cert-manager.
#
# cert-manager's own main packages live in nested modules (cmd/controller, ...) that the module
# proxy does not serve, so the programs are the small launchers in hack/cert-manager/, which
# parse the flags cert-manager's chart passes and run the module's own controllers, webhook
# server and CA injector. Their module path lies under github.com/cert-manager/cert-manager, as
# cert-manager's own binary modules do, which lets the webhook launcher call the module's
# webhook constructor (an internal package). The build uses the go directive and the dependency
# versions that the cert-manager release declares.
#
# Usage: hack/cert-manager-binaries.sh   prints the directory (~/.cache/apm-csi/cert-manager/
#                                         v<version>-<hash of the launchers>) holding
#                                         bin/{controller,webhook,cainjector} and chart/
#                                         (cert-manager's Helm chart of that release; its
#                                         templates include the CRDs)
# Env:   CERT_MANAGER_VERSION (default 1.21.2), APM_CSI_CACHE (default ~/.cache/apm-csi)
set -euo pipefail

version="${CERT_MANAGER_VERSION:-1.21.2}"
cache="${APM_CSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apm-csi}"
bins=(controller webhook cainjector)
src="$(cd "$(dirname "$0")/cert-manager" && pwd)"
# The cache is keyed by the release and by the launchers' source, so a change to them rebuilds.
srchash="$(cat "$src/go.mod" "$src"/*/main.go | sha256sum | cut -c1-12)"
dir="$cache/cert-manager/v$version-$srchash"
mod=github.com/cert-manager/cert-manager

complete() {
	local b
	for b in "${bins[@]}"; do [[ -x "$dir/bin/$b" ]] || return 1; done
	[[ -s "$dir/chart/Chart.yaml" ]]
}
if complete; then
	echo "$dir"
	exit 0
fi

mkdir -p "$dir"
exec 9>"$dir.lock"
flock 9
if complete; then
	echo "$dir"
	exit 0
fi

echo "building cert-manager v$version through the Go module proxy (once; cached in $dir)" >&2
start=$SECONDS
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$src/controller" "$src/webhook" "$src/cainjector" "$work/"
(
	cd "$work"
	# The release's module source: its go directive, its chart and its CRDs.
	go mod init "$mod/apm-csi-launchers" >/dev/null 2>&1
	srcdir="$(go mod download -json "$mod@v$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
	if [[ -z "$srcdir" ]]; then
		echo "cert-manager-binaries: the module proxy did not serve $mod@v$version" >&2
		exit 1
	fi
	godirective="$(awk '$1 == "go" {print $2; exit}' "$srcdir/go.mod")"
	go mod edit -go="$godirective" -require="$mod@v$version"
	go mod tidy >&2
	mkdir -p "$dir/bin.tmp"
	ldflags="-s -w -X $mod/pkg/util.AppVersion=v$version -X $mod/pkg/util.AppGitState=clean"
	CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$dir/bin.tmp/" ./controller ./webhook ./cainjector >&2
	rm -rf "$dir/chart.tmp" && cp -r "$srcdir/deploy/charts/cert-manager" "$dir/chart.tmp" && chmod -R u+w "$dir/chart.tmp"
	# The chart's version fields are placeholders that cert-manager's release tooling fills in.
	sed -i "s/^version: .*/version: v$version/; s/^appVersion: .*/appVersion: v$version/" "$dir/chart.tmp/Chart.yaml"
)
rm -rf "${dir:?}/bin" "${dir:?}/chart"
mv "$dir/bin.tmp" "$dir/bin"
mv "$dir/chart.tmp" "$dir/chart"
echo "built cert-manager v$version in $((SECONDS - start)) s" >&2
echo "$dir"
