//! Fault points for the crash and failure tests, in debug builds only (a release build compiles
//! every `point` to nothing).
//!
//! `PORTWATCH_FAULT=NAME=ACTION[,NAME=ACTION...]`, where ACTION is `kill` (the process sends itself
//! SIGKILL there: a crash at that instant), `eio` or `enospc` (the operation there fails with that
//! error). Every point, with the instant it stands for (`ctl/tests/fault_points.rs` fails if this
//! list and the code's `point` calls differ; `tests/tests/crash.rs` kills or fails each one):
//!
//! Loading, attaching, detaching and unloading (`lifecycle`, `attach`):
//! - `load:before-meta`: a first load's maps, programs and barrier are pinned, `meta` (which makes
//!   them a loaded state) is not yet.
//! - `attach:recorded`: an attachment is recorded as pending in `attachments`, not made yet.
//! - `attach:made`: the attachment is made in the kernel (TCX link or tc filter); its record is
//!   still pending.
//! - `detach:detached`: an attachment is undone in the kernel; its record is not removed yet.
//! - `unload:removing`: after each pin removed before `meta` (by `unload`, or by the removal of
//!   what an interrupted load or unload left): the state is half removed.
//!
//! The phases of a reset (`reset`; `unload --drain-to` drains through one), in order:
//! - `reset:locked`: the lock is held and an earlier interrupted reset recovered; nothing of this
//!   one is done yet.
//! - `reset:prepared`: the idle generation's selected entries are in the journal (`Prepared`);
//!   the generation is not flipped yet.
//! - `reset:flipped`: the program writes the other generation now; not waited for yet.
//! - `reset:barrier`: before each wait for running programs (the barrier map's update; `eio` fails
//!   it): after the flip, and after a flip back (a roll back, recovery).
//! - `reset:waiting`: that wait is over: no program writes the generation that was active.
//! - `reset:draining`: the selected entries of the generation that was active are read; the
//!   drained totals are not journaled yet.
//! - `reset:writing`: part of the record is written (half of its first write, flushed).
//! - `reset:fsync`: the record is written to the file (`Written`), before its fsync (`eio` fails
//!   the fsync).
//! - `reset:committed`: the record is durable (`Committed`); nothing is removed yet.
//! - `reset:delete-batch`: before the `BPF_MAP_DELETE_BATCH` calls of each removal of recorded
//!   entries (`Generation::remove`; `eio` fails them).
//! - `reset:deleting`: half the recorded entries are deleted from the generation that was active.
//! - `reset:deleted`: they all are (`Deleted`); the generation is not flipped back yet.
//! - `reset:subtracting`: half of the `Subtract` entries (what stays of the idle generation's
//!   selected entries) are written back into it.

use std::io;

/// Fails or kills the process if `PORTWATCH_FAULT` names `name`; otherwise nothing.
#[cfg(debug_assertions)]
pub(crate) fn point(name: &str) -> io::Result<()> {
    static FAULTS: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    let faults = FAULTS.get_or_init(|| {
        std::env::var("PORTWATCH_FAULT")
            .unwrap_or_default()
            .split(',')
            .filter_map(|f| f.split_once('='))
            .map(|(n, a)| (n.trim().to_string(), a.trim().to_string()))
            .collect()
    });
    let Some((_, action)) = faults.iter().find(|(n, _)| n == name) else {
        return Ok(());
    };
    match action.as_str() {
        "kill" => {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            unreachable!("SIGKILL cannot be caught")
        }
        "enospc" => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        _ => Err(io::Error::from_raw_os_error(libc::EIO)),
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn point(_name: &str) -> io::Result<()> {
    Ok(())
}
