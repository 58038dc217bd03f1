#!/usr/bin/env bash
# The benchmarks, from a fresh clone: installs what is missing (iperf3, tcpdump, nftables: the
# bootstrap), builds in release mode and runs the network harness (bench-net: every traffic kind
# under every scenario, alternating, 5 rounds of 3 s; about 11 minutes on 2 cores), then the
# per-packet cost of the kernel program (bench-prog). Arguments go to bench-net (--rounds N,
# --secs S, --scenario NAME, --traffic NAME, --smoke). Tables on stdout (Markdown), progress on
# stderr. Traffic stays inside two throwaway namespaces; Ctrl-C stops it and removes them.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/bootstrap
export PATH="${HOME:-/root}/.cargo/bin:$PATH"
cargo build --release --locked -p portwatch -p portwatch-tests >&2
echo "# $(date -u +%Y-%m-%d) $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
target/release/bench-net "$@"
if [[ " $* " != *" --smoke "* ]]; then
  echo
  echo "BPF_PROG_TEST_RUN, ns per packet (median of 15 interleaved rounds):"
  echo
  target/release/bench-prog 15 1000000
fi
