//! The front-cache experiment (issue 13): portwatch's front cache (`FrontSlot`) in front of the
//! per-CPU hash, as `main.rs` does it: a key that owns its slot on this CPU adds there (an inlined
//! array lookup, no call); any other goes to the hash and claims the slot when it is free. Same
//! keys as `bench_hash`. Not embedded.
#![no_std]
#![no_main]

#[path = "../runtime.rs"]
mod runtime;
#[path = "../bench/spread.rs"]
mod spread;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use portwatch_common::{front_index, CounterKey, Counters, FrontSlot, FRONT_SLOTS};

#[map(name = "counters")]
static COUNTERS: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(65538, 0);

#[map(name = "front")]
static FRONT: PerCpuArray<FrontSlot> = PerCpuArray::with_max_entries(FRONT_SLOTS, 0);

#[inline(always)]
fn add(key: &CounterKey, bytes: u64) -> bool {
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
pub fn bench_cache(ctx: TcContext) -> i32 {
    let key = spread::next_key();
    let bytes = ctx.len() as u64;
    let Some(slot) = FRONT.get_ptr_mut(front_index(&key)) else {
        add(&key, bytes);
        return TC_ACT_UNSPEC;
    };
    // SAFETY: this CPU's slot; programs do not nest on a CPU for one hook.
    let slot = unsafe { &mut *slot };
    if slot.owned != 0 {
        if slot.key.same(&key) {
            slot.bytes += bytes;
            slot.packets += 1;
        } else {
            add(&key, bytes);
        }
    } else if add(&key, bytes) {
        // SAFETY: plain stores into this CPU's slot, the key before `owned`.
        unsafe {
            core::ptr::write_volatile(&mut slot.key, key);
            core::ptr::write_volatile(&mut slot.owned, 1);
        }
    }
    TC_ACT_UNSPEC
}
