//! One counter generation: everything the kernel program counts into while `config.generation`
//! names it, behind one handle. Its counter sources today are the per-IP hash (`counters_<g>`,
//! which holds the overflow keys too), the front cache (`front_<g>`) and the "map full" hint
//! (`map_full[g]`); readers see their entries merged under a `Key`, and the reset removes and
//! writes entries through it. A new counter map of a generation is added here, and only here
//! (CONTRIBUTING.md, "Adding a counter source").
//!
//! The program writes the generation that `config.generation` names, in place; userspace changes
//! only the idle one (`remove`, `set`, `clear_full_hint` say so), after the reset has flipped
//! `config.generation` away from it and waited for running programs (`reset`).

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd,
};

use anyhow::{Context, Result};
use aya::maps::{IterableMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use portwatch_common::{
    counters_map, front_index, front_map, map_names, overflow_slot, CounterKey, Counters, Direction, FrontSlot,
    PortKey, FRONT_SLOTS,
};

use crate::{fault, sys};

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

/// The remote side of a count: a counter source of a generation adds a variant here (a prefix of
/// remotes, say), not a parallel path through every reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Remote {
    /// One remote address: 16 bytes in network order, IPv4 mapped (`::ffff:a.b.c.d`).
    Ip([u8; 16]),
    /// Traffic that found the per-IP map full (the overflow key): no remote, port or protocol.
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

    pub fn is_overflow(&self) -> bool {
        self.remote == Remote::Overflow
    }

    /// Its port, protocol and direction.
    pub const fn port_key(&self) -> PortKey {
        PortKey::new(self.port, self.proto, self.direction)
    }

    /// The key of its entry in the per-IP hash (the overflow key for `Overflow`).
    pub fn counter_key(&self) -> CounterKey {
        match self.remote {
            Remote::Ip(ip) => CounterKey::with_octets(ip, self.port, self.proto, self.direction),
            Remote::Overflow => CounterKey::overflow(self.direction),
        }
    }
}

impl From<CounterKey> for Key {
    fn from(key: CounterKey) -> Key {
        if key.is_overflow() {
            Key::overflow(key.direction())
        } else {
            Key::ip(key.remote_ip_octets(), key.port, key.proto, key.direction())
        }
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
fn on_cpu_0<V: aya::Pod + Default>(value: V, cpus: usize) -> Result<PerCpuValues<V>> {
    let mut values = vec![V::default(); cpus];
    values[0] = value;
    Ok(PerCpuValues::try_from(values)?)
}

/// A counter generation's maps, opened.
pub struct Generation {
    /// 0 or 1: which generation `config.generation` must name for the program to write this one.
    index: u32,
    /// `counters_<g>`: a key's entry, per CPU; the two overflow keys are entries too.
    counters: PerCpuHashMap<MapData, CounterKey, Counters>,
    /// `front_<g>`: slots a key owns on a CPU once it has an entry (see `FrontSlot`).
    front: PerCpuArray<MapData, FrontSlot>,
    /// `map_full`, one element per generation: this one's is `index`.
    map_full: PerCpuArray<MapData, u32>,
}

impl Generation {
    /// Both generations, each map opened by `open` (given its name: from its pin, or from a loaded
    /// object) and checked to have its type. A map the two share (`map_full`) is opened once and
    /// held by both.
    pub fn open_both(mut open: impl FnMut(&str) -> Result<Map>) -> Result<[Generation; 2]> {
        let map_full: PerCpuArray<MapData, u32> = typed(open(map_names::MAP_FULL)?, map_names::MAP_FULL)?;
        let again = map_full
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("another handle on the map_full map")?;
        let map_full_again = typed(Map::from_map_data(MapData::from_fd(again)?)?, map_names::MAP_FULL)?;
        let mut one = |index: u32, map_full| -> Result<Generation> {
            Ok(Generation {
                index,
                counters: typed(open(counters_map(index))?, counters_map(index))?,
                front: typed(open(front_map(index))?, front_map(index))?,
                map_full,
            })
        };
        Ok([one(0, map_full)?, one(1, map_full_again)?])
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// Inserts the overflow keys (one per direction) with zero counts, unless present. The kernel
    /// program relies on them to account for traffic that finds the counter map full, so they must
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

    /// Every count of this generation (overflow keys included), once per key, summed over CPUs:
    /// each key's hash entry with what its front-cache slots hold added. One
    /// `BPF_MAP_LOOKUP_BATCH` per 16384 entries, or a key-at-a-time walk where the kernel has no
    /// batch operations for the map. Holds a few chunks at a time, not the map.
    ///
    /// The front cache is read first: a slot claimed after that read holds packets counted after it
    /// (the key's hash entry does not lose them), so each key's total only grows from one read to
    /// the next, as with the hash alone.
    ///
    /// The kernel's copy-out and `each` (grouping a million keys) both take a good part of a pass: a
    /// reader thread makes the syscalls and decodes while the calling thread runs `each`, so on two
    /// cores a pass takes the longer of the two rather than their sum.
    pub fn for_each(&self, mut each: impl FnMut(Key, Counters)) -> Result<()> {
        let front = self.front_by_key()?;
        let cpus = possible_cpus()?;
        let fd = self.counters.map().fd().as_fd();
        let (read, delivered, mut front) = std::thread::scope(|scope| {
            let (send, receive) = std::sync::mpsc::sync_channel::<Vec<(Key, Counters)>>(4);
            let reader = scope.spawn(move || {
                let mut front = front;
                let read = sys::bpf::lookup_batch::<CounterKey, Counters>(fd, cpus, BATCH_CHUNK, |keys, values| {
                    let chunk = keys
                        .iter()
                        .zip(values.chunks_exact(cpus))
                        .map(|(key, per_cpu)| (Key::from(*key), sum(per_cpu) + take_slots(&mut front, key)))
                        .collect();
                    // The receiver only goes away if the caller panicked; the rest is not needed then.
                    let _ = send.send(chunk);
                });
                (read, front)
            });
            let mut delivered = false;
            for chunk in receive {
                delivered = true;
                for (key, value) in chunk {
                    each(key, value);
                }
            }
            let (read, front) = reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (read, delivered, front)
        });
        match read {
            Ok(()) => {}
            // The walk reads the whole map: only when nothing was handed out yet (the kernel
            // refuses batch operations on the first call), or entries would be handed out twice.
            Err(e) if !delivered && sys::bpf::batch_unsupported(&e) => self.walk(&mut front, &mut each)?,
            Err(e) => return Err(e).context("reading a counter map"),
        }
        // Slots of keys the hash no longer has (a reset interrupted between clearing them and
        // deleting the keys, never in normal operation): still counted.
        for (key, value) in front {
            each(Key::from(key), value);
        }
        Ok(())
    }

    /// `for_each` without the batch operations: one lookup per key, as on kernels that have none
    /// (public so that a test compares the two).
    pub fn for_each_key_by_key(&self, mut each: impl FnMut(Key, Counters)) -> Result<()> {
        let mut front = self.front_by_key()?;
        self.walk(&mut front, &mut each)?;
        for (key, value) in front {
            each(Key::from(key), value);
        }
        Ok(())
    }

    /// Every hash entry, one lookup per key, with its slots (taken out of `front`) added.
    fn walk(&self, front: &mut HashMap<CounterKey, Counters>, each: &mut impl FnMut(Key, Counters)) -> Result<()> {
        for entry in self.counters.iter() {
            let (key, values) = entry.context("reading a counter map")?;
            each(Key::from(key), sum(&values) + take_slots(front, &key));
        }
        Ok(())
    }

    /// Every count of this generation, collected (see `for_each`).
    pub fn read(&self) -> Result<Vec<(Key, Counters)>> {
        let mut out = Vec::new();
        self.for_each(|k, v| out.push((k, v)))?;
        Ok(out)
    }

    /// What the front cache holds, summed per key over slots and CPUs.
    fn front_by_key(&self) -> Result<HashMap<CounterKey, Counters>> {
        let mut by_key: HashMap<CounterKey, Counters> = HashMap::new();
        for (key, value) in front_entries(&self.front)? {
            *by_key.entry(key).or_default() += value;
        }
        Ok(by_key)
    }

    /// Removes `keys` from this generation: their front-cache slots first, then their hash entries
    /// (killed in between, the next read still finds the entries); an overflow key is zeroed
    /// instead (the program needs it). A key that is not there is skipped, so a removal repeated
    /// after a crash does the same. Then the map has room again: the "map full" hint is cleared.
    /// Only for the idle generation: the program must not write it meanwhile.
    pub fn remove(&mut self, keys: &[Key]) -> Result<()> {
        let removing: HashSet<CounterKey> = keys.iter().map(Key::counter_key).collect();
        self.clear_slots(|key| removing.contains(key))?;
        let (overflow, entries): (Vec<CounterKey>, Vec<CounterKey>) =
            removing.into_iter().partition(|k| k.is_overflow());
        let cpus = possible_cpus()?;
        for key in overflow {
            self.counters
                .insert(key, on_cpu_0(Counters::default(), cpus)?, 0)
                .context("zeroing an overflow key")?;
        }
        if !entries.is_empty() {
            fault::point("reset:delete-batch")
                .map_err(|io_error| sys::bpf::SyscallError {
                    call: "bpf_map_delete_batch",
                    io_error,
                })
                .and_then(|()| sys::bpf::remove_all_if_present(self.counters.map().fd().as_fd(), &entries))
                .context("removing counters")?;
        }
        self.clear_full_hint()
    }

    /// Writes `targets` into this generation, each key's whole count in its hash entry (its
    /// front-cache slots cleared first); a zero target removes the entry (an overflow key's is
    /// zeroed). Writing the same targets again gives the same result, so the reset's last step can
    /// be repeated after a crash. Only for the idle generation, like `remove`.
    pub fn set(&mut self, targets: &[(Key, Counters)]) -> Result<()> {
        let setting: HashSet<CounterKey> = targets.iter().map(|(k, _)| k.counter_key()).collect();
        self.clear_slots(|key| setting.contains(key))?;
        let (zero, written): (Vec<_>, Vec<_>) = targets
            .iter()
            .partition(|(key, value)| *value == Counters::default() && !key.is_overflow());
        let zero: Vec<CounterKey> = zero.iter().map(|(k, _)| k.counter_key()).collect();
        sys::bpf::remove_all_if_present(self.counters.map().fd().as_fd(), &zero)
            .context("removing a counter the record holds")?;
        let cpus = possible_cpus()?;
        let keys: Vec<CounterKey> = written.iter().map(|(k, _)| k.counter_key()).collect();
        let mut values = vec![Counters::default(); written.len() * cpus];
        for (i, (_, value)) in written.iter().enumerate() {
            values[i * cpus] = *value;
        }
        match sys::bpf::update_batch(self.counters.map().fd().as_fd(), &keys, &values) {
            Ok(()) => {}
            Err(e) if sys::bpf::batch_unsupported(&e) => {
                for (key, (_, value)) in keys.iter().zip(&written) {
                    self.counters
                        .insert(key, on_cpu_0(*value, cpus)?, 0)
                        .context("taking the record's share out of a counter")?;
                }
            }
            Err(e) => return Err(e).context("taking the record's share out of the counters"),
        }
        self.clear_full_hint()
    }

    /// Clears this generation's "map full" hint on every CPU (after removing entries from it;
    /// harmless when it is still full: the next insert that fails sets it again).
    pub fn clear_full_hint(&mut self) -> Result<()> {
        let cpus = possible_cpus()?;
        self.map_full
            .set(self.index, on_cpu_0(0u32, cpus)?, 0)
            .context("clearing the map-full hint")
    }

    /// Clears every front-cache slot (on every CPU) whose key `clear` selects.
    fn clear_slots(&mut self, clear: impl Fn(&CounterKey) -> bool) -> Result<()> {
        for index in 0..self.front.len() {
            let mut slots: Vec<FrontSlot> = self.front.get(&index, 0).context("reading a front cache")?.to_vec();
            let mut changed = false;
            for slot in &mut slots {
                if slot.owned != 0 && clear(&slot.key) {
                    *slot = FrontSlot::default();
                    changed = true;
                }
            }
            if changed {
                self.front
                    .set(index, PerCpuValues::try_from(slots)?, 0)
                    .context("clearing a front cache slot")?;
            }
        }
        Ok(())
    }

    /// The per-IP hash itself, for tests and benchmarks of the kernel program's maps (readers use
    /// `for_each`).
    pub fn hash(&self) -> &PerCpuHashMap<MapData, CounterKey, Counters> {
        &self.counters
    }

    /// The front cache's owned slots, every CPU (see `front_entries`), for tests of the cache.
    pub fn front_slots(&self) -> Result<Vec<(Key, Counters)>> {
        Ok(front_entries(&self.front)?
            .into_iter()
            .map(|(k, v)| (Key::from(k), v))
            .collect())
    }
}

/// `map` as the typed map `T`, or an error naming it.
fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(map: Map, name: &str) -> Result<T> {
    T::try_from(map).with_context(|| format!("map {name} has another type"))
}

/// What `front` holds for `key` (taken out of it): nothing once the map is empty, without hashing.
fn take_slots(front: &mut HashMap<CounterKey, Counters>, key: &CounterKey) -> Counters {
    if front.is_empty() {
        return Counters::default();
    }
    front.remove(key).unwrap_or_default()
}

/// What a front cache holds: every owned slot of every CPU as (key, counts), a key once per CPU
/// at most. One `BPF_MAP_LOOKUP_BATCH` for the whole cache (the slots of every CPU), or one lookup
/// per slot where the kernel has no batch operations on arrays. A slot whose key does not belong
/// there (a copy that raced a claim on a CPU that reorders stores: see `FrontSlot`) is left out of
/// this reading.
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

/// Whether `key` can own slot `index`: its hashed slot, or its direction's overflow slot.
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
    fn keys_round_trip_through_the_hash_key() {
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
    }
}
