//! The two counter generations: what readers sum, and the reset protocol that moves counts into
//! a record exactly once, even when the process is killed at any instant.
//!
//! The program writes only the generation `config.generation` names, incrementing values in place
//! through the pointer its lookup returned. Userspace therefore never deletes from or writes to the
//! generation the program writes; it writes a generation only after flipping `config.generation`
//! away from it and waiting until every program that was running has finished
//! (`sys::wait_for_running_programs`: the kernel's `synchronize_rcu` behind an `ARRAY_OF_MAPS`
//! update).
//!
//! A reset, with `a` the active generation and `b` the idle one (`bpffs-layout.md`, "Reset", has
//! the state machine; each step is journaled in bpffs before it is taken):
//!
//! 1. `Prepared`: the selected entries of `b` (nothing writes it) go into the journal (`Stale`);
//! 2. flip to `b`, wait; read the selected entries of `a` (nothing writes it now);
//! 3. `Writing`: write the record (those of `a` plus the stale ones of `b`) and sync it. A failure
//!    or a crash until the record is whole cuts the file back and flips back: nothing was removed;
//! 4. `Committed`: the record is durable. Set the drained totals, delete the selected entries of
//!    `a`;
//! 5. `Deleted`: flip back to `a`, wait; `b` holds its stale entries plus what was counted since
//!    step 2. Journal what each keeps once its stale share is taken out (`Subtract`);
//! 6. `Subtracting`: write those values into `b`; `Idle`.
//!
//! Every step from 4 on is idempotent given the journal, so recovery (`recover`) repeats the step
//! the journal names and the ones after it. Every byte the program counts is in exactly one place:
//! a map entry (readers sum both generations), or one record.

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use aya::maps::{IterableMap, PerCpuValues};
use portwatch_common::{Config, CounterKey, Counters, Journal, JournalKind, JournalState, PortKey};

use crate::{
    fault,
    filter::Filter,
    journal, maps,
    pinned::Pinned,
    record::{self, Found, Output},
};

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

/// Flips the generation the program writes, and waits until no program writes the other one.
fn set_generation(pinned: &mut Pinned, generation: u32) -> Result<()> {
    set_config(pinned, generation)?;
    wait_for_running_programs(pinned)
}

fn set_config(pinned: &mut Pinned, generation: u32) -> Result<()> {
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
        .context("writing the config map")
}

fn wait_for_running_programs(pinned: &mut Pinned) -> Result<()> {
    fault::point("reset:barrier").context("waiting for running programs")?;
    let barrier = pinned.barrier()?;
    crate::sys::bpf::wait_for_running_programs(barrier.fd().as_fd()).context("waiting for running programs")
}

/// The entries `filter` selects of a generation the program does not write.
fn selected(pinned: &mut Pinned, generation: u32, filter: &Filter) -> Result<Vec<(CounterKey, Counters)>> {
    let mut out = vec![];
    maps::for_each_in_generation(pinned, generation, |k, v| {
        if filter.matches(&k) {
            out.push((k, v))
        }
    })?;
    Ok(out)
}

/// Removes the entries `filter` selects from a generation the program does not write (the overflow
/// keys are zeroed: the program needs them): `known`, when the caller read them since that
/// generation became idle, or what a read finds now. Idempotent: what is left of the selection is
/// what was not removed yet.
fn remove_selected(
    pinned: &mut Pinned,
    generation: u32,
    filter: &Filter,
    known: Option<Vec<CounterKey>>,
) -> Result<()> {
    let selected: Vec<CounterKey> = match known {
        Some(known) => known,
        None => selected(pinned, generation, filter)?
            .into_iter()
            .map(|(k, _)| k)
            .collect(),
    };
    let (overflow, removable): (Vec<_>, Vec<_>) = selected.into_iter().partition(|k| k.is_overflow());
    // Their front-cache slots first (the overflow keys' too), then their hash entries: killed in
    // between, the next read still finds the entries.
    let removing: std::collections::HashSet<CounterKey> = removable.iter().chain(&overflow).copied().collect();
    maps::clear_front(pinned.front(generation)?, |k| removing.contains(k))?;
    let counters = pinned.counters(generation)?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    for key in overflow {
        let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])?;
        counters.insert(key, zero, 0).context("zeroing an overflow key")?;
    }
    let mut keys = Vec::with_capacity(removable.len() * std::mem::size_of::<CounterKey>());
    for key in &removable {
        // SAFETY: CounterKey is plain bytes (Pod).
        keys.extend_from_slice(unsafe {
            std::slice::from_raw_parts(
                (key as *const CounterKey).cast::<u8>(),
                std::mem::size_of::<CounterKey>(),
            )
        });
    }
    // In two halves, with the `reset:deleting` fault point between them.
    let half = removable.len() / 2 * std::mem::size_of::<CounterKey>();
    for (i, (part, count)) in [
        (&keys[..half], removable.len() / 2),
        (&keys[half..], removable.len() - removable.len() / 2),
    ]
    .into_iter()
    .enumerate()
    {
        let deleted = fault::point("reset:delete-batch")
            .and_then(|()| crate::sys::bpf::delete_batch(counters.map().fd().as_fd(), part, count));
        match deleted {
            Ok(()) => {}
            Err(e) if crate::sys::bpf::batch_unsupported(&e) => {
                for key in part.chunks_exact(std::mem::size_of::<CounterKey>()) {
                    // SAFETY: whole CounterKeys, copied out above.
                    let key: CounterKey = unsafe { std::ptr::read_unaligned(key.as_ptr().cast()) };
                    match counters.remove(&key) {
                        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                        Err(e) => return Err(e).context("deleting a counter the record holds"),
                    }
                }
            }
            Err(e) => return Err(e).context("BPF_MAP_DELETE_BATCH on the counters the record holds"),
        }
        if i == 0 && !removable.is_empty() {
            fault::point("reset:deleting")?;
        }
    }
    // Entries were removed (or, after a crash, may have been): the map may have room again.
    maps::clear_full_hint(pinned.map_full()?, generation)?;
    Ok(())
}

/// The reset protocol (see the module's documentation): moves what `filter` selects into one
/// record, which `render` makes from the entries (summed per key, sorted) and the reset's id, and
/// which goes to `output`. The caller holds the pin path's lock. A failure before the record is
/// whole zeroes nothing; one after it leaves the journal for the next command to finish.
pub(crate) fn reset(
    pinned: &mut Pinned,
    filter: &Filter,
    output: &mut Output,
    render: impl FnOnce(&[(CounterKey, Counters)], &str, &mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<()> {
    assert!(pinned.is_locked(), "a reset needs the pin path's lock");
    let _signals = HoldSignals::new()?;
    recover_and_say(pinned).context("an earlier reset was interrupted and cannot be finished yet")?;
    fault::point("reset:locked")?;
    let active = pinned.active_generation()?;
    let idle = active ^ 1;
    for generation in [0, 1] {
        maps::ensure_overflow_keys(pinned.counters(generation)?)?;
    }
    let mut j = Journal {
        generation: active,
        id: journal::new_id(),
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        ..Journal::default()
    };
    journal::set_filter(&mut j, filter)?;
    if let Output::File(file) = output {
        let cut = file.cut_torn_record()?;
        if cut > 0 {
            eprintln!(
                "portwatch: cut a torn record ({cut} bytes) off the end of {}: a crash or power loss interrupted the \
                 reset that was writing it, before it removed any of its counts",
                file.path.display()
            );
        }
        journal::set_path(&mut j, &file.path)?;
        (j.output_dev, j.output_ino) = file.identity()?;
        j.output_len = file.len()?;
    }
    journal::clear(pinned)?;
    // The idle generation: nothing writes it (the flip that made it idle was waited for).
    let stale = selected(pinned, idle, filter)?;
    journal::put(pinned, JournalKind::Stale, &stale)?;
    journal::set_state(pinned, &mut j, JournalState::Prepared)?;
    fault::point("reset:prepared")?;

    let id = journal::id_text(j.id);
    // The selected entries of the generation that was active, as read once it was idle: what the
    // roll forward deletes (recovery, without them, reads them again).
    let mut of_active = vec![];
    let write = |pinned: &mut Pinned, j: &mut Journal| -> Result<()> {
        set_config(pinned, idle)?;
        fault::point("reset:flipped")?;
        wait_for_running_programs(pinned)?;
        fault::point("reset:waiting")?;
        let mut entries = selected(pinned, active, filter)?;
        of_active = entries.iter().map(|(k, _)| *k).collect();
        fault::point("reset:draining")?;
        entries.extend(stale);
        maps::sum_sorted(&mut entries);
        let targets = drained_totals(pinned, &entries)?;
        journal::put(pinned, JournalKind::Drained, &targets)?;
        journal::set_state(pinned, j, JournalState::Writing)?;
        let written = output.write(|w| render(&entries, &id, w))?;
        j.record_len = written.len;
        j.record_hash = written.hash;
        journal::set_state(pinned, j, JournalState::Written)?;
        output.sync()
    };
    if let Err(e) = write(pinned, &mut j) {
        // Nothing was removed: cut the file back, flip back, and the counts are where they were.
        if let Output::File(file) = output {
            file.cut_back(j.output_len);
        }
        return Err(match roll_back(pinned, &mut j) {
            Ok(()) => e.context("the reset failed; nothing was zeroed"),
            Err(undo) => e.context(format!(
                "the reset failed, nothing was zeroed, and undoing its flip failed too ({undo:#}); the next portwatch \
                 command that takes the lock finishes undoing it"
            )),
        });
    }
    journal::set_state(pinned, &mut j, JournalState::Committed)?;
    fault::point("reset:committed")?;
    roll_forward(pinned, &mut j, Some(of_active)).context(
        "the reset's record is written, but removing the counts it holds failed; until the next portwatch command \
         that takes the lock finishes it (`portwatch status` shows it), they are also still counted",
    )
}

/// The drained totals once `entries` are added to them (only the ports the entries have).
fn drained_totals(pinned: &mut Pinned, entries: &[(CounterKey, Counters)]) -> Result<Vec<(CounterKey, Counters)>> {
    let mut per_port: Vec<(PortKey, Counters)> = entries
        .iter()
        .filter(|(k, _)| !k.is_overflow())
        .map(|(k, v)| (PortKey::of(k), *v))
        .collect();
    maps::sum_sorted(&mut per_port);
    let drained = pinned.drained()?;
    Ok(per_port
        .into_iter()
        .map(|(port, mut value)| {
            value += drained.get(&port, 0).unwrap_or_default();
            (port_as_key(port), value)
        })
        .collect())
}

/// A `PortKey` in the journal's key: its port, protocol and direction, no address.
fn port_as_key(port: PortKey) -> CounterKey {
    CounterKey {
        remote_ip: [0; 4],
        port: port.port,
        proto: port.proto,
        direction: port.direction,
    }
}

/// Finishes a committed reset from the step the journal names (each step is idempotent).
fn roll_forward(pinned: &mut Pinned, j: &mut Journal, mut of_active: Option<Vec<CounterKey>>) -> Result<()> {
    let active = j.generation;
    let idle = active ^ 1;
    loop {
        match journal::state(j)? {
            JournalState::Committed => {
                for (key, total) in journal::get(pinned, JournalKind::Drained)? {
                    let port = PortKey::of(&key);
                    pinned
                        .drained()?
                        .insert(port, total, 0)
                        .context("updating the drained totals")?;
                }
                let filter = journal::filter(j)?;
                remove_selected(pinned, active, &filter, of_active.take())?;
                journal::set_state(pinned, j, JournalState::Deleted)?;
                fault::point("reset:deleted")?;
            }
            JournalState::Deleted => {
                set_generation(pinned, active)?;
                let now: std::collections::HashMap<CounterKey, Counters> =
                    maps::read_generation(pinned, idle)?.into_iter().collect();
                let keep: Vec<(CounterKey, Counters)> = journal::get(pinned, JournalKind::Stale)?
                    .into_iter()
                    .map(|(key, stale)| {
                        let now = now.get(&key).copied().unwrap_or_default();
                        let keep = Counters {
                            bytes: now.bytes.saturating_sub(stale.bytes),
                            packets: now.packets.saturating_sub(stale.packets),
                        };
                        (key, keep)
                    })
                    .collect();
                journal::put(pinned, JournalKind::Subtract, &keep)?;
                journal::set_state(pinned, j, JournalState::Subtracting)?;
            }
            JournalState::Subtracting => {
                // After a crash, the flip back may not have been waited for.
                wait_for_running_programs(pinned)?;
                let keep = journal::get(pinned, JournalKind::Subtract)?;
                let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
                // What each keeps goes into its hash entry: its front-cache slots are cleared
                // first (repeating both steps after a crash gives the same result).
                let keys: std::collections::HashSet<CounterKey> = keep.iter().map(|(k, _)| *k).collect();
                maps::clear_front(pinned.front(idle)?, |k| keys.contains(k))?;
                let counters = pinned.counters(idle)?;
                for (i, (key, value)) in keep.iter().enumerate() {
                    if i == keep.len() / 2 {
                        fault::point("reset:subtracting")?;
                    }
                    if *value == Counters::default() && !key.is_overflow() {
                        match counters.remove(key) {
                            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                            Err(aya::maps::MapError::SyscallError(e))
                                if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                            Err(e) => return Err(e).context("removing a counter the record holds"),
                        }
                    } else {
                        let mut per_cpu = vec![Counters::default(); cpus];
                        per_cpu[0] = *value;
                        counters
                            .insert(key, PerCpuValues::try_from(per_cpu)?, 0)
                            .context("taking the record's share out of a counter")?;
                    }
                }
                maps::clear_full_hint(pinned.map_full()?, idle)?;
                journal::set_state(pinned, j, JournalState::Idle)?;
                journal::clear(pinned)?;
                return Ok(());
            }
            JournalState::Idle => return Ok(()),
            JournalState::Prepared | JournalState::Writing | JournalState::Written => {
                unreachable!("only a committed reset rolls forward")
            }
        }
    }
}

/// Undoes a reset that did not commit: flips back to the generation it began with and waits.
/// Nothing was removed from the counters, nor added to the drained totals.
fn roll_back(pinned: &mut Pinned, j: &mut Journal) -> Result<()> {
    set_generation(pinned, j.generation)?;
    journal::set_state(pinned, j, JournalState::Idle)?;
    journal::clear(pinned)
}

/// What `recover` did.
pub(crate) enum Recovered {
    Nothing,
    /// The interrupted reset's record was whole: the reset was finished.
    Finished {
        id: String,
        path: Option<std::path::PathBuf>,
    },
    /// It was not: its counts stay in the counters (a partial record was cut off the file).
    RolledBack {
        id: String,
        cut: Option<(std::path::PathBuf, u64)>,
    },
}

/// Finishes or rolls back a reset that was interrupted (a crash, SIGKILL, a failure after its
/// record was written), as the journal says. Needs the lock; a no-op when no reset is pending.
pub(crate) fn recover(pinned: &mut Pinned) -> Result<Recovered> {
    assert!(pinned.is_locked(), "recovering a reset needs the pin path's lock");
    // An unload killed halfway may have removed the journal: it had nothing pending then.
    if !pinned.pin.map(portwatch_common::map_names::JOURNAL).exists() {
        return Ok(Recovered::Nothing);
    }
    let mut j = journal::read(pinned)?;
    let id = journal::id_text(j.id);
    let path = journal::path(&j);
    match journal::state(&j)? {
        JournalState::Idle => return Ok(Recovered::Nothing),
        JournalState::Prepared => {
            roll_back(pinned, &mut j)?;
            return Ok(Recovered::RolledBack { id, cut: None });
        }
        state @ (JournalState::Writing | JournalState::Written) => {
            let whole = (state == JournalState::Written).then_some(record::Written {
                len: j.record_len,
                hash: j.record_hash,
            });
            let found = match &path {
                Some(path) => record::find(path, (j.output_dev, j.output_ino), j.output_len, whole)?,
                // A pipe: the record may have been read; the counts stay (never lost).
                None => Found::Gone,
            };
            match found {
                Found::Whole => journal::set_state(pinned, &mut j, JournalState::Committed)?,
                Found::CutBack(cut) => {
                    roll_back(pinned, &mut j)?;
                    return Ok(Recovered::RolledBack {
                        id,
                        cut: path.map(|p| (p, cut)),
                    });
                }
                Found::Gone => {
                    roll_back(pinned, &mut j)?;
                    return Ok(Recovered::RolledBack { id, cut: None });
                }
            }
        }
        JournalState::Committed | JournalState::Deleted | JournalState::Subtracting => {}
    }
    roll_forward(pinned, &mut j, None)?;
    Ok(Recovered::Finished { id, path })
}

/// `recover`, telling the operator on stderr what it did.
pub(crate) fn recover_and_say(pinned: &mut Pinned) -> Result<()> {
    match recover(pinned)? {
        Recovered::Nothing => {}
        Recovered::Finished { id, path } => eprintln!(
            "portwatch: finished reset {id}, which was interrupted after its record was written{}",
            path.map(|p| format!(" to {}", p.display())).unwrap_or_default()
        ),
        Recovered::RolledBack { id, cut } => eprintln!(
            "portwatch: rolled back reset {id}, which was interrupted before its record was whole: its counts are \
             still in the counters{}",
            cut.map(|(p, n)| format!(" ({n} bytes of it were cut off {})", p.display()))
                .unwrap_or_default()
        ),
    }
    Ok(())
}
