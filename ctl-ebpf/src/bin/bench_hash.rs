//! The front-cache experiment's baseline: portwatch's map update as it is (per-CPU hash lookup of
//! the key, in-place add, insert when new), on the keys of `bench::spread`. Not embedded.
#![no_std]
#![no_main]

#[path = "../runtime.rs"]
mod runtime;
#[path = "../bench/spread.rs"]
mod spread;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::PerCpuHashMap,
    programs::TcContext,
};
use portwatch_common::{CounterKey, Counters};

#[map(name = "counters")]
static COUNTERS: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(65538, 0);

#[classifier]
pub fn bench_hash(ctx: TcContext) -> i32 {
    let key = spread::next_key();
    let bytes = ctx.len() as u64;
    match COUNTERS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of a live element.
        Some(v) => unsafe {
            (*v).bytes += bytes;
            (*v).packets += 1;
        },
        None => {
            let _ = COUNTERS.insert(&key, &Counters { bytes, packets: 1 }, BPF_NOEXIST as u64);
        }
    }
    TC_ACT_UNSPEC
}
