#!/usr/bin/env bash
# portwatch's demo on a safe default: two throwaway network namespaces joined by a veth pair, the
# kernel program on the server's end, real TCP and UDP traffic (IPv4 and IPv6, 198.18.0.0/15 and
# 2001:db8::/32, inside the namespaces only), then the counters per remote IP. Leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/bootstrap
export PATH="${HOME:-/root}/.cargo/bin:$PATH"
cargo build --quiet --release --locked -p portwatch -p portwatch-tests
exec target/release/demo
