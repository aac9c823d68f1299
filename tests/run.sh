#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (SIPp, the
# Debian package sip-tester, as the outside SIP client; iproute2 for the tests that cut
# links between network namespaces), then runs every test of the workspace. Extra
# arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${need[*]}" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo test --workspace --no-fail-fast "$@"
