#!/usr/bin/env bash
# Installs what the test suites and the local cluster need on a Debian machine, idempotently:
# Debian packages (only when one is missing, so repeated runs stay fast), the Kubernetes
# binaries, the container runtime (containerd, its runc shim, ctr, runc) and cert-manager
# (hack/cert-manager-binaries.sh) built through the Go module proxy (cached by version), and
# links to etcd and the runtime next to the Kubernetes binaries so that controller-runtime's
# envtest and the local cluster find everything in one directory.
#
# Prints the directory to use as KUBEBUILDER_ASSETS. With --packages-only, installs the Debian
# packages and Node.js only (what `make images` needs) and prints nothing. With
# --apiserver-only VERSION, builds only kube-apiserver of that Kubernetes version
# (the deploy validation on the oldest supported version) and prints their directory, etcd
# linked next to them.
set -euo pipefail
packages_only=false
apiserver_version=""
case "${1:-}" in
--packages-only) packages_only=true ;;
--apiserver-only)
	apiserver_version="${2:?--apiserver-only needs a Kubernetes version, e.g. 1.35.4}"
	;;
esac

# gcc, libc6-dev, pkg-config and libseccomp-dev build runc (hack/containerd-binaries.sh);
# Debian's containerd and runc are too old for the supported Kubernetes versions.
packages=(etcd-server containernetworking-plugins busybox-static iproute2 iptables util-linux e2fsprogs curl ca-certificates gcc libc6-dev pkg-config libseccomp-dev)
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
	# Debian starts etcd as a service on install; the tests start their own.
	systemctl disable --now etcd >/dev/null 2>&1 || true
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

etcd="$(command -v etcd || true)"
if [[ -z "$etcd" ]]; then
	echo "install-deps: etcd not found after installing etcd-server" >&2
	exit 1
fi
link() { # link TARGET NAME: replaces $bin/NAME atomically (concurrent runs read it)
	ln -sfn "$1" "$bin/.$2.tmp" && mv -Tf "$bin/.$2.tmp" "$bin/$2"
}

if [[ -n "$apiserver_version" ]]; then
	bin="$(K8S_VERSION="$apiserver_version" K8S_BINARIES="kube-apiserver" "$(dirname "$0")/k8s-binaries.sh")"
	link "$etcd" etcd
	echo "$bin"
	exit 0
fi

bin="$("$(dirname "$0")/k8s-binaries.sh")"
runtime="$("$(dirname "$0")/containerd-binaries.sh")"
# cert-manager's controller, webhook and cainjector and its chart, which the local cluster
# installs for the cert-manager end-to-end scenario (cached by version; the cluster asks the
# script for the directory itself).
"$(dirname "$0")/cert-manager-binaries.sh" >/dev/null
link "$etcd" etcd
for p in containerd containerd-shim-runc-v2 ctr runc; do
	link "$(readlink -f "$runtime/$p")" "$p"
done
echo "$bin"
