#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, builds the kernel program and
# the CLI, and runs every test (kernel tests included: they need root). Under CI=true a kernel test
# that cannot run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/bootstrap
export PATH="${HOME:-/root}/.cargo/bin:$PATH"
cargo test --workspace --locked "$@"
