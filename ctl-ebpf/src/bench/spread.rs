//! Shared by the front-cache experiment's two programs (`bench_hash`, `bench_cache`): the key of
//! each run, from one heavy sender or from `SPREAD` senders in turn. Not embedded in portwatch.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use portwatch_common::{CounterKey, IPV4_MAPPED_WORD};

/// How many remote addresses the runs cycle through, a power of two (1: one heavy sender); set by
/// the benchmark.
#[map(name = "spread")]
static SPREAD: Array<u32> = Array::with_max_entries(1, 0);

/// This CPU's run number.
#[map(name = "run_seq")]
static RUN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The key of this run: 10.0.0.0 + (run number mod SPREAD), port 443/tcp ingress.
#[inline(always)]
pub fn next_key() -> CounterKey {
    let spread = SPREAD.get(0).copied().unwrap_or(1);
    let seq = match RUN_SEQ.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; programs do not nest on a CPU for one hook.
        Some(p) => unsafe {
            let s = *p;
            *p = s.wrapping_add(1);
            s
        },
        None => 0,
    };
    let host = seq & spread.wrapping_sub(1);
    CounterKey {
        remote_ip: [0, 0, IPV4_MAPPED_WORD, (0x0a00_0000u32 + host).to_be()],
        port: 443,
        proto: 6,
        direction: 0,
    }
}
