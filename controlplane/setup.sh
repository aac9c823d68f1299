#!/usr/bin/env bash
# Installs the system packages sipmesh needs on a fresh Debian machine, only when missing:
#   building: libclang-dev (bindgen) and librocksdb-dev (RocksDB, linked by the control
#   plane; `.cargo/config.toml` points the rocksdb crate at it)
#   --test:   also sip-tester (SIPp, the outside SIP client) and iproute2 (network
#             namespaces for the tests that cut links)
# Needs root, or sudo.
set -euo pipefail
need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
dpkg -s librocksdb-dev >/dev/null 2>&1 || need+=(librocksdb-dev)
if [ "${1:-}" = --test ]; then
    command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
    command -v ip >/dev/null 2>&1 || need+=(iproute2)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "setup.sh: installing ${need[*]}" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
