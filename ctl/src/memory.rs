//! The kernel memory portwatch's maps take: estimated before a first load from the object's map
//! definitions (`object::map_definitions`), as the kernel charges it; the guard that refuses a
//! load past a share of the machine's memory; and what the pinned maps take, read back from the
//! kernel. docs/memory.md is the operator's side of this file.
//!
//! The kernel's figure is each map type's `map_mem_usage` (kernel/bpf/hashtab.c
//! `htab_map_mem_usage`, kernel/bpf/arraymap.c `array_map_mem_usage`, since 6.4), which it prints
//! as `memlock:` in /proc/PID/fdinfo/FD of a map's fd and bpftool prints as `memlock`. Map memory
//! is kernel memory: never swapped, charged to the loader's memory cgroup, and held until the
//! last unload. Kernels before 6.4 print a rougher `memlock` (keys and values only, in pages):
//! the estimate still counts what their maps allocate.

use std::{
    fmt,
    os::fd::{AsFd, AsRawFd},
};

use anyhow::{Context, Result};
use aya::maps::MapData;
use aya_obj::generated::{
    bpf_map_type::{self, *},
    BPF_F_MMAPABLE, BPF_F_NO_PREALLOC,
};
use portwatch_common::{map_names, TierSizes};
use serde::Serialize;

use crate::{
    error::Error,
    object::{self, MapDefinition},
    output::{human_bytes, thousands},
    pinned::PinPath,
};

/// Bytes of kernel memory that maps take, as the kernel counts them (`memlock`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct MapMemory(pub u64);

impl fmt::Display for MapMemory {
    /// `412.3 MiB of kernel memory (432,345,088 bytes)`.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{} of kernel memory ({} bytes)",
            human_bytes(self.0),
            thousands(self.0)
        )
    }
}

impl std::iter::Sum for MapMemory {
    fn sum<I: Iterator<Item = MapMemory>>(iter: I) -> MapMemory {
        MapMemory(iter.map(|m| m.0).sum())
    }
}

// The kernel structures a map's figure counts, on 64-bit machines (x86-64, arm64) as Debian builds
// them (no lockdep, no spinlock debugging). The headers (`struct bpf_htab`, `struct bpf_array`) are
// a few hundred bytes per map and vary with the kernel's configuration: what they are on 6.18.
/// `sizeof(struct htab_elem)`: the hash node, the per-CPU pointer or LRU node, the hash.
const HTAB_ELEM: u64 = 48;
/// `sizeof(struct bucket)`: a list head and its lock.
const BUCKET: u64 = 16;
/// `sizeof(struct bpf_htab)`.
const HTAB_HEADER: u64 = 896;
/// `sizeof(struct bpf_array)`.
const ARRAY_HEADER: u64 = 312;
const POINTER: u64 = 8;

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// What the kernel charges for `map` just after it is created (a non-preallocated hash map holds
/// no element yet), with `cpus` possible CPUs and pages of `page` bytes; `None` for a map type
/// portwatch has no model of (a new one needs its kernel function read first).
fn created_map(map: &MapDefinition, cpus: u64, page: u64) -> Option<u64> {
    let entries = u64::from(map.max_entries);
    let key = round_up(u64::from(map.key_size), 8);
    let value = round_up(u64::from(map.value_size), 8);
    let map_type = map.map_type;
    let is = |t: bpf_map_type| map_type == t as u32;
    if is(BPF_MAP_TYPE_HASH)
        || is(BPF_MAP_TYPE_PERCPU_HASH)
        || is(BPF_MAP_TYPE_LRU_HASH)
        || is(BPF_MAP_TYPE_LRU_PERCPU_HASH)
    {
        // htab_map_mem_usage.
        let percpu = is(BPF_MAP_TYPE_PERCPU_HASH) || is(BPF_MAP_TYPE_LRU_PERCPU_HASH);
        let lru = is(BPF_MAP_TYPE_LRU_HASH) || is(BPF_MAP_TYPE_LRU_PERCPU_HASH);
        let elem = HTAB_ELEM + key + if percpu { POINTER } else { value };
        let mut usage = HTAB_HEADER + BUCKET * entries.next_power_of_two();
        if map.flags & BPF_F_NO_PREALLOC == 0 {
            // A plain hash map keeps one spare element per CPU for updates in place.
            let elements = entries + if percpu || lru { 0 } else { cpus };
            usage += elem * elements;
            if percpu {
                usage += value * cpus * elements;
            } else if !lru {
                usage += POINTER * cpus;
            }
        }
        Some(usage)
    } else if is(BPF_MAP_TYPE_PERCPU_ARRAY) {
        // array_map_mem_usage, as the two below.
        Some(ARRAY_HEADER + entries * POINTER + entries * value * cpus)
    } else if is(BPF_MAP_TYPE_ARRAY) && map.flags & BPF_F_MMAPABLE != 0 {
        Some(round_up(ARRAY_HEADER, page) + round_up(entries * value, page))
    } else if is(BPF_MAP_TYPE_ARRAY) || is(BPF_MAP_TYPE_ARRAY_OF_MAPS) {
        // An ARRAY_OF_MAPS holds a map pointer per slot: 8 bytes, as its 4-byte value rounds to.
        Some(ARRAY_HEADER + entries * value)
    } else {
        None
    }
}

/// What a first load with `sizes` makes the kernel charge for the maps it pins, computed from the
/// object, before anything is created.
fn estimate(sizes: TierSizes) -> Result<MapMemory> {
    let cpus = crate::generation::possible_cpus()? as u64;
    let page = crate::sys::page_size();
    let mut maps = object::map_definitions(sizes)?;
    let (map_type, key_size, value_size, max_entries) = crate::sys::bpf::BARRIER;
    maps.push(MapDefinition {
        name: map_names::BARRIER,
        map_type: map_type as u32,
        key_size,
        value_size,
        max_entries,
        flags: 0,
    });
    maps.iter()
        .map(|m| {
            created_map(m, cpus, page).map(MapMemory).with_context(|| {
                format!(
                    "map {} is of type {}, whose kernel memory memory.rs does not model",
                    m.name, m.map_type
                )
            })
        })
        .sum()
}

/// How much of the machine's memory a first load may ask for before it needs `--force`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// A percentage of MemTotal (/proc/meminfo).
    Share(u8),
    Bytes(u64),
}

impl Limit {
    /// A tenth of the machine's memory: far above what the default sizes take (tens of MiB), and
    /// far below what would starve the machine, since map memory is never swapped out nor given
    /// back before `unload`. A map past it is far more often an extra zero than a plan.
    pub const DEFAULT: Limit = Limit::Share(10);

    fn bytes(self, mem_total: u64) -> u64 {
        match self {
            Limit::Share(percent) => mem_total / 100 * u64::from(percent),
            Limit::Bytes(bytes) => bytes,
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Limit::Share(percent) => write!(f, "{percent}%"),
            Limit::Bytes(bytes) => write!(f, "{}", human_bytes(*bytes)),
        }
    }
}

/// What a first load may take before it is refused: `--memory-limit` and `--force`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guard {
    pub limit: Limit,
    /// Load whatever the maps take.
    pub force: bool,
}

impl Default for Guard {
    fn default() -> Guard {
        Guard {
            limit: Limit::DEFAULT,
            force: false,
        }
    }
}

/// MemTotal of /proc/meminfo, in bytes.
fn mem_total() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no MemTotal in /proc/meminfo")
}

/// What the maps of a first load with `sizes` would take (`estimate`), refused (exit code 2) past
/// the guard's limit unless it is forced; `fewer` says how to ask for fewer entries.
pub(crate) fn weigh(sizes: TierSizes, guard: Guard, fewer: &str) -> Result<MapMemory> {
    let maps = estimate(sizes)?;
    check(maps, guard, fewer)?;
    Ok(maps)
}

fn check(estimate: MapMemory, guard: Guard, fewer: &str) -> Result<()> {
    if guard.force {
        return Ok(());
    }
    let limit = guard.limit;
    let total = mem_total()?;
    let allowed = limit.bytes(total);
    if estimate.0 <= allowed {
        return Ok(());
    }
    let of_what = match limit {
        Limit::Share(percent) => format!(
            "{percent}% of this machine's memory ({} of {})",
            human_bytes(allowed),
            human_bytes(total)
        ),
        Limit::Bytes(_) => format!("the --memory-limit of {}", human_bytes(allowed)),
    };
    Err(Error::TooMuchMemory(format!(
        "the maps would take {estimate}, more than {of_what}; {fewer}, or pass --force to load them anyway \
         (docs/memory.md)"
    ))
    .into())
}

/// What the kernel charges for every map pinned at `pin` (`memlock` of each map's fdinfo, the
/// figure `bpftool map show` prints), summed. A map that is not pinned counts nothing.
pub(crate) fn pinned(pin: &PinPath) -> Result<MapMemory> {
    map_names::ALL
        .into_iter()
        .chain([map_names::BARRIER])
        .map(|name| pin.map(name))
        .filter(|path| path.exists())
        .map(|path| {
            let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            memlock(map.fd().as_fd().as_raw_fd()).with_context(|| format!("the kernel memory of {}", path.display()))
        })
        .sum()
}

/// The `memlock:` line of /proc/self/fdinfo/`fd` (a map's fd).
fn memlock(fd: i32) -> Result<MapMemory> {
    let path = format!("/proc/self/fdinfo/{fd}");
    let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    info.lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|bytes| bytes.trim().parse().ok())
        .map(MapMemory)
        .with_context(|| format!("no memlock line in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(map_type: bpf_map_type, key_size: u32, value_size: u32, max_entries: u32, flags: u32) -> MapDefinition {
        MapDefinition {
            name: "m",
            map_type: map_type as u32,
            key_size,
            value_size,
            max_entries,
            flags,
        }
    }

    #[test]
    fn a_preallocated_per_cpu_hash_counts_each_element_its_values_and_the_buckets() {
        // 65,538 entries: 131,072 buckets; each element 48 + 24 (key) + 8 (pointer), and 16 bytes
        // of value on each of 2 CPUs.
        let m = map(BPF_MAP_TYPE_PERCPU_HASH, 20, 16, 65538, 0);
        assert_eq!(
            created_map(&m, 2, 4096).unwrap(),
            HTAB_HEADER + 16 * 131_072 + 65_538 * (80 + 32)
        );
    }

    #[test]
    fn a_non_preallocated_hash_counts_its_buckets_only_while_empty() {
        let m = map(BPF_MAP_TYPE_HASH, 24, 16, 1000, BPF_F_NO_PREALLOC);
        assert_eq!(created_map(&m, 4, 4096).unwrap(), HTAB_HEADER + 16 * 1024);
    }

    #[test]
    fn arrays_count_per_cpu_copies_and_mmapable_pages() {
        let per_cpu = map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 40, 1026, 0);
        assert_eq!(
            created_map(&per_cpu, 2, 4096).unwrap(),
            ARRAY_HEADER + 1026 * 8 + 1026 * 40 * 2
        );
        let mmapable = map(BPF_MAP_TYPE_ARRAY, 4, 8, 10, BPF_F_MMAPABLE);
        assert_eq!(created_map(&mmapable, 2, 4096).unwrap(), 4096 + 4096);
        let plain = map(BPF_MAP_TYPE_ARRAY, 4, 1, 65536, 0);
        assert_eq!(created_map(&plain, 2, 4096).unwrap(), ARRAY_HEADER + 65536 * 8);
    }

    #[test]
    fn every_map_of_the_object_has_a_model_and_no_other_type_is_guessed() {
        use portwatch_common::DEFAULT_MAX_ENTRIES;
        let sizes = TierSizes::derived(DEFAULT_MAX_ENTRIES);
        for m in object::map_definitions(sizes).unwrap() {
            assert!(created_map(&m, 2, 4096).is_some(), "{m:?}");
        }
        assert!(estimate(sizes).is_ok());
        assert_eq!(created_map(&map(BPF_MAP_TYPE_LPM_TRIE, 8, 8, 100, 1), 2, 4096), None);
    }

    #[test]
    fn the_figure_reads_in_units_and_exact_bytes() {
        assert_eq!(
            MapMemory(432_345_088).to_string(),
            "412.3 MiB of kernel memory (432,345,088 bytes)"
        );
    }
}
