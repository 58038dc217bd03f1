//! Typed access to portwatch's maps, whether owned by a fresh `Ebpf` or reopened from pins.

use std::{
    borrow::{Borrow, BorrowMut},
    collections::BTreeMap,
    os::fd::AsFd,
};

use anyhow::{Context, Result};
use aya::maps::{Array, IterableMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use portwatch_common::{
    front_index, overflow_slot, CounterKey, Counters, Direction, FrontSlot, Stats, FRONT_SLOTS, PORT_COUNT,
};

use crate::pinned::Pinned;

/// `BPF_NOEXIST` from `linux/bpf.h`: create only.
const BPF_NOEXIST: u64 = 1;

/// Inserts the overflow keys (one per direction) with zero counts, unless present. The kernel
/// program relies on them to account for traffic that finds the counter map full, so they must
/// exist before the program runs and after every drain.
pub fn ensure_overflow_keys<T: BorrowMut<MapData>>(
    counters: &mut PerCpuHashMap<T, CounterKey, Counters>,
) -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    for direction in Direction::ALL {
        let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])?;
        match counters.insert(CounterKey::overflow(direction), zero, BPF_NOEXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).context("inserting the overflow key into a counter map"),
        }
    }
    Ok(())
}

/// All counters of one generation, summed over CPUs.
pub fn read_counters<T: Borrow<MapData>>(
    counters: &PerCpuHashMap<T, CounterKey, Counters>,
) -> Result<BTreeMap<CounterKey, Counters>> {
    let mut out = BTreeMap::new();
    for entry in counters.iter() {
        let (key, values) = entry.context("reading a counter map")?;
        out.insert(key, sum(&values));
    }
    Ok(out)
}

/// What a front cache holds: every owned slot of every CPU as (key, counts), a key once per CPU
/// at most. One `BPF_MAP_LOOKUP_BATCH` for the whole cache (the slots of every CPU), or one lookup
/// per slot where the kernel has no batch operations on arrays. A slot whose key does not belong
/// there (a copy that raced a claim on a CPU that reorders stores: see `FrontSlot`) is left out of
/// this reading.
pub fn front_entries<T: Borrow<MapData>>(front: &PerCpuArray<T, FrontSlot>) -> Result<Vec<(CounterKey, Counters)>> {
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
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let size = std::mem::size_of::<FrontSlot>();
    let mut seen = 0;
    let batched = crate::sys::bpf::lookup_batch(
        front.map().fd().as_fd(),
        std::mem::size_of::<u32>(),
        size * cpus,
        front.len() as usize,
        |keys, values, n| {
            for i in 0..n {
                let index = u32::from_ne_bytes(keys[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
                for cpu in 0..cpus {
                    let at = (i * cpus + cpu) * size;
                    // SAFETY: FrontSlot is plain integers (Pod); whole values as the kernel wrote
                    // them (40 bytes, a multiple of 8: no rounding between CPUs), read unaligned.
                    take(index, &unsafe {
                        std::ptr::read_unaligned::<FrontSlot>(values[at..].as_ptr().cast())
                    });
                }
            }
            seen += n;
        },
    );
    match batched {
        Ok(()) => return Ok(out),
        Err(e) if seen == 0 && crate::sys::bpf::batch_unsupported(&e) => {}
        Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH on a front cache"),
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

/// Clears every slot (on every CPU) of a front cache whose key `clear` selects; returns how many.
/// Only for an idle generation's cache: the program must not write it meanwhile.
pub fn clear_front<T: BorrowMut<MapData>>(
    front: &mut PerCpuArray<T, FrontSlot>,
    clear: impl Fn(&CounterKey) -> bool,
) -> Result<usize> {
    let mut cleared = 0;
    for index in 0..front.len() {
        let mut slots: Vec<FrontSlot> = front.get(&index, 0).context("reading a front cache")?.to_vec();
        let mut changed = false;
        for slot in &mut slots {
            if slot.owned != 0 && clear(&slot.key) {
                *slot = FrontSlot::default();
                changed = true;
                cleared += 1;
            }
        }
        if changed {
            front
                .set(index, PerCpuValues::try_from(slots)?, 0)
                .context("clearing a front cache slot")?;
        }
    }
    Ok(cleared)
}

/// Clears generation `generation`'s "map full" hint on every CPU (after removing entries from it;
/// harmless when it is still full: the next insert that fails sets it again).
pub fn clear_full_hint<T: BorrowMut<MapData>>(hint: &mut PerCpuArray<T, u32>, generation: u32) -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    hint.set(generation & 1, PerCpuValues::try_from(vec![0u32; cpus])?, 0)
        .context("clearing the map-full hint")
}

/// A generation's counters with its front cache added: each key's hash entry plus what its slots
/// hold.
pub fn with_front(
    mut counters: BTreeMap<CounterKey, Counters>,
    front: Vec<(CounterKey, Counters)>,
) -> BTreeMap<CounterKey, Counters> {
    for (key, value) in front {
        *counters.entry(key).or_default() += value;
    }
    counters
}

/// The sum of per-CPU values.
pub fn sum<V: Copy + Default + std::ops::AddAssign>(values: &[V]) -> V {
    values.iter().fold(V::default(), |mut acc, v| {
        acc += *v;
        acc
    })
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

/// The global statistics, summed over CPUs.
pub fn read_stats<T: Borrow<MapData>>(stats: &PerCpuArray<T, Stats>) -> Result<Stats> {
    Ok(sum(&stats.get(&0, 0).context("reading the stats map")?))
}

/// Sets the protocol flags (`PROTO_TCP | PROTO_UDP`, or 0) of one port; the next packet sees it.
pub fn set_port<T: BorrowMut<MapData>>(ports: &mut Array<T, u8>, port: u16, flags: u8) -> Result<()> {
    ports
        .set(port as u32, flags, 0)
        .with_context(|| format!("writing port {port} to the port map"))
}

/// The whole port map: the flags of every port, indexed by port number.
///
/// One `BPF_MAP_LOOKUP_BATCH` for the 65,536 entries where the kernel has batch operations on
/// arrays (5.6 and later), else one lookup per port (65,536 syscalls: about 60 ms).
pub fn port_table<T: Borrow<MapData>>(ports: &Array<T, u8>) -> Result<Vec<u8>> {
    let mut table = vec![0u8; PORT_COUNT as usize];
    let mut filled = 0usize;
    let batched = crate::sys::bpf::lookup_batch(
        ports.map().fd().as_fd(),
        std::mem::size_of::<u32>(),
        1,
        PORT_COUNT as usize,
        |keys, values, n| {
            for i in 0..n {
                let port = u32::from_ne_bytes(keys[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
                if let Some(slot) = table.get_mut(port as usize) {
                    *slot = values[i];
                    filled += 1;
                }
            }
        },
    );
    match batched {
        Ok(()) if filled == PORT_COUNT as usize => return Ok(table),
        Ok(()) => {}
        Err(e) if crate::sys::bpf::batch_unsupported(&e) => {}
        Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH on the port map"),
    }
    for (port, flags) in ports.iter().enumerate() {
        table[port] = flags.context("reading the port map")?;
    }
    Ok(table)
}

/// Writes the ports whose flags differ between `before` (the map's content) and `after`; returns
/// how many it wrote.
pub fn write_port_changes<T: BorrowMut<MapData>>(
    ports: &mut Array<T, u8>,
    before: &[u8],
    after: &[u8],
) -> Result<usize> {
    let mut changed = 0;
    for (port, (&old, &new)) in before.iter().zip(after).enumerate() {
        if old != new {
            set_port(ports, port as u16, new)?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// Entries per batch syscall when reading a counter map.
const BATCH_CHUNK: usize = 16384;

/// Every entry of one counter generation (overflow keys included), summed over CPUs, with what its
/// front cache holds for the key added, handed to `each` once per key: one `BPF_MAP_LOOKUP_BATCH`
/// per 16384 entries, or a key-at-a-time walk where the kernel has no batch operations for the map.
/// Holds a few chunks at a time, not the map.
///
/// The front cache is read first: a slot claimed after that read holds packets counted after it
/// (the key's hash entry does not lose them), so each key's total only grows from one read to the
/// next, as with the hash alone.
///
/// The kernel's copy-out and `each` (grouping a million keys) both take a good part of a pass: a
/// reader thread makes the syscalls and decodes while the calling thread runs `each`, so on two
/// cores a pass takes the longer of the two rather than their sum.
pub fn for_each_in_generation(
    pinned: &mut Pinned,
    generation: u32,
    mut each: impl FnMut(CounterKey, Counters),
) -> Result<()> {
    let mut front: std::collections::HashMap<CounterKey, Counters> = std::collections::HashMap::new();
    for (key, value) in front_entries(pinned.front(generation)?)? {
        *front.entry(key).or_default() += value;
    }
    let front = std::cell::RefCell::new(front);
    let mut each = |key: CounterKey, mut value: Counters| {
        if let Some(cached) = front.borrow_mut().remove(&key) {
            value += cached;
        }
        each(key, value)
    };
    let counters = pinned.counters(generation)?;
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let key_size = std::mem::size_of::<CounterKey>();
    // Per-CPU values come as one 8-byte-aligned slot per possible CPU.
    let slot = std::mem::size_of::<Counters>().next_multiple_of(8);
    let decode = |keys: &[u8], values: &[u8], n: usize| -> Vec<(CounterKey, Counters)> {
        (0..n)
            .map(|i| {
                // SAFETY: CounterKey and Counters are plain integers (Pod); the buffers hold whole
                // entries as the kernel wrote them, read unaligned.
                let key: CounterKey = unsafe { std::ptr::read_unaligned(keys[i * key_size..].as_ptr().cast()) };
                let mut total = Counters::default();
                for cpu in 0..cpus {
                    let at = (i * cpus + cpu) * slot;
                    total += unsafe { std::ptr::read_unaligned::<Counters>(values[at..].as_ptr().cast()) };
                }
                (key, total)
            })
            .collect()
    };
    let fd = counters.map().fd().as_fd();
    let batched = std::thread::scope(|scope| {
        let (send, receive) = std::sync::mpsc::sync_channel::<Vec<(CounterKey, Counters)>>(4);
        let reader = scope.spawn(move || {
            crate::sys::bpf::lookup_batch(fd, key_size, slot * cpus, BATCH_CHUNK, |k, v, n| {
                // The receiver only goes away if the caller panicked; the rest is not needed then.
                let _ = send.send(decode(k, v, n));
            })
        });
        let mut delivered = false;
        for chunk in receive {
            delivered = true;
            for (key, value) in chunk {
                each(key, value);
            }
        }
        let result = reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (result, delivered)
    });
    match batched {
        (Ok(()), _) => {}
        // The fallback reads the whole map: only when nothing was handed out yet (the kernel
        // refuses batch operations on the first call), or entries would be handed out twice.
        (Err(e), false) if crate::sys::bpf::batch_unsupported(&e) => {
            for (key, value) in read_counters(counters)? {
                each(key, value);
            }
        }
        (Err(e), _) => return Err(e).context("BPF_MAP_LOOKUP_BATCH on a counter map"),
    }
    // Slots of keys the hash no longer has (a reset interrupted between clearing them and
    // deleting the keys, never in normal operation): still counted.
    for (key, value) in front.take() {
        each(key, value);
    }
    Ok(())
}

/// Every entry of one counter generation, collected.
pub fn read_generation(pinned: &mut Pinned, generation: u32) -> Result<Vec<(CounterKey, Counters)>> {
    let mut out = Vec::new();
    for_each_in_generation(pinned, generation, |k, v| out.push((k, v)))?;
    Ok(out)
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
}
