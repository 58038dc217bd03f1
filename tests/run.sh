#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, builds the kernel program and
# the CLI, and runs every test (kernel tests included: they need root). Under CI=true a kernel test
# that cannot run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/bootstrap
export PATH="${HOME:-/root}/.cargo/bin:$PATH"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
# A skip (a kernel feature missing, or no root outside CI) prints a SKIPPED line: they are counted.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^SKIPPED / { s++ }
     END { printf "tests: %d passed, %d failed", p, f; if (s) printf ", %d of them skipped (SKIPPED lines above)", s; print "" }' "$log"
exit "$status"
