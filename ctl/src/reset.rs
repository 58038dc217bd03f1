//! The reset protocol: moves what a filter selects out of the counters into one record, exactly
//! once, even when the process is killed at any instant.
//!
//! The program writes only the generation `config.generation` names, incrementing values in place
//! through the pointer its lookup returned. Userspace therefore never deletes from or writes to the
//! generation the program writes; it writes a generation only after flipping `config.generation`
//! away from it and waiting until every program that was running has finished
//! (`sys::bpf::wait_for_running_programs`: the kernel's `synchronize_rcu` behind an `ARRAY_OF_MAPS`
//! update).
//!
//! A reset, with `a` the active generation and `b` the idle one (`bpffs-layout.md`, "Reset", has
//! the state machine; each step is journaled in bpffs before it is taken, and is one method of
//! `Reset`):
//!
//! 1. `Prepared` (`Reset::prepare`): the selected entries of `b` (nothing writes it) go into the
//!    journal (`Stale`);
//! 2. `Writing`, `Written` (`Reset::write`): flip to `b`, wait; read the selected entries of `a`
//!    (nothing writes it now); write the record (those of `a` plus the stale ones of `b`) and sync
//!    it. A failure or a crash until the record is whole cuts the file back and flips back
//!    (`Reset::roll_back`): nothing was removed;
//! 3. `Committed` (`Reset::delete`): the record is durable. Set the drained totals, delete the
//!    selected entries of `a`;
//! 4. `Deleted` (`Reset::plan_subtraction`): flip back to `a`, wait; `b` holds its stale entries
//!    plus what was counted since step 2. Journal what each keeps once its stale share is taken out
//!    (`Subtract`);
//! 5. `Subtracting` (`Reset::subtract`): write those values into `b`; `Idle`.
//!
//! Every step from 3 on is idempotent given the journal, so recovery (`recover`,
//! `Reset::roll_forward`) repeats the step the journal names and the ones after it. Every byte the
//! program counts is in exactly one place: a generation's entry (readers sum both), or one record.

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use portwatch_common::{Config, Counters, Journal, JournalKind, JournalState, PortKey};

use crate::{
    fault,
    filter::Filter,
    generation::{sum_sorted, Generation, Key, Remote},
    journal,
    output::{self, RecordFormat},
    pinned::Pinned,
    record::{self, Found, Output},
};

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

/// Moves what `filter` selects into one record, written as `format` to `to`. The caller holds the
/// pin path's lock. A failure before the record is whole zeroes nothing; one after it leaves the
/// journal for the next command to finish.
pub(crate) fn run(pinned: &mut Pinned, filter: &Filter, to: &mut Output, format: RecordFormat) -> Result<()> {
    assert!(pinned.is_locked(), "a reset needs the pin path's lock");
    let _signals = HoldSignals::new()?;
    recover_and_say(pinned).context("an earlier reset was interrupted and cannot be finished yet")?;
    fault::point("reset:locked")?;
    for generation in [0, 1] {
        pinned.generation(generation)?.ensure_overflow_keys()?;
    }
    let (mut reset, stale) = Reset::prepare(pinned, filter, to)?;
    let read = match reset.write(stale, filter, to, format) {
        Ok(read) => read,
        Err(e) => {
            // Nothing was removed: cut the file back, flip back, and the counts are where they were.
            if let Output::File(file) = to {
                file.cut_back(reset.journal.output_len);
            }
            return Err(match reset.roll_back() {
                Ok(()) => e.context("the reset failed; nothing was zeroed"),
                Err(undo) => e.context(format!(
                    "the reset failed, nothing was zeroed, and undoing its flip failed too ({undo:#}); the next \
                     portwatch command that takes the lock finishes undoing it"
                )),
            });
        }
    };
    reset.enter(JournalState::Committed)?;
    fault::point("reset:committed")?;
    reset.roll_forward(Some(read)).context(
        "the reset's record is written, but removing the counts it holds failed; until the next portwatch command \
         that takes the lock finishes it (`portwatch status` shows it), they are also still counted",
    )?;
    say_what_was_left(pinned, filter)
}

/// A reset by `--ip` takes the prefix tiers' counts its prefixes hold whole; one wider than them
/// (a /16 when `--ip` names a /24), or a per-port count (any remote), may hold addresses of theirs
/// but others too, and stays: says how many, on stderr.
fn say_what_was_left(pinned: &mut Pinned, filter: &Filter) -> Result<()> {
    if filter.cidrs.is_empty() {
        return Ok(());
    }
    let (mut wider, mut any) = (std::collections::BTreeSet::new(), 0u64);
    pinned.for_each_count(|key, value| {
        if filter.overlaps_only(&key) && value != Counters::default() {
            match key.remote {
                Remote::Prefix(cidr) => {
                    wider.insert(cidr);
                }
                _ => any += value.bytes,
            }
        }
    })?;
    if !wider.is_empty() {
        let list: Vec<String> = wider.iter().map(|c| c.to_string()).collect();
        eprintln!(
            "portwatch: kept the counts of {} wider than --ip ({}): they were counted past the per-IP map and may \
             hold other addresses too; reset them with an --ip that holds them, or without --ip",
            if list.len() == 1 { "a prefix" } else { "prefixes" },
            list.join(", ")
        );
    }
    if any > 0 {
        eprintln!(
            "portwatch: kept {any} bytes counted per port only (any remote) on the ports reset: they have no address \
             to match --ip; a reset without --ip takes them"
        );
    }
    Ok(())
}

/// A reset in progress: the journal as it stands, and the pinned state it works on. Each method
/// takes one step of the state machine and journals the state it leads to.
struct Reset<'p> {
    pinned: &'p mut Pinned,
    journal: Journal,
}

impl<'p> Reset<'p> {
    /// `a`: the generation that was active when the reset began.
    fn active(&self) -> u32 {
        self.journal.generation
    }

    /// `b`: the one that was idle.
    fn idle(&self) -> u32 {
        self.journal.generation ^ 1
    }

    /// Moves the journal to `state` (one map update: atomic).
    fn enter(&mut self, state: JournalState) -> Result<()> {
        journal::set_state(self.pinned, &mut self.journal, state)
    }

    /// `Idle` -> `Prepared`: a new journal (id, time, filter, output file), then the entries
    /// `filter` selects of the idle generation as `Stale`. Returns those entries.
    fn prepare(pinned: &'p mut Pinned, filter: &Filter, to: &mut Output) -> Result<(Reset<'p>, Vec<(Key, Counters)>)> {
        let mut j = Journal {
            generation: pinned.active_generation()?,
            id: journal::new_id(),
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ..Journal::default()
        };
        journal::set_filter(&mut j, filter)?;
        if let Output::File(file) = to {
            let cut = file.cut_torn_record()?;
            if cut > 0 {
                eprintln!(
                    "portwatch: cut a torn record ({cut} bytes) off the end of {}: a crash or power loss interrupted \
                     the reset that was writing it, before it removed any of its counts",
                    file.path.display()
                );
            }
            journal::set_path(&mut j, &file.path)?;
            (j.output_dev, j.output_ino) = file.identity()?;
            j.output_len = file.len()?;
        }
        let mut reset = Reset { pinned, journal: j };
        journal::clear(reset.pinned)?;
        // The idle generation: nothing writes it (the flip that made it idle was waited for).
        let stale = selected(reset.pinned.generation(reset.idle())?, filter)?;
        journal::put_counts(reset.pinned, JournalKind::Stale, &stale)?;
        reset.enter(JournalState::Prepared)?;
        fault::point("reset:prepared")?;
        Ok((reset, stale))
    }

    /// `Prepared` -> `Writing` -> `Written`: flip to the idle generation and wait; read the entries
    /// `filter` selects of the one that was active (nothing writes it now); journal the drained
    /// totals that they and the `stale` ones make; write the record and sync it. Returns the keys
    /// read from the generation that was active: what `delete` removes (recovery, without them,
    /// reads them again).
    fn write(
        &mut self,
        stale: Vec<(Key, Counters)>,
        filter: &Filter,
        to: &mut Output,
        format: RecordFormat,
    ) -> Result<Vec<Key>> {
        self.set_config(self.idle())?;
        fault::point("reset:flipped")?;
        self.wait_for_running_programs()?;
        fault::point("reset:waiting")?;
        let mut entries = selected(self.pinned.generation(self.active())?, filter)?;
        let read = entries.iter().map(|(k, _)| *k).collect();
        fault::point("reset:draining")?;
        entries.extend(stale);
        sum_sorted(&mut entries);
        let totals = drained_totals(self.pinned, &entries)?;
        journal::put_drained(self.pinned, &totals)?;
        self.enter(JournalState::Writing)?;
        let id = journal::id_text(self.journal.id);
        let written = to.write(|w| output::write_record(&entries, &id, format, w))?;
        self.journal.record_len = written.len;
        self.journal.record_hash = written.hash;
        self.enter(JournalState::Written)?;
        to.sync()?;
        Ok(read)
    }

    /// Undoes a reset that did not commit (`Prepared`, `Writing`, `Written`): flips back to the
    /// generation it began with and waits; `Idle`. Nothing was removed from the counters, nor added
    /// to the drained totals.
    fn roll_back(&mut self) -> Result<()> {
        self.set_generation(self.active())?;
        self.enter(JournalState::Idle)?;
        journal::clear(self.pinned)
    }

    /// Finishes a committed reset from the step the journal names: each step is idempotent.
    fn roll_forward(&mut self, mut read: Option<Vec<Key>>) -> Result<()> {
        loop {
            match journal::state(&self.journal)? {
                JournalState::Committed => self.delete(read.take())?,
                JournalState::Deleted => self.plan_subtraction()?,
                JournalState::Subtracting => self.subtract()?,
                JournalState::Idle => return Ok(()),
                JournalState::Prepared | JournalState::Writing | JournalState::Written => {
                    unreachable!("only a committed reset rolls forward")
                }
            }
        }
    }

    /// `Committed` -> `Deleted`: sets the drained totals, then removes the record's entries from
    /// the generation that was active: `read` when the forward path has them, else what the
    /// journal's filter selects there now (what is left of them).
    fn delete(&mut self, read: Option<Vec<Key>>) -> Result<()> {
        for (port, total) in journal::drained(self.pinned)? {
            self.pinned
                .drained()?
                .insert(port, total, 0)
                .context("updating the drained totals")?;
        }
        let keys = match read {
            Some(keys) => keys,
            None => {
                let filter = journal::filter(&self.journal)?;
                let generation = self.pinned.generation(self.active())?;
                selected(generation, &filter)?.into_iter().map(|(k, _)| k).collect()
            }
        };
        let generation = self.pinned.generation(self.active())?;
        // In two calls, so that a crash test can kill the reset halfway (`reset:deleting`).
        let (first, rest) = keys.split_at(keys.len() / 2);
        generation.remove(first)?;
        if keys.iter().any(|k| !k.is_overflow()) {
            fault::point("reset:deleting")?;
        }
        generation.remove(rest)?;
        generation.refill_filter()?;
        self.enter(JournalState::Deleted)?;
        fault::point("reset:deleted")?;
        Ok(())
    }

    /// `Deleted` -> `Subtracting`: flips back to the generation that was active and waits; then the
    /// idle one holds its stale entries plus what was counted since the flip: journals what each
    /// stale key keeps once its stale share is taken out.
    fn plan_subtraction(&mut self) -> Result<()> {
        self.set_generation(self.active())?;
        let now: std::collections::HashMap<Key, Counters> =
            self.pinned.generation(self.idle())?.read()?.into_iter().collect();
        let keep: Vec<(Key, Counters)> = journal::counts(self.pinned, JournalKind::Stale)?
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
        journal::put_counts(self.pinned, JournalKind::Subtract, &keep)?;
        self.enter(JournalState::Subtracting)
    }

    /// `Subtracting` -> `Idle`: writes what each stale key keeps into the idle generation
    /// (repeating it after a crash gives the same result); empties the journal.
    fn subtract(&mut self) -> Result<()> {
        // After a crash, the flip back may not have been waited for.
        self.wait_for_running_programs()?;
        let keep = journal::counts(self.pinned, JournalKind::Subtract)?;
        let generation = self.pinned.generation(self.idle())?;
        // In two calls, so that a crash test can kill the reset halfway (`reset:subtracting`).
        let (first, rest) = keep.split_at(keep.len() / 2);
        generation.set(first)?;
        if !keep.is_empty() {
            fault::point("reset:subtracting")?;
        }
        generation.set(rest)?;
        self.enter(JournalState::Idle)?;
        journal::clear(self.pinned)
    }

    /// Flips the generation the program writes, and waits until no program writes the other one.
    fn set_generation(&mut self, generation: u32) -> Result<()> {
        self.set_config(generation)?;
        self.wait_for_running_programs()
    }

    fn set_config(&mut self, generation: u32) -> Result<()> {
        let config = self.pinned.config()?;
        let now = config.get(&0, 0).context("reading the config map")?;
        config
            .set(0, Config { generation, ..now }, 0)
            .context("writing the config map")
    }

    fn wait_for_running_programs(&mut self) -> Result<()> {
        fault::point("reset:barrier").context("waiting for running programs")?;
        let barrier = self.pinned.barrier()?;
        crate::sys::bpf::wait_for_running_programs(barrier.fd().as_fd()).context("waiting for running programs")
    }
}

/// The entries `filter` selects of a generation the program does not write.
fn selected(generation: &Generation, filter: &Filter) -> Result<Vec<(Key, Counters)>> {
    let mut out = vec![];
    generation.for_each(|k, v| {
        if filter.matches(&k) {
            out.push((k, v))
        }
    })?;
    Ok(out)
}

/// The drained totals once `entries` are added to them (only the ports the entries have).
fn drained_totals(pinned: &mut Pinned, entries: &[(Key, Counters)]) -> Result<Vec<(PortKey, Counters)>> {
    let mut per_port: Vec<(PortKey, Counters)> = entries
        .iter()
        .filter(|(k, _)| !k.is_overflow())
        .map(|(k, v)| (k.port_key(), *v))
        .collect();
    sum_sorted(&mut per_port);
    let drained = pinned.drained()?;
    Ok(per_port
        .into_iter()
        .map(|(port, value)| (port, value + drained.get(&port, 0).unwrap_or_default()))
        .collect())
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
    let journal = journal::read(pinned)?;
    let id = journal::id_text(journal.id);
    let path = journal::path(&journal);
    let mut reset = Reset { pinned, journal };
    match journal::state(&reset.journal)? {
        JournalState::Idle => return Ok(Recovered::Nothing),
        JournalState::Prepared => {
            reset.roll_back()?;
            return Ok(Recovered::RolledBack { id, cut: None });
        }
        state @ (JournalState::Writing | JournalState::Written) => {
            let j = &reset.journal;
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
                Found::Whole => reset.enter(JournalState::Committed)?,
                Found::CutBack(cut) => {
                    reset.roll_back()?;
                    return Ok(Recovered::RolledBack {
                        id,
                        cut: path.map(|p| (p, cut)),
                    });
                }
                Found::Gone => {
                    reset.roll_back()?;
                    return Ok(Recovered::RolledBack { id, cut: None });
                }
            }
        }
        JournalState::Committed | JournalState::Deleted | JournalState::Subtracting => {}
    }
    reset.roll_forward(None)?;
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
