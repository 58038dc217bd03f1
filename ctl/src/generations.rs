//! The two counter generations: what readers sum, and the reset protocol that drains them
//! without losing or double-counting a byte.
//!
//! The program writes only the generation `config.generation` names, incrementing values in place
//! through the pointer its lookup returned. Userspace therefore never deletes from or writes to the
//! generation the program writes. A reset:
//!
//! 1. flips `config.generation` to the other map, then waits until every program that was running
//!    has finished (`sys::wait_for_running_programs`: the kernel's `synchronize_rcu` behind an
//!    `ARRAY_OF_MAPS` update). From then on nothing writes the old map;
//! 2. reads the old map and deletes the selected entries from it: exact, nothing races;
//! 3. flips back and waits again, and drains the selected entries of the other map the same way
//!    (a selective reset leaves unselected entries in both maps, so both must be drained).
//!
//! Every byte the program counts is in exactly one place: a map entry still in place (readers sum
//! both generations), or one reset's snapshot.

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use aya::maps::{IterableMap, PerCpuValues};
use portwatch_common::{Config, CounterKey, Counters, PortKey};

use crate::{filter::Filter, maps, pinned::Pinned};

/// Hands every entry of both generations to `each`: summed per key, they are the counters since
/// the last reset (a key can be in both).
pub fn for_each(pinned: &mut Pinned, mut each: impl FnMut(CounterKey, Counters)) -> Result<()> {
    for generation in [0, 1] {
        maps::for_each_in_generation(pinned, generation, &mut each)?;
    }
    Ok(())
}

/// Signals that would interrupt a reset between draining and reporting are held until it is done.
struct HoldSignals(nix::sys::signal::SigSet);

impl HoldSignals {
    fn new() -> Result<Self> {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal};
        let mut set = SigSet::empty();
        for s in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGPIPE,
        ] {
            set.add(s);
        }
        let mut old = SigSet::empty();
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))?;
        Ok(HoldSignals(old))
    }
}

impl Drop for HoldSignals {
    fn drop(&mut self) {
        let _ = nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&self.0), None);
    }
}

/// What a reset took out of the maps, per key (sorted by key), before it is reported.
pub(crate) struct Drained {
    pub entries: Vec<(CounterKey, Counters)>,
    /// Held until the snapshot is written; `restore` puts it back if writing fails.
    _signals: HoldSignals,
}

fn set_generation(pinned: &mut Pinned, generation: u32) -> Result<()> {
    pinned
        .config()?
        .set(
            0,
            Config {
                generation,
                _reserved: 0,
            },
            0,
        )
        .context("writing the config map")?;
    wait_for_running_programs(pinned)
}

fn wait_for_running_programs(pinned: &mut Pinned) -> Result<()> {
    let barrier = pinned.barrier()?;
    crate::sys::bpf::wait_for_running_programs(barrier.fd().as_fd()).context("waiting for running programs")
}

/// Reads and removes the entries `filter` matches of a generation the program no longer writes,
/// adding them to `into`. If removing fails midway, `into` still gets exactly what was removed
/// (found by reading the map again: nothing else writes it), so that the caller can put it back.
fn drain(pinned: &mut Pinned, generation: u32, filter: &Filter, into: &mut Vec<(CounterKey, Counters)>) -> Result<()> {
    let selected: Vec<_> = maps::read_generation(pinned, generation)?
        .into_iter()
        .filter(|(k, _)| filter.matches(k))
        .collect();
    let counters = pinned.counters(generation)?;
    let (overflow, removable): (Vec<_>, Vec<_>) = selected.into_iter().partition(|(k, _)| k.is_overflow());
    // The overflow keys stay (the program needs them when the map is full): zeroed.
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    for (key, value) in overflow {
        let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])?;
        counters.insert(key, zero, 0).context("zeroing an overflow key")?;
        into.push((key, value));
    }
    let mut keys = Vec::with_capacity(removable.len() * std::mem::size_of::<CounterKey>());
    for (key, _) in &removable {
        // SAFETY: CounterKey is plain bytes (Pod).
        keys.extend_from_slice(unsafe {
            std::slice::from_raw_parts(
                (key as *const CounterKey).cast::<u8>(),
                std::mem::size_of::<CounterKey>(),
            )
        });
    }
    let removed = match crate::sys::bpf::delete_batch(counters.map().fd().as_fd(), &keys, removable.len()) {
        Ok(()) => Ok(()),
        Err(e) if crate::sys::bpf::batch_unsupported(&e) => removable
            .iter()
            .try_for_each(|(key, _)| counters.remove(key))
            .context("deleting a drained counter"),
        Err(e) => Err(e).context("BPF_MAP_DELETE_BATCH on a drained counter map"),
    };
    match removed {
        Ok(()) => {
            into.extend(removable);
            Ok(())
        }
        Err(e) => {
            let left: std::collections::HashSet<CounterKey> = maps::read_generation(pinned, generation)?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            into.extend(removable.into_iter().filter(|(k, _)| !left.contains(k)));
            Err(e)
        }
    }
}

/// The reset protocol (see the module's documentation): drains what `filter` matches. The caller
/// holds the pin path's lock, writes the snapshot, and calls `restore` if it could not. If a step
/// fails, what was already drained is put back before the error returns: a failed reset zeroes
/// nothing.
pub(crate) fn reset(pinned: &mut Pinned, filter: &Filter) -> Result<Drained> {
    assert!(pinned.is_locked(), "a reset needs the pin path's lock");
    let signals = HoldSignals::new()?;
    let active = pinned.active_generation()?;
    let other = active ^ 1;
    for generation in [0, 1] {
        maps::ensure_overflow_keys(pinned.counters(generation)?)?;
    }
    let mut entries = Vec::new();
    let mut steps = || {
        set_generation(pinned, other)?;
        drain(pinned, active, filter, &mut entries)?;
        set_generation(pinned, active)?;
        drain(pinned, other, filter, &mut entries)
    };
    let steps = steps();
    if let Err(e) = steps {
        return match put_back(pinned, &entries) {
            Ok(()) => Err(e.context("the reset failed; nothing was zeroed")),
            Err(lost) => Err(e.context(format!(
                "the reset failed, and {} drained counters could not be put back ({lost:#})",
                entries.len()
            ))),
        };
    }
    // A key drained from both generations is one row.
    maps::sum_sorted(&mut entries);
    // The per-port totals the export adds to the live counters take what leaves them, so that the
    // exported counters never go down (readers of both take the shared lock: they see either
    // side of this, never the middle).
    if let Err(e) = add_to_drained(pinned, &entries, true) {
        return match put_back(pinned, &entries) {
            Ok(()) => Err(e.context("the reset failed; nothing was zeroed")),
            Err(lost) => Err(e.context(format!(
                "the reset failed, and {} drained counters could not be put back ({lost:#})",
                entries.len()
            ))),
        };
    }
    Ok(Drained {
        entries,
        _signals: signals,
    })
}

/// Puts drained counts back into the generation the program does not write (adding to what is
/// there), so that a snapshot that could not be written is not lost.
pub(crate) fn restore(pinned: &mut Pinned, drained: Drained) -> Result<()> {
    add_to_drained(pinned, &drained.entries, false)?;
    put_back(pinned, &drained.entries)
}

/// Adds (or takes back) `entries`, summed per port, protocol and direction, to the `drained` map,
/// all or nothing. The overflow entries have no port: they are not in it.
fn add_to_drained(pinned: &mut Pinned, entries: &[(CounterKey, Counters)], add: bool) -> Result<()> {
    let mut per_port: Vec<(PortKey, Counters)> = entries
        .iter()
        .filter(|(k, _)| !k.is_overflow())
        .map(|(k, v)| (PortKey::of(k), *v))
        .collect();
    maps::sum_sorted(&mut per_port);
    let drained = pinned.drained()?;
    let mut written: Vec<(PortKey, Option<Counters>)> = vec![];
    for (key, value) in per_port {
        let old = drained.get(&key, 0).ok();
        let mut total = old.unwrap_or_default();
        if add {
            total += value;
        } else {
            total.bytes = total.bytes.saturating_sub(value.bytes);
            total.packets = total.packets.saturating_sub(value.packets);
        }
        if let Err(e) = drained.insert(key, total, 0) {
            for (key, old) in written.into_iter().rev() {
                let _ = match old {
                    Some(old) => drained.insert(key, old, 0),
                    None => drained.remove(&key),
                };
            }
            return Err(e).context("updating the drained totals");
        }
        written.push((key, old));
    }
    Ok(())
}

fn put_back(pinned: &mut Pinned, entries: &[(CounterKey, Counters)]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    // After a failure between a flip and its wait, a program may still write the map that is idle
    // now: wait again first (if even that fails, putting the counts back is still better than not).
    let _ = wait_for_running_programs(pinned);
    let idle = pinned.active_generation()? ^ 1;
    let counters = pinned.counters(idle)?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    for (key, value) in entries {
        let mut per_cpu = counters
            .get(key, 0)
            .map(|v| v.to_vec())
            .unwrap_or_else(|_| vec![Counters::default(); cpus]);
        per_cpu[0] += *value;
        counters
            .insert(key, PerCpuValues::try_from(per_cpu)?, 0)
            .context("restoring a drained counter")?;
    }
    Ok(())
}
