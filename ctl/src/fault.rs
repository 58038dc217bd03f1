//! Fault points for the crash and failure tests, in debug builds only (a release build compiles
//! every `point` to nothing).
//!
//! `PORTWATCH_FAULT=NAME=ACTION[,NAME=ACTION...]`, where ACTION is `kill` (the process sends itself
//! SIGKILL there: a crash at that instant), `eio` or `enospc` (the operation there fails with that
//! error). The names are the phases of a reset (`generations`): `reset:locked`, `reset:prepared`,
//! `reset:flipped`, `reset:waiting`, `reset:draining`, `reset:writing` (half the record written),
//! `reset:fsync`, `reset:committed`, `reset:deleting` (half the entries deleted), `reset:deleted`,
//! `reset:subtracting`, and `reset:delete-batch` (the `BPF_MAP_DELETE_BATCH` call),
//! `reset:barrier` (the wait's map update).

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
