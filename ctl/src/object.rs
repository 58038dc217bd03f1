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

/// Loads the object with room for `sizes` keys in each tier of each counter generation (the
/// per-IP map's reserved overflow keys come on top). Programs are not yet loaded into the kernel.
pub fn load(sizes: TierSizes) -> Result<Ebpf, aya::EbpfError> {
    let ip = sizes.ip.saturating_add(RESERVED_ENTRIES);
    let mut loader = EbpfLoader::new();
    for generation in [0, 1] {
        let maps = generation_maps(generation);
        loader
            .map_max_entries(maps.counters, ip)
            .map_max_entries(maps.tier1, sizes.prefix)
            .map_max_entries(maps.tier2, sizes.wide_prefix)
            .map_max_entries(maps.filter, sizes.filter_words());
    }
    // A reset journals the idle generation's entries (every tier), then what stays of each, and
    // the drained totals of every port.
    let generation = ip
        .saturating_add(sizes.prefix)
        .saturating_add(sizes.wide_prefix)
        .saturating_add(PORT_OVERFLOW_ENTRIES);
    loader
        .map_max_entries(
            map_names::JOURNAL_ENTRIES,
            generation.saturating_mul(2).saturating_add(DRAINED_ENTRIES),
        )
        .load(OBJECT)
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
