//! portwatch's kernel program: a passive TC classifier (ingress and egress) that counts the
//! traffic of watched TCP/UDP ports per remote IP. It never drops, changes or redirects a packet and
//! always returns `TC_ACT_UNSPEC` (`TCX_NEXT`), so programs after it in the chain still run.
//!
//! `parse` turns headers into a `Flow`; this file turns a `Flow` into map updates.
#![no_std]
#![no_main]
// `opaque`'s empty asm block (the build sets RUSTC_BOOTSTRAP, as aya-ebpf needs it too).
#![feature(asm_experimental_arch)]

mod parse;
mod runtime;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use parse::Flow;
use portwatch_common::{
    filter_index, front_index, full_hint_index, hll_register, ip_filter_index, mask_remote, overflow_slot,
    port_slot_index, proto_bit, source_hash_fast, tier_slot, AttachKey, Attachment, Config, CounterKey, Counters,
    Direction, FrontSlot, Journal, JournalKey, Meta, PortKey, PortSlot, Stats, Tier, TierSizes, DEFAULT_MAX_ENTRIES,
    DRAINED_ENTRIES, FRONT_ENTRIES, FULL_HINTS, HLL_REGISTERS, MAX_ATTACHMENTS, PORT_COUNT, PORT_OVERFLOW_ENTRIES,
    PORT_SLOTS, RESERVED_ENTRIES, TIER_FRONT_ENTRIES,
};

/// The object's sizes; `portwatch load` sets the real ones at load time.
const DEFAULT_SIZES: TierSizes = TierSizes::derived(DEFAULT_MAX_ENTRIES);
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

#[map(name = "tier1_0")]
static TIER1_0: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(DEFAULT_SIZES.prefix, 0);

#[map(name = "tier1_1")]
static TIER1_1: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(DEFAULT_SIZES.prefix, 0);

#[map(name = "tier2_0")]
static TIER2_0: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(DEFAULT_SIZES.wide_prefix, 0);

#[map(name = "tier2_1")]
static TIER2_1: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(DEFAULT_SIZES.wide_prefix, 0);

#[map(name = "tier_front_0")]
static TIER_FRONT_0: PerCpuArray<FrontSlot> = PerCpuArray::with_max_entries(TIER_FRONT_ENTRIES, 0);

#[map(name = "tier_front_1")]
static TIER_FRONT_1: PerCpuArray<FrontSlot> = PerCpuArray::with_max_entries(TIER_FRONT_ENTRIES, 0);

/// Not preallocated: memory for the ports that overflowed only.
#[map(name = "port_overflow_0")]
static PORT_OVERFLOW_0: PerCpuHashMap<PortKey, Counters> =
    PerCpuHashMap::with_max_entries(PORT_OVERFLOW_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "port_overflow_1")]
static PORT_OVERFLOW_1: PerCpuHashMap<PortKey, Counters> =
    PerCpuHashMap::with_max_entries(PORT_OVERFLOW_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "port_slots_0")]
static PORT_SLOTS_0: PerCpuArray<PortSlot> = PerCpuArray::with_max_entries(PORT_SLOTS, 0);

#[map(name = "port_slots_1")]
static PORT_SLOTS_1: PerCpuArray<PortSlot> = PerCpuArray::with_max_entries(PORT_SLOTS, 0);

/// Eight filter bytes per element (an array's elements take 8 bytes each whatever their size).
/// Mmapable: userspace zeroes and refills an idle generation's filter in place.
#[map(name = "filter_0")]
static FILTER_0: Array<u64> = Array::with_max_entries(DEFAULT_SIZES.filter_words(), BPF_F_MMAPABLE);

#[map(name = "filter_1")]
static FILTER_1: Array<u64> = Array::with_max_entries(DEFAULT_SIZES.filter_words(), BPF_F_MMAPABLE);

/// Per generation and tier, per CPU: 1 once an insert found that map full (see
/// `map_names::MAP_FULL`).
#[map(name = "map_full")]
static MAP_FULL: PerCpuArray<u32> = PerCpuArray::with_max_entries(FULL_HINTS, 0);

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
    let config = CONFIG.get(0).copied().unwrap_or_default();
    // Two call sites, one generation's maps each: the verifier can then inline each map's lookup.
    let counted = if config.active_generation() == 0 {
        let maps = Generation {
            index: 0,
            counters: &COUNTERS_0,
            front: &FRONT_0,
            tier1: &TIER1_0,
            tier2: &TIER2_0,
            tier_front: &TIER_FRONT_0,
            port_overflow: &PORT_OVERFLOW_0,
            port_slots: &PORT_SLOTS_0,
            filter: &FILTER_0,
        };
        count_key::<DIRECTION>(&maps, &key, flow, &config)
    } else {
        let maps = Generation {
            index: 1,
            counters: &COUNTERS_1,
            front: &FRONT_1,
            tier1: &TIER1_1,
            tier2: &TIER2_1,
            tier_front: &TIER_FRONT_1,
            port_overflow: &PORT_OVERFLOW_1,
            port_slots: &PORT_SLOTS_1,
            filter: &FILTER_1,
        };
        count_key::<DIRECTION>(&maps, &key, flow, &config)
    };
    match counted {
        Counted::UnderKey => {}
        Counted::PastPerIp { counted } => {
            stats.map_full_packets += flow.packets;
            stats.map_full_bytes += flow.bytes;
            if !counted {
                stats.overflow_missing_packets += flow.packets;
            }
        }
    }
}

/// The maps of the generation the program writes.
struct Generation<'a> {
    index: u32,
    counters: &'a PerCpuHashMap<CounterKey, Counters>,
    front: &'a PerCpuArray<FrontSlot>,
    tier1: &'a PerCpuHashMap<CounterKey, Counters>,
    tier2: &'a PerCpuHashMap<CounterKey, Counters>,
    tier_front: &'a PerCpuArray<FrontSlot>,
    port_overflow: &'a PerCpuHashMap<PortKey, Counters>,
    port_slots: &'a PerCpuArray<PortSlot>,
    filter: &'a Array<u64>,
}

/// Where `count_key` counted a flow.
enum Counted {
    /// Under its own key, in the per-IP map.
    UnderKey,
    /// Past the per-IP map, which was full: under its prefix, its wide prefix, its port, or (the
    /// per-port overflow out of memory, never in normal operation) the overflow key; `counted` is
    /// false when even that was missing.
    PastPerIp { counted: bool },
}

/// Counts `flow` in the first tier with room for it (see `Tier`): under `key` in the per-IP map
/// (through its front-cache slot); else, the per-IP map full, under its /24 or /48, then its /16
/// or /32 (each through its own slot and filter), then its port alone (its port slot, else the
/// per-port overflow map), else the overflow key. A key that exists in a tier keeps counting
/// there. Everything past the per-IP map also goes into its port's distinct-source registers.
#[inline(always)]
fn count_key<const DIRECTION: u8>(g: &Generation, key: &CounterKey, flow: &Flow, config: &Config) -> Counted {
    // Past the per-IP map, the hash its filter byte came from (`Hashed::source`) serves the
    // register too: a new source is hashed once.
    let source_hash = match front_slot(g.front, front_index(key), key, flow) {
        Front::Hit => return Counted::UnderKey,
        front => match count_in_hash(g, Tier::Ip, g.counters, key, flow, config) {
            Ok(()) => {
                front.claim(key);
                return Counted::UnderKey;
            }
            Err(hashed) => hashed.source,
        },
    };
    let port = PortKey::of(key);
    let mut slot = port_slot(g.port_slots, &port);
    if let Some(slot) = slot.as_deref_mut() {
        let (index, rank) = hll_register(source_hash);
        let register = &mut slot.registers[index as usize % HLL_REGISTERS];
        if *register < rank {
            *register = rank;
        }
    }
    if count_in_prefix_tier(g, Tier::Prefix, g.tier1, key, flow, config)
        || count_in_prefix_tier(g, Tier::WidePrefix, g.tier2, key, flow, config)
    {
        return Counted::PastPerIp { counted: true };
    }
    if let Some(slot) = slot {
        slot.bytes += flow.bytes;
        slot.packets += flow.packets;
        return Counted::PastPerIp { counted: true };
    }
    if count_in_port_overflow(g.port_overflow, &port, flow) {
        return Counted::PastPerIp { counted: true };
    }
    // Userspace inserts the overflow keys before the program runs and keeps them. Their slots are
    // their own (`overflow_slot`).
    let direction = Direction::from_u8(DIRECTION);
    let overflow = CounterKey::overflow(direction);
    let counted = match front_slot(g.front, overflow_slot(direction), &overflow, flow) {
        Front::Hit => true,
        front => {
            let counted = add_to_entry(g.counters, &overflow, flow);
            if counted {
                front.claim(&overflow);
            }
            counted
        }
    };
    Counted::PastPerIp { counted }
}

/// Counts `flow` under `key`'s prefix in the prefix tier `tier` (whose map is `map`), through the
/// tier's front-cache slot of that prefix; false when the tier has no room for it.
#[inline(always)]
fn count_in_prefix_tier(
    g: &Generation,
    tier: Tier,
    map: &PerCpuHashMap<CounterKey, Counters>,
    key: &CounterKey,
    flow: &Flow,
    config: &Config,
) -> bool {
    let prefix = CounterKey {
        remote_ip: mask_remote(key.remote_ip, tier),
        ..*key
    };
    match front_slot(g.tier_front, tier_slot(tier, &prefix), &prefix, flow) {
        Front::Hit => true,
        front => {
            let counted = count_in_hash(g, tier, map, &prefix, flow, config).is_ok();
            if counted {
                front.claim(&prefix);
            }
            counted
        }
    }
}

/// What a key's front-cache slot did with a flow.
enum Front<'a> {
    /// The key owns the slot on this CPU: the flow is counted there.
    Hit,
    /// Nobody owns it: the key claims it once it has an entry in the map (`claim`).
    Free(&'a mut FrontSlot),
    /// Another key owns it, or there is no such slot.
    Taken,
}

impl Front<'_> {
    /// Claims a free slot for `key`, counted in the map just now: from the next packet on it is
    /// counted in the slot. The key first, then `owned` (see `FrontSlot`): volatile stores keep
    /// that order.
    #[inline(always)]
    fn claim(self, key: &CounterKey) {
        if let Front::Free(slot) = self {
            // SAFETY: plain stores into this CPU's slot.
            unsafe {
                core::ptr::write_volatile(&mut slot.key, *key);
                core::ptr::write_volatile(&mut slot.owned, 1);
            }
        }
    }
}

/// Counts `flow` in slot `index` of `front` when `key` owns it on this CPU; else says whether the
/// slot is free to claim. (No closure: the verifier would get it as a function of its own, a call
/// on every packet.)
#[inline(always)]
fn front_slot<'a>(front: &'a PerCpuArray<FrontSlot>, index: u32, key: &CounterKey, flow: &Flow) -> Front<'a> {
    let Some(slot) = front.get_ptr_mut(index) else {
        return Front::Taken;
    };
    // SAFETY: this CPU's slot of a per-CPU array; programs do not nest on a CPU (ingress runs in
    // softirq, egress with softirqs off), and userspace writes only the idle generation's slots.
    let slot = unsafe { &mut *slot };
    if slot.owned == 0 {
        return Front::Free(slot);
    }
    if slot.key.same(key) {
        slot.bytes += flow.bytes;
        slot.packets += flow.packets;
        return Front::Hit;
    }
    Front::Taken
}

/// A key's hashes, made only when its filter byte is needed: `source` is its `source_hash` for
/// a per-IP key (0 for a prefix), `filter` its `filter_index`.
#[derive(Clone, Copy)]
struct Hashed {
    source: u32,
    filter: u32,
}

impl Hashed {
    #[inline(always)]
    fn of(tier: Tier, key: &CounterKey, config: &Config) -> Hashed {
        if matches!(tier, Tier::Ip) {
            let source = source_hash_fast(&key.remote_ip, config.seed, config.seed_v4);
            Hashed {
                source,
                filter: ip_filter_index(key, source),
            }
        } else {
            Hashed {
                source: 0,
                filter: filter_index(key, tier, config.seed),
            }
        }
    }

    /// The key's byte of the generation's filter.
    #[inline(always)]
    fn mark(&self, g: &Generation, config: &Config) -> Option<*mut u8> {
        let byte = self.filter & config.filter_mask;
        // SAFETY: a byte of the 8-byte element `byte / 8` (`byte % 8` < 8).
        g.filter
            .get_ptr_mut(byte >> 3)
            .map(|word| unsafe { opaque(word.cast::<u8>()).add((byte & 7) as usize) })
    }
}

/// Counts `flow` under `key` in `map`, the generation's map of `tier`, inserting the key when new;
/// `Err` with the key's hashes when the map has no room for it (they were needed to find that
/// out). Once the map is known full, a key its filter byte says was never inserted is refused
/// without a lookup; while it has room, a key it holds is counted without hashing it here.
#[inline(always)]
fn count_in_hash(
    g: &Generation,
    tier: Tier,
    map: &PerCpuHashMap<CounterKey, Counters>,
    key: &CounterKey,
    flow: &Flow,
    config: &Config,
) -> Result<(), Hashed> {
    // The hint and the filter are looked at only here, for a key without a front slot: not on a
    // known key's path.
    let full = MAP_FULL.get_ptr_mut(full_hint_index(g.index, tier));
    // SAFETY: this CPU's value of a per-CPU array (as for `FrontSlot`).
    if full.is_some_and(|f| unsafe { *f } != 0) {
        // The program never deletes: once an insert found the map full, it stays full until
        // userspace removes entries, and userspace clears the hint when it does. Meanwhile a new
        // key goes straight to the next tier instead of paying for an insert that cannot succeed,
        // and one whose byte is clear without a lookup either.
        let hashed = Hashed::of(tier, key, config);
        // SAFETY: a byte of an array map; every CPU only ever stores 1 into it (a lost race stores
        // the same value), and userspace rewrites it only in an idle generation.
        if hashed.mark(g, config).is_some_and(|m| unsafe { *m } == 0) {
            return Err(hashed);
        }
        return if add_to_entry(map, key, flow) {
            Ok(())
        } else {
            Err(hashed)
        };
    }
    if add_to_entry(map, key, flow) {
        return Ok(());
    }
    // Marked before the insert: a key in the map is always marked.
    let hashed = Hashed::of(tier, key, config);
    if let Some(m) = hashed.mark(g, config) {
        // SAFETY: as above.
        unsafe { *m = 1 };
    }
    let value = Counters {
        bytes: flow.bytes,
        packets: flow.packets,
    };
    match map.insert(key, &value, BPF_NOEXIST as u64) {
        Ok(()) => Ok(()),
        // Another CPU inserted the same new key between our lookup and insert: its slot for this
        // CPU is zero, so add there instead of losing the packet.
        Err(e) if e == -EEXIST => {
            if add_to_entry(map, key, flow) {
                Ok(())
            } else {
                Err(hashed)
            }
        }
        Err(e) => {
            if e == -E2BIG {
                if let Some(f) = full {
                    // SAFETY: as above.
                    unsafe { *f = 1 };
                }
            }
            Err(hashed)
        }
    }
}

/// `ptr`, which the optimizer can no longer relate to what it was computed from, so that it cannot
/// move arithmetic on it above the null check that made it valid: the verifier refuses pointer
/// arithmetic on a map value it has not seen checked.
#[inline(always)]
fn opaque<T>(mut ptr: *mut T) -> *mut T {
    // SAFETY: one move of the register onto itself (an empty block would leave the BTF line
    // information two lines at one instruction, which the kernel refuses).
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) ptr) };
    ptr
}

/// Adds `flow` in place to this CPU's value of `key`'s entry; false when the map has no entry for
/// `key`. Per-CPU values mean no other CPU writes it, so plain adds lose nothing.
#[inline(always)]
fn add_to_entry<K>(counters: &PerCpuHashMap<K, Counters>, key: &K, flow: &Flow) -> bool {
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

/// The port slot of `port` on this CPU: the first of its two that it owns or that is free (claimed
/// now, the key first, then `owned`); `None` when other ports own both. (A port that took its
/// second slot may later take its first too, freed by a reset: readers add a port's slots.)
#[inline(always)]
fn port_slot<'a>(slots: &'a PerCpuArray<PortSlot>, port: &PortKey) -> Option<&'a mut PortSlot> {
    // The second slot is looked at only when another port owns the first.
    for choice in [0, 1] {
        let slot = slots.get_ptr_mut(port_slot_index(port, choice))?;
        // SAFETY: this CPU's slot of a per-CPU array, as in `front_slot`.
        let slot = unsafe { &mut *slot };
        if slot.owned == 0 {
            // SAFETY: plain stores into this CPU's slot, the key before `owned`.
            unsafe {
                core::ptr::write_volatile(&mut slot.key, *port);
                core::ptr::write_volatile(&mut slot.owned, 1);
            }
            return Some(slot);
        }
        if slot.key.port == port.port && slot.key.proto == port.proto && slot.key.direction == port.direction {
            return Some(slot);
        }
    }
    None
}

/// Counts `flow` under `port` in the per-port overflow map, inserting it when new; false when the
/// kernel has no memory for it.
#[inline(always)]
fn count_in_port_overflow(map: &PerCpuHashMap<PortKey, Counters>, port: &PortKey, flow: &Flow) -> bool {
    if add_to_entry(map, port, flow) {
        return true;
    }
    let value = Counters {
        bytes: flow.bytes,
        packets: flow.packets,
    };
    match map.insert(port, &value, BPF_NOEXIST as u64) {
        Ok(()) => true,
        Err(e) if e == -EEXIST => add_to_entry(map, port, flow),
        Err(_) => false,
    }
}
