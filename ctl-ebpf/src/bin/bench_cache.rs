//! The front-cache experiment (issue 13): a direct-mapped per-CPU array of (key, bytes, packets)
//! slots in front of the per-CPU hash. A packet whose key sits in its slot adds there (an inlined
//! array lookup, no call); otherwise the slot's previous key is flushed into the hash (lookup and
//! add, or insert) and the slot takes the new key. Same keys as `bench_hash`. Not embedded.
#![no_std]
#![no_main]

#[path = "../bench/spread.rs"]
mod spread;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use portwatch_common::{CounterKey, Counters};

const SLOTS: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Slot {
    key: CounterKey,
    _pad: u32,
    bytes: u64,
    packets: u64,
}

#[map(name = "counters")]
static COUNTERS: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(65538, 0);

#[map(name = "front")]
static FRONT: PerCpuArray<Slot> = PerCpuArray::with_max_entries(SLOTS, 0);

#[inline(always)]
fn slot_of(k: &CounterKey) -> u32 {
    let x = k.remote_ip[0]
        ^ k.remote_ip[1]
        ^ k.remote_ip[2]
        ^ k.remote_ip[3]
        ^ ((k.port as u32) << 16)
        ^ ((k.direction as u32) << 8)
        ^ k.proto as u32;
    x.wrapping_mul(0x9e37_79b1) >> 24
}

#[inline(always)]
fn same(a: &CounterKey, b: &CounterKey) -> bool {
    a.remote_ip[0] == b.remote_ip[0]
        && a.remote_ip[1] == b.remote_ip[1]
        && a.remote_ip[2] == b.remote_ip[2]
        && a.remote_ip[3] == b.remote_ip[3]
        && a.port == b.port
        && a.proto == b.proto
        && a.direction == b.direction
}

#[inline(always)]
fn flush(key: &CounterKey, bytes: u64, packets: u64) {
    match COUNTERS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a live element.
        Some(v) => unsafe {
            (*v).bytes += bytes;
            (*v).packets += packets;
        },
        None => {
            let _ = COUNTERS.insert(key, &Counters { bytes, packets }, BPF_NOEXIST as u64);
        }
    }
}

#[classifier]
pub fn bench_cache(ctx: TcContext) -> i32 {
    let key = spread::next_key();
    let bytes = ctx.len() as u64;
    let Some(slot) = FRONT.get_ptr_mut(slot_of(&key)) else { return TC_ACT_UNSPEC };
    // SAFETY: this CPU's slot; programs do not nest on a CPU for one hook.
    let slot = unsafe { &mut *slot };
    if slot.packets != 0 && same(&slot.key, &key) {
        slot.bytes += bytes;
        slot.packets += 1;
    } else {
        if slot.packets != 0 {
            flush(&slot.key, slot.bytes, slot.packets);
        }
        slot.key = key;
        slot.bytes = bytes;
        slot.packets = 1;
    }
    TC_ACT_UNSPEC
}
