#!/usr/bin/env bash
# Installs what the test suites and the local cluster need on a Debian machine, idempotently:
# Debian packages (only when one is missing, so repeated runs stay fast), the Kubernetes
# binaries built through the Go module proxy (cached by version), and etcd next to them so
# that controller-runtime's envtest finds everything in one directory.
#
# Prints the directory to use as KUBEBUILDER_ASSETS. With --packages-only, installs the Debian
# packages and Node.js only (what `make images` needs) and prints nothing.
set -euo pipefail
packages_only=false
[[ "${1:-}" == "--packages-only" ]] && packages_only=true

packages=(etcd-server containerd runc containernetworking-plugins busybox-static iproute2 util-linux e2fsprogs curl ca-certificates)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		echo "install-deps: missing Debian packages ${missing[*]} and not root to install them" >&2
		exit 1
	fi
	echo "install-deps: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
	# Debian starts containerd and etcd as services on install; the tests start their own.
	systemctl disable --now containerd etcd >/dev/null 2>&1 || true
fi

# Node.js and npm: the end-to-end tests and the demo build their application image from the
# machine's node binary and install the real dd-trace with npm. Checked by command, not by
# package: some machines ship npm inside a vendor's nodejs package.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
	if [[ $(id -u) -ne 0 ]]; then
		echo "install-deps: node and npm are missing and not root to install them" >&2
		exit 1
	fi
	echo "install-deps: installing nodejs npm" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends nodejs npm >&2
fi

$packages_only && exit 0

bin="$("$(dirname "$0")/k8s-binaries.sh")"
etcd="$(command -v etcd || true)"
if [[ -z "$etcd" ]]; then
	echo "install-deps: etcd not found after installing etcd-server" >&2
	exit 1
fi
ln -sf "$etcd" "$bin/etcd"
echo "$bin"
