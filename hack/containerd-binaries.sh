#!/usr/bin/env bash
# Builds the container runtime of the local cluster from source through the Go module proxy and
# caches it by version: containerd, containerd-shim-runc-v2 and ctr from
# github.com/containerd/containerd/v2, and runc from github.com/opencontainers/runc (with
# seccomp, against Debian's libseccomp-dev, which hack/install-deps.sh installs).
#
# Why not Debian's packages: bookworm ships containerd 1.6 and runc 1.1, too old for
# Kubernetes 1.35+ image volumes (containerd 2.2+ honours their subPath) and for containerd 2.x
# (which needs runc 1.2+).
#
# Usage: hack/containerd-binaries.sh     prints the directory holding containerd,
#                                         containerd-shim-runc-v2, ctr and runc
# Env:   CONTAINERD_VERSION (default 2.4.2), RUNC_VERSION (default 1.5.3),
#        APM_CSI_CACHE (default ~/.cache/apm-csi)
set -euo pipefail

version="${CONTAINERD_VERSION:-2.4.2}"
runc_version="${RUNC_VERSION:-1.5.3}"
cache="${APM_CSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apm-csi}"
out="$cache/containerd/v$version/bin"
runc_out="$cache/runc/v$runc_version/bin"
mkdir -p "$out" "$runc_out"

pkg=github.com/containerd/containerd/v2
if [[ ! -x "$out/containerd" || ! -x "$out/containerd-shim-runc-v2" || ! -x "$out/ctr" ]]; then
	exec 8>"$cache/containerd/v$version.lock"
	flock 8
	if [[ ! -x "$out/containerd" || ! -x "$out/containerd-shim-runc-v2" || ! -x "$out/ctr" ]]; then
		echo "building containerd v$version through the Go module proxy (once; cached in $out)" >&2
		start=$SECONDS
		ldflags="-s -w -X $pkg/version.Version=v$version -X $pkg/version.Package=$pkg"
		# Only the overlayfs snapshotter is used: no btrfs/devmapper/zfs, no cgo. The shim is
		# built as containerd's own Makefile builds it (static, without gRPC).
		GOBIN="$out" CGO_ENABLED=0 go install -trimpath -tags "urfave_cli_no_docs no_btrfs no_devmapper no_zfs" \
			-ldflags "$ldflags" "$pkg/cmd/containerd@v$version" "$pkg/cmd/ctr@v$version" >&2
		GOBIN="$out" CGO_ENABLED=0 go install -trimpath -tags "urfave_cli_no_docs no_grpc" \
			-ldflags "$ldflags" "$pkg/cmd/containerd-shim-runc-v2@v$version" >&2
		echo "built containerd v$version in $((SECONDS - start)) s" >&2
	fi
	flock -u 8
fi

if [[ ! -x "$runc_out/runc" ]]; then
	exec 7>"$cache/runc/v$runc_version.lock"
	flock 7
	if [[ ! -x "$runc_out/runc" ]]; then
		if ! pkg-config --exists libseccomp; then
			echo "containerd-binaries: runc needs libseccomp-dev and pkg-config (hack/install-deps.sh installs them)" >&2
			exit 1
		fi
		echo "building runc v$runc_version through the Go module proxy (once; cached in $runc_out)" >&2
		start=$SECONDS
		# runc's own default tags less libpathrs (a Rust library Debian does not ship; runc
		# then uses its Go implementation of the same safe path resolution).
		GOBIN="$runc_out" CGO_ENABLED=1 go install -trimpath -buildmode=pie -tags "seccomp urfave_cli_no_docs" \
			-ldflags "-X main.gitCommit=v$runc_version" "github.com/opencontainers/runc@v$runc_version" >&2
		echo "built runc v$runc_version in $((SECONDS - start)) s" >&2
	fi
	flock -u 7
fi

# One directory with all four programs: containerd finds the shim on its PATH, the cluster
# points the shim at this runc.
ln -sfn "$runc_out/runc" "$out/runc.tmp" && mv -Tf "$out/runc.tmp" "$out/runc"
echo "$out"
