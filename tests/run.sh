#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what building and the tests need
# (controlplane/setup.sh --test: libclang-dev and librocksdb-dev; SIPp, the Debian
# package sip-tester, as the outside SIP client; iproute2 for the tests that cut links
# between network namespaces), then runs every test of the workspace. Extra arguments go
# to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash controlplane/setup.sh --test

cargo test --workspace --no-fail-fast "$@"
