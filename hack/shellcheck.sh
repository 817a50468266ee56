#!/usr/bin/env bash
# Runs shellcheck on the project's shell scripts (hack/*.sh and .ci/run). When it is missing,
# Debian's package is installed first, as hack/install-deps.sh installs the test packages.
# Extra arguments go to shellcheck, e.g. `hack/shellcheck.sh --severity=style`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v shellcheck >/dev/null; then
	if [[ $(id -u) -ne 0 ]]; then
		echo "shellcheck: not installed and not root to install it (apt-get install shellcheck)" >&2
		exit 1
	fi
	echo "shellcheck: installing Debian's shellcheck package" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends shellcheck >&2
fi

shellcheck "$@" hack/*.sh .ci/run
