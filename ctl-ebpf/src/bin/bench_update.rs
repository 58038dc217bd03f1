//! portwatch's map update alone, for `bench-prog` (issue 13's front-cache experiment), on the key
//! of each run: one heavy sender, or `spread` senders in turn. Two programs, each loaded in an
//! object of its own by the benchmark (so with maps of its own):
//! - `bench_hash`: the per-CPU hash update (lookup of the 20-byte key, in-place add, insert when
//!   new), as portwatch did before the front cache;
//! - `bench_cache`: the same behind portwatch's front cache (`FrontSlot`), as `main.rs`'s
//!   `count_in_slot` does it: a key that owns its slot on this CPU adds there (an inlined array
//!   lookup, no call); any other goes to the hash and claims the slot when it is free.
//!
//! And three for the flood's floor (issue 19): what a new source into a full per-IP map must do at
//! least, past what a known key does (its front slot), each step added to the one before, on one
//! heavy sender whose per-IP front slot another key owns (the benchmark claims it first):
//! - `bench_past_ip`: the per-IP front slot (a miss), then the /24's slot in a front cache of
//!   prefixes (a hit: the add);
//! - `bench_past_ip_hll`: the same and a distinct-source register (`source_hash_fast`,
//!   `hll_register`, the register's maximum) in a sketch at a fixed slot (no port-slot search);
//! - `bench_past_ip_filter`: the same and the per-IP membership check (the filter byte of the
//!   key, `ip_filter_index` of the register's hash, in a zeroed filter: "not in the map").
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
use portwatch_common::{
    front_index, hll_register, ip_filter_index, mask_remote, source_hash_fast, source_seed_v4, CounterKey, Counters,
    FrontSlot, PortSlot, Tier, FRONT_SLOTS, HLL_REGISTERS, IPV4_MAPPED_WORD,
};

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

/// The prefixes' front cache of the flood's floor programs.
#[map(name = "prefix_front")]
static PREFIX_FRONT: PerCpuArray<FrontSlot> = PerCpuArray::with_max_entries(FRONT_SLOTS, 0);

/// The sketch of the flood's floor programs (slot 0).
#[map(name = "sketch")]
static SKETCH: PerCpuArray<PortSlot> = PerCpuArray::with_max_entries(1, 0);

/// The filter of `bench_past_ip_filter`, zeroed: 64 KiB, as portwatch's at 4,096 keys.
#[map(name = "filter")]
static FILTER: Array<u64> = Array::with_max_entries(8192, 0);

const SEED: u32 = 0x5eed_1234;
const SEED_V4: u32 = source_seed_v4(SEED);

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

/// Which steps of the flood's floor a program takes (see the module's comment).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Past {
    Prefix,
    Register,
    Filter,
}

/// A new source into a full per-IP map, reduced to `steps`: its per-IP front slot (which the
/// benchmark gives another key), then, with `Past::Filter`, its filter byte, with
/// `Past::Register` and on, a register of the sketch, and its /24's front slot.
#[inline(always)]
fn past_ip(ctx: &TcContext, steps: Past) {
    let key = next_key();
    let bytes = ctx.len() as u64;
    if let Some(slot) = FRONT.get_ptr_mut(front_index(&key)) {
        // SAFETY: this CPU's slot; programs do not nest on a CPU for one hook.
        let slot = unsafe { &mut *slot };
        if slot.owned != 0 && slot.key.same(&key) {
            slot.bytes += bytes;
            slot.packets += 1;
            return;
        }
    }
    // One hash of the remote for the register and the filter byte, as `main.rs` does.
    let source_hash = source_hash_fast(&key.remote_ip, SEED, SEED_V4);
    if steps >= Past::Filter {
        let byte = ip_filter_index(&key, source_hash) & (8192 * 8 - 1);
        let set = match FILTER.get_ptr(byte >> 3) {
            // SAFETY: a byte of the 8-byte element `byte / 8`.
            Some(word) => unsafe { *word.cast::<u8>().add((byte & 7) as usize) != 0 },
            None => true,
        };
        if set {
            count_in_hash(&key, bytes);
            return;
        }
    }
    if steps >= Past::Register {
        if let Some(sketch) = SKETCH.get_ptr_mut(0) {
            let (index, rank) = hll_register(source_hash);
            // SAFETY: this CPU's slot, as above.
            let register = unsafe { &mut (*sketch).registers[index as usize % HLL_REGISTERS] };
            if *register < rank {
                *register = rank;
            }
        }
    }
    let prefix = CounterKey {
        remote_ip: mask_remote(key.remote_ip, Tier::Prefix),
        ..key
    };
    let Some(slot) = PREFIX_FRONT.get_ptr_mut(front_index(&prefix)) else {
        return;
    };
    // SAFETY: this CPU's slot, as above.
    let slot = unsafe { &mut *slot };
    if slot.owned == 0 {
        // SAFETY: plain stores into this CPU's slot, the key before `owned`.
        unsafe {
            core::ptr::write_volatile(&mut slot.key, prefix);
            core::ptr::write_volatile(&mut slot.owned, 1);
        }
    }
    if slot.key.same(&prefix) {
        slot.bytes += bytes;
        slot.packets += 1;
    }
}

#[classifier]
pub fn bench_past_ip(ctx: TcContext) -> i32 {
    past_ip(&ctx, Past::Prefix);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn bench_past_ip_hll(ctx: TcContext) -> i32 {
    past_ip(&ctx, Past::Register);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn bench_past_ip_filter(ctx: TcContext) -> i32 {
    past_ip(&ctx, Past::Filter);
    TC_ACT_UNSPEC
}
