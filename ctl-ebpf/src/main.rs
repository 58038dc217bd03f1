//! portwatch's kernel program: a passive TC classifier (ingress and egress) that counts the
//! traffic of watched TCP/UDP ports per remote IP. It never drops, changes or redirects a packet and
//! always returns `TC_ACT_UNSPEC` (`TCX_NEXT`), so programs after it in the chain still run.
//!
//! `parse` turns headers into a `Flow`; this file turns a `Flow` into map updates.
#![no_std]
#![no_main]

mod parse;
mod runtime;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use parse::Flow;
use portwatch_common::{
    front_index, overflow_slot, proto_bit, AttachKey, Attachment, Config, CounterKey, Counters, Direction, FrontSlot,
    Journal, JournalKey, Meta, PortKey, Stats, DEFAULT_MAX_ENTRIES, DRAINED_ENTRIES, FRONT_ENTRIES, MAX_ATTACHMENTS,
    PORT_COUNT, RESERVED_ENTRIES,
};

/// The object's size; `portwatch load --max-entries` sets the real one at load time.
const COUNTER_ENTRIES: u32 = DEFAULT_MAX_ENTRIES + RESERVED_ENTRIES;
const EEXIST: i32 = 17;
const E2BIG: i32 = 7;

#[map(name = "watched_ports")]
static WATCHED_PORTS: Array<u8> = Array::with_max_entries(PORT_COUNT, 0);

#[map(name = "counters_0")]
static COUNTERS_0: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(COUNTER_ENTRIES, 0);

#[map(name = "counters_1")]
static COUNTERS_1: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(COUNTER_ENTRIES, 0);

#[map(name = "front_0")]
static FRONT_0: PerCpuArray<FrontSlot> = PerCpuArray::with_max_entries(FRONT_ENTRIES, 0);

#[map(name = "front_1")]
static FRONT_1: PerCpuArray<FrontSlot> = PerCpuArray::with_max_entries(FRONT_ENTRIES, 0);

/// Per generation, per CPU: 1 once an insert found the counter map full (see `map_names::MAP_FULL`).
#[map(name = "map_full")]
static MAP_FULL: PerCpuArray<u32> = PerCpuArray::with_max_entries(2, 0);

#[map(name = "config")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "stats")]
static STATS: PerCpuArray<Stats> = PerCpuArray::with_max_entries(1, 0);

// Written and read by userspace only; declared here so the object carries them and `load` pins them.
#[map(name = "meta")]
static META: Array<Meta> = Array::with_max_entries(1, 0);

#[map(name = "attachments")]
static ATTACHMENTS: HashMap<AttachKey, Attachment> = HashMap::with_max_entries(MAX_ATTACHMENTS, 0);

#[map(name = "drained")]
static DRAINED: HashMap<PortKey, Counters> = HashMap::with_max_entries(DRAINED_ENTRIES, 0);

#[map(name = "journal")]
static JOURNAL: Array<Journal> = Array::with_max_entries(1, 0);

/// `BPF_F_NO_PREALLOC`: the journal is nearly always empty; its size is set at load time.
#[map(name = "journal_entries")]
static JOURNAL_ENTRIES: HashMap<JournalKey, Counters> = HashMap::with_max_entries(1, 1);

// The program names are `Direction::program_name`.
#[classifier]
pub fn portwatch_ingress(ctx: TcContext) -> i32 {
    observe::<{ Direction::Ingress as u8 }>(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn portwatch_egress(ctx: TcContext) -> i32 {
    observe::<{ Direction::Egress as u8 }>(&ctx);
    TC_ACT_UNSPEC
}

/// `DIRECTION` is a `Direction as u8`: a constant per program, so each is compiled for its own.
#[inline(always)]
fn observe<const DIRECTION: u8>(ctx: &TcContext) {
    let Some(stats) = STATS.get_ptr_mut(0) else { return };
    // SAFETY: a per-CPU array slot; only this CPU writes it, and programs do not nest on a CPU
    // for the same hook.
    let stats = unsafe { &mut *stats };
    match parse::parse(ctx) {
        Ok(flow) => count::<DIRECTION>(&flow, stats),
        Err(reason) => *stats.not_counted_mut(reason) += 1,
    }
}

/// Ingress counts traffic *to* a watched local port under its source; egress counts replies *from*
/// a watched local port under their destination. Either way the key holds the remote IP.
#[inline(always)]
fn count<const DIRECTION: u8>(flow: &Flow, stats: &mut Stats) {
    let (local_port, remote_ip) = if Direction::from_u8(DIRECTION) == Direction::Ingress {
        (flow.dst_port, flow.src)
    } else {
        (flow.src_port, flow.dst)
    };
    let proto_bit = proto_bit(flow.proto);
    let watched = WATCHED_PORTS.get(local_port as u32).copied().unwrap_or(0);
    if watched & proto_bit == 0 {
        stats.unwatched_packets += 1;
        return;
    }
    stats.matched_packets += flow.packets;
    stats.matched_bytes += flow.bytes;

    let key = CounterKey {
        remote_ip,
        port: local_port,
        proto: flow.proto,
        direction: DIRECTION,
    };
    let generation = CONFIG.get(0).map(Config::active_generation).unwrap_or(0);
    // Two call sites, one map each: the verifier can then inline each map's lookup.
    let counted = if generation == 0 {
        count_key::<DIRECTION>(&FRONT_0, &COUNTERS_0, &key, flow, generation)
    } else {
        count_key::<DIRECTION>(&FRONT_1, &COUNTERS_1, &key, flow, generation)
    };
    match counted {
        Counted::UnderKey => {}
        Counted::MapFull { overflow_missing } => {
            stats.map_full_packets += flow.packets;
            stats.map_full_bytes += flow.bytes;
            if overflow_missing {
                stats.overflow_missing_packets += flow.packets;
            }
        }
    }
}

/// Where `count_key` counted a flow.
enum Counted {
    /// Under its own key.
    UnderKey,
    /// The map had no room for a new key; the traffic went to the overflow key unless it was
    /// missing too.
    MapFull { overflow_missing: bool },
}

/// Counts `flow` under `key`: in its front-cache slot (see `FrontSlot`), else in the generation's
/// counter map, else (the map full) under the overflow key of this direction, itself through its
/// own slot.
#[inline(always)]
fn count_key<const DIRECTION: u8>(
    front: &PerCpuArray<FrontSlot>,
    counters: &PerCpuHashMap<CounterKey, Counters>,
    key: &CounterKey,
    flow: &Flow,
    generation: u32,
) -> Counted {
    if count_in_slot(front, front_index(key), key, flow, || {
        count_in_hash(counters, key, flow, generation)
    }) {
        return Counted::UnderKey;
    }
    // Userspace inserts the overflow keys before the program runs and keeps them, so the sum of
    // all counters still equals all matched traffic. Their slots are their own (`overflow_slot`).
    let direction = Direction::from_u8(DIRECTION);
    let overflow = CounterKey::overflow(direction);
    let counted = count_in_slot(front, overflow_slot(direction), &overflow, flow, || {
        add_to_entry(counters, &overflow, flow)
    });
    Counted::MapFull {
        overflow_missing: !counted,
    }
}

/// Counts `flow` in slot `index` when `key` owns that slot on this CPU. Any other key is counted
/// by `in_hash` (in the counter map: true when under `key` itself), and claims the slot when it is
/// free and `in_hash` put it in the map.
#[inline(always)]
fn count_in_slot(
    front: &PerCpuArray<FrontSlot>,
    index: u32,
    key: &CounterKey,
    flow: &Flow,
    in_hash: impl FnOnce() -> bool,
) -> bool {
    let Some(slot) = front.get_ptr_mut(index) else {
        return in_hash();
    };
    // SAFETY: this CPU's slot of a per-CPU array; programs do not nest on a CPU (ingress runs in
    // softirq, egress with softirqs off), and userspace writes only the idle generation's slots.
    let slot = unsafe { &mut *slot };
    if slot.owned != 0 {
        if slot.key.same(key) {
            slot.bytes += flow.bytes;
            slot.packets += flow.packets;
            return true;
        }
        return in_hash();
    }
    let counted = in_hash();
    if counted {
        // The key first, then `owned` (see `FrontSlot`): volatile stores keep that order.
        // SAFETY: plain stores into this CPU's slot.
        unsafe {
            core::ptr::write_volatile(&mut slot.key, *key);
            core::ptr::write_volatile(&mut slot.owned, 1);
        }
    }
    counted
}

/// Counts `flow` under `key` in the counter map, inserting the key when new; false when the map
/// has no room for it.
#[inline(always)]
fn count_in_hash(
    counters: &PerCpuHashMap<CounterKey, Counters>,
    key: &CounterKey,
    flow: &Flow,
    generation: u32,
) -> bool {
    if add_to_entry(counters, key, flow) {
        return true;
    }
    // The hint is looked up only here, for a key the map does not have: not on a known key's path.
    let full = MAP_FULL.get_ptr_mut(generation & 1);
    // SAFETY: this CPU's value of a per-CPU array (as for `FrontSlot`).
    let known_full = full.is_some_and(|f| unsafe { *f } != 0);
    // The program never deletes: once an insert found the map full, it stays full until userspace
    // removes entries, and userspace clears the hint when it does. Meanwhile a new key goes straight
    // to the overflow key instead of paying for an insert that cannot succeed.
    if known_full {
        return false;
    }
    let value = Counters {
        bytes: flow.bytes,
        packets: flow.packets,
    };
    match counters.insert(key, &value, BPF_NOEXIST as u64) {
        Ok(()) => true,
        // Another CPU inserted the same new key between our lookup and insert: its slot for this
        // CPU is zero, so add there instead of losing the packet.
        Err(e) if e == -EEXIST => add_to_entry(counters, key, flow),
        Err(e) => {
            if e == -E2BIG {
                if let Some(f) = full {
                    // SAFETY: as above.
                    unsafe { *f = 1 };
                }
            }
            false
        }
    }
}

/// Adds `flow` in place to this CPU's value of `key`'s entry; false when the map has no entry for
/// `key`. Per-CPU values mean no other CPU writes it, so plain adds lose nothing.
#[inline(always)]
fn add_to_entry(counters: &PerCpuHashMap<CounterKey, Counters>, key: &CounterKey, flow: &Flow) -> bool {
    match counters.get_ptr_mut(key) {
        Some(value) => {
            // SAFETY: a live per-CPU element; userspace never deletes from the generation the
            // program writes (see bpffs-layout.md, "Reset").
            unsafe {
                (*value).bytes += flow.bytes;
                (*value).packets += flow.packets;
            }
            true
        }
        None => false,
    }
}
