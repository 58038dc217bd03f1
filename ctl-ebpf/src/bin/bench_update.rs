//! portwatch's map update alone, for `bench-prog` (issue 13's front-cache experiment), on the key
//! of each run: one heavy sender, or `spread` senders in turn. Two programs, each loaded in an
//! object of its own by the benchmark (so with maps of its own):
//! - `bench_hash`: the per-CPU hash update (lookup of the 20-byte key, in-place add, insert when
//!   new), as portwatch did before the front cache;
//! - `bench_cache`: the same behind portwatch's front cache (`FrontSlot`), as `main.rs`'s
//!   `count_in_slot` does it: a key that owns its slot on this CPU adds there (an inlined array
//!   lookup, no call); any other goes to the hash and claims the slot when it is free.
//!
//! Not embedded in portwatch.
#![no_std]
#![no_main]

#[path = "../runtime.rs"]
mod runtime;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{Array, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use portwatch_common::{front_index, CounterKey, Counters, FrontSlot, FRONT_SLOTS, IPV4_MAPPED_WORD};

/// How many remote addresses the runs cycle through, a power of two (1: one heavy sender); set by
/// the benchmark.
#[map(name = "spread")]
static SPREAD: Array<u32> = Array::with_max_entries(1, 0);

/// This CPU's run number.
#[map(name = "run_seq")]
static RUN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "counters")]
static COUNTERS: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(65538, 0);

#[map(name = "front")]
static FRONT: PerCpuArray<FrontSlot> = PerCpuArray::with_max_entries(FRONT_SLOTS, 0);

/// The key of this run: 10.0.0.0 + (run number mod spread), port 443/tcp ingress.
#[inline(always)]
fn next_key() -> CounterKey {
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

/// Counts `bytes` and a packet under `key` in the hash, inserting the key when new (`main.rs`'s
/// `count_in_hash` without the map-full hint); false when the map has no room.
#[inline(always)]
fn count_in_hash(key: &CounterKey, bytes: u64) -> bool {
    match COUNTERS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a live element.
        Some(v) => unsafe {
            (*v).bytes += bytes;
            (*v).packets += 1;
            true
        },
        None => COUNTERS
            .insert(key, &Counters { bytes, packets: 1 }, BPF_NOEXIST as u64)
            .is_ok(),
    }
}

#[classifier]
pub fn bench_hash(ctx: TcContext) -> i32 {
    count_in_hash(&next_key(), ctx.len() as u64);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn bench_cache(ctx: TcContext) -> i32 {
    let key = next_key();
    let bytes = ctx.len() as u64;
    let Some(slot) = FRONT.get_ptr_mut(front_index(&key)) else {
        count_in_hash(&key, bytes);
        return TC_ACT_UNSPEC;
    };
    // SAFETY: this CPU's slot; programs do not nest on a CPU for one hook.
    let slot = unsafe { &mut *slot };
    if slot.owned != 0 {
        if slot.key.same(&key) {
            slot.bytes += bytes;
            slot.packets += 1;
        } else {
            count_in_hash(&key, bytes);
        }
    } else if count_in_hash(&key, bytes) {
        // SAFETY: plain stores into this CPU's slot, the key before `owned`.
        unsafe {
            core::ptr::write_volatile(&mut slot.key, key);
            core::ptr::write_volatile(&mut slot.owned, 1);
        }
    }
    TC_ACT_UNSPEC
}
