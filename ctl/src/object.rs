//! The kernel program, built by `build.rs` from `ctl-ebpf` and embedded in the binary.

use anyhow::{Context, Result};
use aya::{maps::Array, programs::SchedClassifier, Ebpf, EbpfLoader};
use portwatch_common::{
    generation_maps, map_names, source_seed_v4, Config, Direction, TierSizes, DRAINED_ENTRIES, PORT_OVERFLOW_ENTRIES,
    RESERVED_ENTRIES,
};

/// The ELF object of `ctl-ebpf` (programs `portwatch_ingress` / `portwatch_egress`, maps in
/// `portwatch_common::map_names`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portwatch.bpf.o"));

/// Path of a do-nothing TC program built beside `OBJECT`, for benchmarks (not embedded).
#[doc(hidden)]
pub const NOOP_OBJECT_PATH: &str = concat!(env!("OUT_DIR"), "/noop.bpf.o");

/// Path of the programs that time portwatch's map update alone (`bench_hash`, `bench_cache`: issue
/// 13's front-cache experiment), for benchmarks.
#[doc(hidden)]
pub const BENCH_UPDATE_OBJECT_PATH: &str = concat!(env!("OUT_DIR"), "/bench_update.bpf.o");

/// Path of a TC program pair that records each skb's length and linear length, for tests (not
/// embedded).
#[doc(hidden)]
pub const LINEAR_PROBE_OBJECT_PATH: &str = concat!(env!("OUT_DIR"), "/linear_probe.bpf.o");

/// Each map's `max_entries` as `load` sets them for `sizes` (the other maps keep the object's):
/// room for `sizes` keys in each tier of each counter generation, the per-IP map's reserved
/// overflow keys on top.
fn sized_maps(sizes: TierSizes) -> Vec<(&'static str, u32)> {
    let ip = sizes.ip.saturating_add(RESERVED_ENTRIES);
    let mut sized = vec![];
    for generation in [0, 1] {
        let maps = generation_maps(generation);
        sized.extend([
            (maps.counters, ip),
            (maps.tier1, sizes.prefix),
            (maps.tier2, sizes.wide_prefix),
            (maps.filter, sizes.filter_words()),
        ]);
    }
    // A reset journals the idle generation's entries (every tier), then what stays of each, and
    // the drained totals of every port.
    let generation = ip
        .saturating_add(sizes.prefix)
        .saturating_add(sizes.wide_prefix)
        .saturating_add(PORT_OVERFLOW_ENTRIES);
    sized.push((
        map_names::JOURNAL_ENTRIES,
        generation.saturating_mul(2).saturating_add(DRAINED_ENTRIES),
    ));
    sized
}

/// Loads the object with room for `sizes` keys in each tier of each counter generation (the
/// per-IP map's reserved overflow keys come on top). Programs are not yet loaded into the kernel.
pub fn load(sizes: TierSizes) -> Result<Ebpf, aya::EbpfError> {
    let mut loader = EbpfLoader::new();
    for (name, max_entries) in sized_maps(sizes) {
        loader.map_max_entries(name, max_entries);
    }
    loader.load(OBJECT)
}

/// A map of the object as `load` would create it: what the kernel's accounting of its memory
/// depends on (`memory::estimate`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDefinition {
    pub name: &'static str,
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// `BPF_F_*` (`BPF_F_NO_PREALLOC`, `BPF_F_MMAPABLE`...).
    pub flags: u32,
}

/// Every map `load(sizes)` creates and pins (`map_names::ALL`), read from the object: nothing is
/// created in the kernel.
pub fn map_definitions(sizes: TierSizes) -> Result<Vec<MapDefinition>> {
    let object = aya_obj::Object::parse(OBJECT).context("reading the embedded object")?;
    let sized = sized_maps(sizes);
    map_names::ALL
        .into_iter()
        .map(|name| {
            let map = object
                .maps
                .get(name)
                .with_context(|| format!("map {name} missing from the object"))?;
            let max_entries = sized
                .iter()
                .find(|(sized_name, _)| *sized_name == name)
                .map_or(map.max_entries(), |(_, max_entries)| *max_entries);
            Ok(MapDefinition {
                name,
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries,
                flags: map.map_flags(),
            })
        })
        .collect()
}

/// `load`, its `config` set (generation 0, the filters' size and a random seed), then both
/// programs loaded into the kernel through its verifier: what `load` pins, what `check` asks of
/// the kernel, what the tests run.
pub fn load_programs(sizes: TierSizes) -> Result<Ebpf> {
    let mut ebpf = load(sizes).context("creating portwatch's maps")?;
    let seed = crate::sys::random_u64().map_or(0x5eed_5eed, |r| r as u32);
    let config = Config {
        generation: 0,
        filter_mask: sizes.filter_bytes() - 1,
        seed,
        seed_v4: source_seed_v4(seed),
    };
    let map = ebpf
        .map_mut(map_names::CONFIG)
        .context("map config missing from the object")?;
    Array::<_, Config>::try_from(map)?
        .set(0, config, 0)
        .context("writing the config map")?;
    for direction in Direction::ALL {
        program(&mut ebpf, direction)?
            .load()
            .with_context(|| format!("the kernel's verifier refused {}", direction.program_name()))?;
    }
    Ok(ebpf)
}

/// The program of `direction` in the object.
pub fn program(ebpf: &mut Ebpf, direction: Direction) -> Result<&mut SchedClassifier> {
    let name = direction.program_name();
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()?)
}
