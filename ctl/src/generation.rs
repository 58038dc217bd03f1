//! One counter generation: everything the kernel program counts into while `config.generation`
//! names it, behind one handle. Its counter sources are the tiers (`Tier`) and what sits in front
//! of them: the per-IP hash (`counters_<g>`, with the overflow keys) and its front cache
//! (`front_<g>`); the prefix tiers (`tier1_<g>`, `tier2_<g>`) and their front cache
//! (`tier_front_<g>`); the per-port overflow (`port_overflow_<g>`) and the port slots
//! (`port_slots_<g>`, with the distinct-source registers); the filter (`filter_<g>`) and the "map
//! full" hints (`map_full`). Readers see their entries merged under a `Key` that says at which
//! granularity the traffic was counted; the reset removes and writes entries through it. A new
//! counter map of a generation is added here, and only here (CONTRIBUTING.md, "Adding a counter
//! source").
//!
//! The program writes the generation that `config.generation` names, in place; userspace changes
//! only the idle one (`remove`, `set`, `clear_full_hints` say so), after the reset has flipped
//! `config.generation` away from it and waited for running programs (`reset`).

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    os::fd::AsFd,
};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, IterableMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    Pod,
};
use portwatch_common::{
    filter_index, front_index, full_hint_index, generation_maps, map_names, overflow_slot, tier_slot, Config,
    CounterKey, Counters, Direction, FrontSlot, PortKey, PortSlot, Tier, FRONT_SLOTS,
};

use crate::{cidr::Cidr, fault, sources::Sketch, sys};

/// What a count is of, as readers and the reset's journal name it: the remote side, at the
/// granularity it was counted, and the watched port, protocol and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub remote: Remote,
    /// The watched local port (0 for the overflow key).
    pub port: u16,
    /// 6 (TCP) or 17 (UDP); 0 for the overflow key.
    pub proto: u8,
    pub direction: Direction,
}

/// The remote side of a count, at the granularity its tier keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Remote {
    /// One remote address (`Tier::Ip`): 16 bytes in network order, IPv4 mapped.
    Ip([u8; 16]),
    /// A prefix of remote addresses: a /24 or /48 (`Tier::Prefix`), a /16 or /32
    /// (`Tier::WidePrefix`).
    Prefix(Cidr),
    /// Any remote address (`Tier::Port`): the per-port overflow.
    AnyRemote,
    /// Traffic no tier had room for (the overflow key, never in normal operation): no remote,
    /// port or protocol.
    Overflow,
}

impl Key {
    /// The count of one remote address (16 bytes, IPv4 mapped) on a watched port.
    pub fn ip(ip: [u8; 16], port: u16, proto: u8, direction: Direction) -> Key {
        Key {
            remote: Remote::Ip(ip),
            port,
            proto,
            direction,
        }
    }

    /// The overflow count of a direction.
    pub const fn overflow(direction: Direction) -> Key {
        Key {
            remote: Remote::Overflow,
            port: 0,
            proto: 0,
            direction,
        }
    }

    /// The per-port overflow count of a port, protocol and direction.
    pub const fn any_remote(port: PortKey) -> Key {
        Key {
            remote: Remote::AnyRemote,
            port: port.port,
            proto: port.proto,
            direction: port.direction(),
        }
    }

    pub fn is_overflow(&self) -> bool {
        self.remote == Remote::Overflow
    }

    /// The tier the count is kept in (`None`: the overflow key).
    pub fn tier(&self) -> Option<Tier> {
        match self.remote {
            Remote::Ip(_) => Some(Tier::Ip),
            Remote::Prefix(cidr) => cidr.tier(),
            Remote::AnyRemote => Some(Tier::Port),
            Remote::Overflow => None,
        }
    }

    /// Its port, protocol and direction.
    pub const fn port_key(&self) -> PortKey {
        PortKey::new(self.port, self.proto, self.direction)
    }

    /// The key of its entry in the per-IP map (`Ip`, `Overflow`) or in a prefix tier (`Prefix`);
    /// for `AnyRemote`, its port in the key's port fields, address zero (as the journal keeps it).
    pub fn counter_key(&self) -> CounterKey {
        match self.remote {
            Remote::Ip(ip) => CounterKey::with_octets(ip, self.port, self.proto, self.direction),
            Remote::Prefix(cidr) => CounterKey::with_octets(cidr.addr(), self.port, self.proto, self.direction),
            Remote::AnyRemote => CounterKey::with_octets([0; 16], self.port, self.proto, self.direction),
            Remote::Overflow => CounterKey::overflow(self.direction),
        }
    }

    /// The key of an entry of `tier`'s map (`CounterKey::overflow` is the overflow key whatever
    /// the tier; a `Tier::Port` key carries its port in the port fields).
    pub fn of_tier(tier: Tier, key: CounterKey) -> Key {
        let remote = match tier {
            _ if key.is_overflow() => return Key::overflow(key.direction()),
            Tier::Ip => Remote::Ip(key.remote_ip_octets()),
            Tier::Prefix | Tier::WidePrefix => Remote::Prefix(Cidr::of_tier(&key, tier)),
            Tier::Port => Remote::AnyRemote,
        };
        Key {
            remote,
            port: key.port,
            proto: key.proto,
            direction: key.direction(),
        }
    }
}

impl From<CounterKey> for Key {
    /// A key of the per-IP map.
    fn from(key: CounterKey) -> Key {
        Key::of_tier(Tier::Ip, key)
    }
}

/// Entries per batch syscall when reading a counter map.
const BATCH_CHUNK: usize = 16384;

/// `BPF_NOEXIST` from `linux/bpf.h`: create only.
const BPF_NOEXIST: u64 = 1;

/// The possible CPUs: how many values a per-CPU map holds per key.
pub fn possible_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))
}

/// The sum of per-CPU values.
pub fn sum<V: Copy + Default + std::ops::AddAssign>(values: &[V]) -> V {
    values.iter().fold(V::default(), |mut acc, v| {
        acc += *v;
        acc
    })
}

/// A per-CPU value with all of `value` on CPU 0.
fn on_cpu_0<V: Pod + Default>(value: V, cpus: usize) -> Result<PerCpuValues<V>> {
    let mut values = vec![V::default(); cpus];
    values[0] = value;
    Ok(PerCpuValues::try_from(values)?)
}

/// A hash map of counters of a generation, by its key type.
type CounterMap<K> = PerCpuHashMap<MapData, K, Counters>;

/// A counter generation's maps, opened.
pub struct Generation {
    /// 0 or 1: which generation `config.generation` must name for the program to write this one.
    index: u32,
    /// `counters_<g>`: a key's entry, per CPU; the two overflow keys are entries too.
    counters: CounterMap<CounterKey>,
    /// `front_<g>`: slots a key owns on a CPU once it has an entry (see `FrontSlot`).
    front: PerCpuArray<MapData, FrontSlot>,
    /// `tier1_<g>`, `tier2_<g>`: the prefix tiers.
    tier1: CounterMap<CounterKey>,
    tier2: CounterMap<CounterKey>,
    /// `tier_front_<g>`: the prefix tiers' slots (`tier_slot`).
    tier_front: PerCpuArray<MapData, FrontSlot>,
    /// `port_overflow_<g>`: the per-port overflow.
    port_overflow: CounterMap<PortKey>,
    /// `port_slots_<g>`: the per-port overflow's slots, with the distinct-source registers.
    port_slots: PerCpuArray<MapData, PortSlot>,
    /// `filter_<g>`, and what hashes into it (`Config::seed`, `Config::filter_mask`).
    filter: Array<MapData, u64>,
    seed: u32,
    filter_mask: u32,
    /// `map_full`, shared by both generations (elements `full_hint_index(index, tier)`).
    map_full: PerCpuArray<MapData, u32>,
}

impl Generation {
    /// Both generations, each map opened by `open` (given its name: from its pin, or from a loaded
    /// object) and checked to have its type. A map the two share (`map_full`) is opened once and
    /// held by both. `config` gives the filters' seed and size (they never change after `load`).
    pub fn open_both(config: &Config, mut open: impl FnMut(&str) -> Result<Map>) -> Result<[Generation; 2]> {
        let map_full: PerCpuArray<MapData, u32> = typed(open(map_names::MAP_FULL)?, map_names::MAP_FULL)?;
        let again = map_full
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("another handle on the map_full map")?;
        let map_full_again = typed(Map::from_map_data(MapData::from_fd(again)?)?, map_names::MAP_FULL)?;
        let mut one = |index: u32, map_full| -> Result<Generation> {
            let names = generation_maps(index);
            let mut open_typed = |name: &str| -> Result<Map> { open(name) };
            Ok(Generation {
                index,
                counters: typed(open_typed(names.counters)?, names.counters)?,
                front: typed(open_typed(names.front)?, names.front)?,
                tier1: typed(open_typed(names.tier1)?, names.tier1)?,
                tier2: typed(open_typed(names.tier2)?, names.tier2)?,
                tier_front: typed(open_typed(names.tier_front)?, names.tier_front)?,
                port_overflow: typed(open_typed(names.port_overflow)?, names.port_overflow)?,
                port_slots: typed(open_typed(names.port_slots)?, names.port_slots)?,
                filter: typed(open_typed(names.filter)?, names.filter)?,
                seed: config.seed,
                filter_mask: config.filter_mask,
                map_full,
            })
        };
        Ok([one(0, map_full)?, one(1, map_full_again)?])
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// Inserts the overflow keys (one per direction) with zero counts, unless present. The kernel
    /// program relies on them to account for traffic that no tier has room for, so they must
    /// exist before the program runs and after every drain.
    pub fn ensure_overflow_keys(&mut self) -> Result<()> {
        let cpus = possible_cpus()?;
        for direction in Direction::ALL {
            let zero = on_cpu_0(Counters::default(), cpus)?;
            match self.counters.insert(CounterKey::overflow(direction), zero, BPF_NOEXIST) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e).context("inserting the overflow key into a counter map"),
            }
        }
        Ok(())
    }

    /// Every count of this generation, once per key, summed over CPUs: each key's entry in its
    /// tier with what its slots hold added (the per-IP map's overflow keys included). One
    /// `BPF_MAP_LOOKUP_BATCH` per 16384 entries, or a key-at-a-time walk where the kernel has no
    /// batch operations for a map. Holds a few chunks at a time, not the maps.
    ///
    /// The slots are read first: a slot claimed after that read holds packets counted after it
    /// (the key's entry does not lose them), so each key's total only grows from one read to the
    /// next, as with the hashes alone.
    pub fn for_each(&self, mut each: impl FnMut(Key, Counters)) -> Result<()> {
        let [tier1_slots, tier2_slots] = self.tier_slots_by_key()?;
        let port_slots = self.port_slots_by_key()?;
        read_map(&self.counters, self.front_by_key()?, Key::from, &mut each)?;
        read_map(&self.tier1, tier1_slots, |k| Key::of_tier(Tier::Prefix, k), &mut each)?;
        read_map(
            &self.tier2,
            tier2_slots,
            |k| Key::of_tier(Tier::WidePrefix, k),
            &mut each,
        )?;
        read_map(&self.port_overflow, port_slots, Key::any_remote, &mut each)
    }

    /// `for_each` without the batch operations: one lookup per key, as on kernels that have none
    /// (public so that a test compares the two).
    pub fn for_each_key_by_key(&self, mut each: impl FnMut(Key, Counters)) -> Result<()> {
        let [tier1_slots, tier2_slots] = self.tier_slots_by_key()?;
        let port_slots = self.port_slots_by_key()?;
        walk_map(&self.counters, self.front_by_key()?, Key::from, &mut each)?;
        walk_map(&self.tier1, tier1_slots, |k| Key::of_tier(Tier::Prefix, k), &mut each)?;
        walk_map(
            &self.tier2,
            tier2_slots,
            |k| Key::of_tier(Tier::WidePrefix, k),
            &mut each,
        )?;
        walk_map(&self.port_overflow, port_slots, Key::any_remote, &mut each)
    }

    /// Every count of this generation, collected (see `for_each`).
    pub fn read(&self) -> Result<Vec<(Key, Counters)>> {
        let mut out = Vec::new();
        self.for_each(|k, v| out.push((k, v)))?;
        Ok(out)
    }

    /// Merges into `into` the distinct-source registers of each port, protocol and direction,
    /// every CPU's: the remote addresses counted past the per-IP map in this generation.
    pub fn merge_sources(&self, into: &mut std::collections::BTreeMap<PortKey, Sketch>) -> Result<()> {
        read_slots::<PortSlot>(&self.port_slots, |_, slot| {
            if slot.owned != 0 {
                into.entry(slot.key).or_default().merge(&slot.registers);
            }
        })
    }

    /// What the per-IP map's front cache holds, summed per key over slots and CPUs.
    fn front_by_key(&self) -> Result<HashMap<CounterKey, Counters>> {
        let mut by_key: HashMap<CounterKey, Counters> = HashMap::new();
        for (key, value) in front_entries(&self.front)? {
            *by_key.entry(key).or_default() += value;
        }
        Ok(by_key)
    }

    /// What the prefix tiers' front cache holds, summed per key, tier 1's and tier 2's.
    fn tier_slots_by_key(&self) -> Result<[HashMap<CounterKey, Counters>; 2]> {
        let mut by_tier = [HashMap::new(), HashMap::new()];
        read_slots::<FrontSlot>(&self.tier_front, |index, slot| {
            let tier = if index < FRONT_SLOTS {
                Tier::Prefix
            } else {
                Tier::WidePrefix
            };
            if slot.owned != 0 && tier_slot(tier, &slot.key) == index {
                *by_tier[(tier == Tier::WidePrefix) as usize]
                    .entry(slot.key)
                    .or_default() += Counters {
                    bytes: slot.bytes,
                    packets: slot.packets,
                };
            }
        })?;
        Ok(by_tier)
    }

    /// What the port slots hold for the per-port overflow, summed per port, protocol and
    /// direction.
    fn port_slots_by_key(&self) -> Result<HashMap<PortKey, Counters>> {
        let mut counts: HashMap<PortKey, Counters> = HashMap::new();
        read_slots::<PortSlot>(&self.port_slots, |_, slot| {
            if slot.owned != 0 {
                *counts.entry(slot.key).or_default() += Counters {
                    bytes: slot.bytes,
                    packets: slot.packets,
                };
            }
        })?;
        Ok(counts)
    }

    /// Removes `keys` from this generation: their slots first, then their entries (killed in
    /// between, the next read still finds the entries); an overflow key is zeroed instead (the
    /// program needs it). A key that is not there is skipped, so a removal repeated after a crash
    /// does the same. The maps have room again: the "map full" hints are cleared. (The filter keeps
    /// the removed keys' bytes, each a lookup more for a key that shares it, until
    /// `refill_filter`.) Only for the idle generation: the program must not write it meanwhile.
    pub fn remove(&mut self, keys: &[Key]) -> Result<()> {
        let by_tier = ByTier::of(keys.iter().map(|k| (*k, ())));
        self.clear_slots(&by_tier)?;
        let cpus = possible_cpus()?;
        for key in &by_tier.overflow {
            self.counters
                .insert(key, on_cpu_0(Counters::default(), cpus)?, 0)
                .context("zeroing an overflow key")?;
        }
        for (map, keys) in [
            (&self.counters, &by_tier.ip),
            (&self.tier1, &by_tier.prefix),
            (&self.tier2, &by_tier.wide_prefix),
        ] {
            let keys: Vec<CounterKey> = keys.iter().map(|(k, _)| *k).collect();
            remove_recorded(map, &keys)?;
        }
        let ports: Vec<PortKey> = by_tier.port.iter().map(|(k, _)| *k).collect();
        remove_recorded(&self.port_overflow, &ports)?;
        self.clear_full_hints()
    }

    /// Writes `targets` into this generation, each key's whole count in its entry (its slots
    /// cleared first); a zero target removes the entry (an overflow key's is zeroed). Writing the
    /// same targets again gives the same result, so the reset's last step can be repeated after a
    /// crash. Only for the idle generation, like `remove`.
    pub fn set(&mut self, targets: &[(Key, Counters)]) -> Result<()> {
        let by_tier = ByTier::of(targets.iter().copied());
        self.clear_slots(&by_tier)?;
        let overflow: Vec<(CounterKey, Counters)> = targets
            .iter()
            .filter(|(k, _)| k.is_overflow())
            .map(|(k, v)| (k.counter_key(), *v))
            .collect();
        set_entries(&mut self.counters, &overflow, true)?;
        set_entries(&mut self.counters, &by_tier.ip, false)?;
        set_entries(&mut self.tier1, &by_tier.prefix, false)?;
        set_entries(&mut self.tier2, &by_tier.wide_prefix, false)?;
        set_entries(&mut self.port_overflow, &by_tier.port, false)?;
        self.clear_full_hints()
    }

    /// Clears this generation's "map full" hints, every tier's, on every CPU (after removing
    /// entries from it; harmless when a map is still full: the next insert that fails sets its hint
    /// again).
    pub fn clear_full_hints(&mut self) -> Result<()> {
        let cpus = possible_cpus()?;
        for tier in [Tier::Ip, Tier::Prefix, Tier::WidePrefix] {
            self.map_full
                .set(full_hint_index(self.index, tier), on_cpu_0(0u32, cpus)?, 0)
                .context("clearing a map-full hint")?;
        }
        Ok(())
    }

    /// Zeroes the filter and marks the keys the per-IP map and the prefix tiers hold now: what the
    /// program would have marked had they been inserted since. Only for the idle generation.
    pub fn refill_filter(&mut self) -> Result<()> {
        let mut mapped = self.map_filter()?;
        let bytes = mapped.bytes();
        bytes.fill(0);
        let cpus = possible_cpus()?;
        for (tier, map) in [
            (Tier::Ip, &self.counters),
            (Tier::Prefix, &self.tier1),
            (Tier::WidePrefix, &self.tier2),
        ] {
            let mut mark = |keys: &[CounterKey]| {
                for key in keys {
                    bytes[self.filter_byte(key, tier)] = 1;
                }
            };
            let batched =
                sys::bpf::lookup_batch::<CounterKey, Counters>(map.map().fd().as_fd(), cpus, BATCH_CHUNK, |k, _| {
                    mark(k)
                });
            match batched {
                Ok(()) => {}
                Err(e) if sys::bpf::batch_unsupported(&e) => {
                    let keys: Vec<CounterKey> =
                        map.keys().collect::<Result<_, _>>().context("reading a counter map")?;
                    mark(&keys);
                }
                Err(e) => return Err(e).context("reading a counter map"),
            }
        }
        Ok(())
    }

    /// Whether `key`'s byte of the filter of `tier` is set (a key whose byte is clear skips the
    /// lookup of a full map), for tests and benchmarks of the kernel program's maps.
    pub fn filter_marked(&self, key: &CounterKey, tier: Tier) -> Result<bool> {
        Ok(self.map_filter()?.bytes()[self.filter_byte(key, tier)] != 0)
    }

    /// The generation's filter, mapped into this process (`filter_mask + 1` bytes).
    fn map_filter(&self) -> Result<sys::MappedArray> {
        let len = (self.filter_mask as usize) + 1;
        sys::MappedArray::map(self.filter.map().fd().as_fd(), len).context("mapping a generation's filter")
    }

    /// Where `key`'s byte of the filter of `tier` is, as the kernel program finds it.
    fn filter_byte(&self, key: &CounterKey, tier: Tier) -> usize {
        (filter_index(key, tier, self.seed) & self.filter_mask) as usize
    }

    /// Clears every slot (on every CPU) of the keys `by_tier` has. A cache's owners are read
    /// first and the keys looked up among them (a few thousand at most): a reset of a million keys
    /// does not gather them into a set of their own.
    fn clear_slots<V>(&mut self, by_tier: &ByTier<V>) -> Result<()> {
        let owners = front_owners(&self.front)?;
        let ip: HashSet<CounterKey> = by_tier
            .ip
            .iter()
            .map(|(k, _)| k)
            .chain(&by_tier.overflow)
            .filter(|k| !owners.is_empty() && owners.contains(*k))
            .copied()
            .collect();
        if !ip.is_empty() {
            clear_slots(&mut self.front, |_, slot: &FrontSlot| {
                slot.owned != 0 && ip.contains(&slot.key)
            })?;
        }
        let owners = front_owners(&self.tier_front)?;
        let owned = |keys: &[(CounterKey, V)]| -> HashSet<CounterKey> {
            keys.iter()
                .map(|(k, _)| *k)
                .filter(|k| !owners.is_empty() && owners.contains(k))
                .collect()
        };
        let prefix: [HashSet<CounterKey>; 2] = [owned(&by_tier.prefix), owned(&by_tier.wide_prefix)];
        if prefix.iter().any(|keys| !keys.is_empty()) {
            clear_slots(&mut self.tier_front, |index, slot: &FrontSlot| {
                slot.owned != 0 && prefix[(index >= FRONT_SLOTS) as usize].contains(&slot.key)
            })?;
        }
        let ports: HashSet<PortKey> = by_tier.port.iter().map(|(k, _)| *k).collect();
        clear_slots(&mut self.port_slots, |_, slot: &PortSlot| {
            slot.owned != 0 && ports.contains(&slot.key)
        })
    }

    /// The per-IP hash itself, for tests and benchmarks of the kernel program's maps (readers use
    /// `for_each`).
    pub fn hash(&self) -> &PerCpuHashMap<MapData, CounterKey, Counters> {
        &self.counters
    }

    /// The per-IP map's front cache's owned slots, every CPU (see `front_entries`), for tests of
    /// the cache.
    pub fn front_slots(&self) -> Result<Vec<(Key, Counters)>> {
        Ok(front_entries(&self.front)?
            .into_iter()
            .map(|(k, v)| (Key::from(k), v))
            .collect())
    }
}

/// Keys split by the map they are in, as that map keys them, each with a `V`.
struct ByTier<V> {
    ip: Vec<(CounterKey, V)>,
    overflow: Vec<CounterKey>,
    prefix: Vec<(CounterKey, V)>,
    wide_prefix: Vec<(CounterKey, V)>,
    port: Vec<(PortKey, V)>,
}

impl<V> ByTier<V> {
    fn of(keys: impl IntoIterator<Item = (Key, V)>) -> ByTier<V> {
        let mut by_tier = ByTier {
            ip: vec![],
            overflow: vec![],
            prefix: vec![],
            wide_prefix: vec![],
            port: vec![],
        };
        for (key, value) in keys {
            match key.tier() {
                None => by_tier.overflow.push(key.counter_key()),
                Some(Tier::Ip) => by_tier.ip.push((key.counter_key(), value)),
                Some(Tier::Prefix) => by_tier.prefix.push((key.counter_key(), value)),
                Some(Tier::WidePrefix) => by_tier.wide_prefix.push((key.counter_key(), value)),
                Some(Tier::Port) => by_tier.port.push((key.port_key(), value)),
            }
        }
        by_tier
    }
}

/// Removes `keys` (those present) from `map`: what a reset's record holds.
fn remove_recorded<K: Pod>(map: &CounterMap<K>, keys: &[K]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    fault::point("reset:delete-batch")
        .map_err(|io_error| sys::bpf::SyscallError {
            call: "bpf_map_delete_batch",
            io_error,
        })
        .and_then(|()| sys::bpf::remove_all_if_present(map.map().fd().as_fd(), keys))
        .context("removing counters")
}

/// Writes `targets` into `map`, each whole count on CPU 0; a zero target removes its entry,
/// unless `keep_zero` (the overflow keys).
fn set_entries<K: Pod + Copy>(map: &mut CounterMap<K>, targets: &[(K, Counters)], keep_zero: bool) -> Result<()> {
    let (zero, written): (Vec<_>, Vec<_>) = targets
        .iter()
        .partition(|(_, value)| *value == Counters::default() && !keep_zero);
    let zero: Vec<K> = zero.iter().map(|(k, _)| *k).collect();
    sys::bpf::remove_all_if_present(map.map().fd().as_fd(), &zero).context("removing a counter the record holds")?;
    let cpus = possible_cpus()?;
    let keys: Vec<K> = written.iter().map(|(k, _)| *k).collect();
    let mut values = vec![Counters::default(); written.len() * cpus];
    for (i, (_, value)) in written.iter().enumerate() {
        values[i * cpus] = *value;
    }
    match sys::bpf::update_batch(map.map().fd().as_fd(), &keys, &values) {
        Ok(()) => Ok(()),
        Err(e) if sys::bpf::batch_unsupported(&e) => {
            for (key, (_, value)) in keys.iter().zip(&written) {
                map.insert(key, on_cpu_0(*value, cpus)?, 0)
                    .context("taking the record's share out of a counter")?;
            }
            Ok(())
        }
        Err(e) => Err(e).context("taking the record's share out of the counters"),
    }
}

/// Every entry of `map` (a hash of counters keyed by `K`), summed over CPUs, with what `slots`
/// holds for its key added (taken out of it), handed to `each` under `key(k)`; then what is left of
/// `slots` (slots whose key has no entry). One `BPF_MAP_LOOKUP_BATCH` per `BATCH_CHUNK` entries,
/// or a key-at-a-time walk where the kernel has no batch operations for the map.
///
/// The kernel's copy-out and `each` (grouping a million keys) both take a good part of a pass: a
/// reader thread makes the syscalls and decodes while the calling thread runs `each`, so on two
/// cores a pass takes the longer of the two rather than their sum.
fn read_map<K: Pod + Eq + Hash + Send>(
    map: &CounterMap<K>,
    slots: HashMap<K, Counters>,
    key: impl Fn(K) -> Key + Sync,
    each: &mut impl FnMut(Key, Counters),
) -> Result<()> {
    let cpus = possible_cpus()?;
    let fd = map.map().fd().as_fd();
    let key = &key;
    let (read, delivered, mut slots) = std::thread::scope(|scope| {
        let (send, receive) = std::sync::mpsc::sync_channel::<Vec<(Key, Counters)>>(4);
        let reader = scope.spawn(move || {
            let mut slots = slots;
            let read = sys::bpf::lookup_batch::<K, Counters>(fd, cpus, BATCH_CHUNK, |keys, values| {
                let chunk = keys
                    .iter()
                    .zip(values.chunks_exact(cpus))
                    .map(|(k, per_cpu)| (key(*k), sum(per_cpu) + take_slots(&mut slots, k)))
                    .collect();
                // The receiver only goes away if the caller panicked; the rest is not needed then.
                let _ = send.send(chunk);
            });
            (read, slots)
        });
        let mut delivered = false;
        for chunk in receive {
            delivered = true;
            for (k, value) in chunk {
                each(k, value);
            }
        }
        let (read, slots) = reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (read, delivered, slots)
    });
    match read {
        Ok(()) => {}
        // The walk reads the whole map: only when nothing was handed out yet (the kernel refuses
        // batch operations on the first call), or entries would be handed out twice.
        Err(e) if !delivered && sys::bpf::batch_unsupported(&e) => return walk_map(map, slots, key, each),
        Err(e) => return Err(e).context("reading a counter map"),
    }
    // Slots of keys the map no longer has (a reset interrupted between clearing them and deleting
    // the keys; and a port slot, which counts without an entry): still counted.
    for (k, value) in slots.drain() {
        each(key(k), value);
    }
    Ok(())
}

/// `read_map`, one lookup per key.
fn walk_map<K: Pod + Eq + Hash>(
    map: &CounterMap<K>,
    mut slots: HashMap<K, Counters>,
    key: impl Fn(K) -> Key,
    each: &mut impl FnMut(Key, Counters),
) -> Result<()> {
    for entry in map.iter() {
        let (k, values) = entry.context("reading a counter map")?;
        each(key(k), sum(&values) + take_slots(&mut slots, &k));
    }
    for (k, value) in slots {
        each(key(k), value);
    }
    Ok(())
}

/// `map` as the typed map `T`, or an error naming it.
fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(map: Map, name: &str) -> Result<T> {
    T::try_from(map).with_context(|| format!("map {name} has another type"))
}

/// What `slots` holds for `key` (taken out of it): nothing once the map is empty, without hashing.
fn take_slots<K: Eq + Hash>(slots: &mut HashMap<K, Counters>, key: &K) -> Counters {
    if slots.is_empty() {
        return Counters::default();
    }
    slots.remove(key).unwrap_or_default()
}

/// Hands every slot of every CPU of a per-CPU array of slots to `each` with its index: one
/// `BPF_MAP_LOOKUP_BATCH` for the whole array, or one lookup per index where the kernel has no
/// batch operations on arrays.
fn read_slots<S: Pod>(slots: &PerCpuArray<MapData, S>, mut each: impl FnMut(u32, &S)) -> Result<()> {
    let cpus = possible_cpus()?;
    let mut seen = false;
    let batched = sys::bpf::lookup_batch::<u32, S>(
        slots.map().fd().as_fd(),
        cpus,
        slots.len() as usize,
        |indexes, values| {
            for (index, per_cpu) in indexes.iter().zip(values.chunks_exact(cpus)) {
                per_cpu.iter().for_each(|slot| each(*index, slot));
            }
            seen = true;
        },
    );
    match batched {
        Ok(()) => return Ok(()),
        Err(e) if !seen && sys::bpf::batch_unsupported(&e) => {}
        Err(e) => return Err(e).context("reading slots"),
    }
    for index in 0..slots.len() {
        for slot in slots.get(&index, 0).context("reading slots")?.iter() {
            each(index, slot);
        }
    }
    Ok(())
}

/// The keys that own a slot of a front cache on some CPU.
fn front_owners(front: &PerCpuArray<MapData, FrontSlot>) -> Result<HashSet<CounterKey>> {
    let mut owners = HashSet::new();
    read_slots(front, |_, slot| {
        if slot.owned != 0 {
            owners.insert(slot.key);
        }
    })?;
    Ok(owners)
}

/// Clears (zeroes, on every CPU) the slots `clear` selects of a per-CPU array of slots: found in
/// one batch read, each index that has one written back.
fn clear_slots<S: Pod + Default>(slots: &mut PerCpuArray<MapData, S>, clear: impl Fn(u32, &S) -> bool) -> Result<()> {
    let mut indexes = std::collections::BTreeSet::new();
    read_slots(slots, |index, slot| {
        if clear(index, slot) {
            indexes.insert(index);
        }
    })?;
    for index in indexes {
        let mut values: Vec<S> = slots.get(&index, 0).context("reading slots")?.to_vec();
        let mut changed = false;
        for slot in &mut values {
            if clear(index, slot) {
                *slot = S::default();
                changed = true;
            }
        }
        if changed {
            slots
                .set(index, PerCpuValues::try_from(values)?, 0)
                .context("clearing a slot")?;
        }
    }
    Ok(())
}

/// What a front cache holds: every owned slot of every CPU as (key, counts), a key once per CPU
/// at most. A slot whose key does not belong there (a copy that raced a claim on a CPU that
/// reorders stores: see `FrontSlot`) is left out of this reading.
pub fn front_entries<T: std::borrow::Borrow<MapData>>(
    front: &PerCpuArray<T, FrontSlot>,
) -> Result<Vec<(CounterKey, Counters)>> {
    let mut out = vec![];
    let mut take = |index: u32, slot: &FrontSlot| {
        if slot.owned != 0 && belongs(index, &slot.key) {
            out.push((
                slot.key,
                Counters {
                    bytes: slot.bytes,
                    packets: slot.packets,
                },
            ));
        }
    };
    let cpus = possible_cpus()?;
    let mut seen = false;
    let batched = sys::bpf::lookup_batch::<u32, FrontSlot>(
        front.map().fd().as_fd(),
        cpus,
        front.len() as usize,
        |indexes, slots| {
            for (index, per_cpu) in indexes.iter().zip(slots.chunks_exact(cpus)) {
                per_cpu.iter().for_each(|slot| take(*index, slot));
            }
            seen = true;
        },
    );
    match batched {
        Ok(()) => return Ok(out),
        Err(e) if !seen && sys::bpf::batch_unsupported(&e) => {}
        Err(e) => return Err(e).context("reading a front cache"),
    }
    for index in 0..front.len() {
        for slot in front.get(&index, 0).context("reading a front cache")?.iter() {
            take(index, slot);
        }
    }
    Ok(out)
}

/// Whether `key` can own slot `index` of the per-IP map's front cache: its hashed slot, or its
/// direction's overflow slot.
fn belongs(index: u32, key: &CounterKey) -> bool {
    if index < FRONT_SLOTS {
        front_index(key) == index
    } else {
        Direction::ALL
            .iter()
            .any(|&d| index == overflow_slot(d) && *key == CounterKey::overflow(d))
    }
}

/// Sorts entries by key and sums those with the same key into one. A stable sort: it finds an
/// already sorted prefix and merges into it instead of sorting it again.
pub fn sum_sorted<K: Ord + Copy>(entries: &mut Vec<(K, Counters)>) {
    entries.sort_by_key(|(k, _)| *k);
    entries.dedup_by(|(k2, v2), (k1, v1)| {
        let same = k1 == k2;
        if same {
            *v1 += *v2;
        }
        same
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_holds_only_a_key_that_belongs_there() {
        let key = CounterKey::with_octets(
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            443,
            6,
            Direction::Ingress,
        );
        let index = front_index(&key);
        assert!(belongs(index, &key));
        assert!(!belongs((index + 1) % FRONT_SLOTS, &key));
        assert!(!belongs(overflow_slot(Direction::Ingress), &key));
        for d in Direction::ALL {
            assert!(belongs(overflow_slot(d), &CounterKey::overflow(d)));
        }
        assert!(!belongs(
            overflow_slot(Direction::Egress),
            &CounterKey::overflow(Direction::Ingress)
        ));
    }

    #[test]
    fn keys_round_trip_through_their_tier_keys() {
        let ip = Key::ip(
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 7],
            443,
            6,
            Direction::Egress,
        );
        for key in [ip, Key::overflow(Direction::Ingress), Key::overflow(Direction::Egress)] {
            assert_eq!(Key::from(key.counter_key()), key);
        }
        assert!(Key::overflow(Direction::Egress).counter_key().is_overflow());
        assert!(!ip.is_overflow());
        for (text, tier) in [("198.51.100.0/24", Tier::Prefix), ("2001:db8::/32", Tier::WidePrefix)] {
            let prefix = Key {
                remote: Remote::Prefix(text.parse().unwrap()),
                port: 9000,
                proto: 17,
                direction: Direction::Ingress,
            };
            assert_eq!(prefix.tier(), Some(tier));
            assert_eq!(Key::of_tier(tier, prefix.counter_key()), prefix);
        }
        let port = Key::any_remote(PortKey::new(9001, 17, Direction::Egress));
        assert_eq!(port.tier(), Some(Tier::Port));
        assert_eq!(Key::of_tier(Tier::Port, port.counter_key()), port);
    }

    fn v4(i: u32, port: u16, direction: Direction) -> CounterKey {
        CounterKey::with_octets(
            std::net::Ipv4Addr::from(0xc612_0000 + i).to_ipv6_mapped().octets(),
            port,
            17,
            direction,
        )
    }

    /// The filter byte userspace marks for a per-IP key (`filter_index`) is the one the program
    /// reads: `ip_filter_index` of the register's hash, IPv4 in one round (`source_hash_fast`).
    #[test]
    fn a_per_ip_filter_byte_is_the_programs() {
        use portwatch_common::{ip_filter_index, source_hash_fast, source_seed_v4};
        for seed in [0, 1, 0x5eed_1234, u32::MAX] {
            let v6 = CounterKey::with_octets(
                "2001:db8:f100::1234".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                443,
                6,
                Direction::Egress,
            );
            for key in [v4(7, 443, Direction::Ingress), v6] {
                let program = ip_filter_index(&key, source_hash_fast(&key.remote_ip, seed, source_seed_v4(seed)));
                assert_eq!(filter_index(&key, Tier::Ip, seed), program);
            }
        }
    }

    /// Sequential sources, and one source over many ports and both directions, land on as many
    /// distinct bytes as random ones would (a clustered filter sends a flood's new sources to
    /// lookups): within 2% of m(1 - e^(-n/m)).
    #[test]
    fn per_ip_filter_bytes_spread_like_random_ones() {
        let m: u32 = 1 << 20;
        let distinct = |keys: &mut dyn Iterator<Item = CounterKey>, seed: u32| -> (usize, f64) {
            let mut seen = HashSet::new();
            let mut n = 0u32;
            for key in keys {
                seen.insert(filter_index(&key, Tier::Ip, seed) & (m - 1));
                n += 1;
            }
            let expected = f64::from(m) * (1.0 - (-f64::from(n) / f64::from(m)).exp());
            (seen.len(), expected)
        };
        for seed in [0, 0x5eed_1234, 0xdead_beef] {
            let (got, expected) = distinct(&mut (0..65536).map(|i| v4(i, 443, Direction::Ingress)), seed);
            assert!(
                got as f64 > 0.98 * expected,
                "sequential IPv4: {got} bytes, {expected:.0} expected"
            );
            let (got, expected) = distinct(
                &mut (0..65536u32).map(|i| {
                    let mut octets = "2001:db8:f100::".parse::<std::net::Ipv6Addr>().unwrap().octets();
                    octets[12..].copy_from_slice(&i.to_be_bytes());
                    CounterKey::with_octets(octets, 443, 17, Direction::Ingress)
                }),
                seed,
            );
            assert!(
                got as f64 > 0.98 * expected,
                "sequential IPv6: {got} bytes, {expected:.0} expected"
            );
            let (got, expected) = distinct(
                &mut (1..=32768u16).flat_map(|port| Direction::ALL.into_iter().map(move |d| v4(7, port, d))),
                seed,
            );
            assert!(
                got as f64 > 0.98 * expected,
                "one source, many ports: {got} bytes, {expected:.0} expected"
            );
        }
    }
}
