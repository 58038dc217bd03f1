//! One module per verb. Each takes what it needs (privileges, bpffs, the lock), opens the pinned
//! state, does one thing and reports.

pub mod attach;
pub mod check;
pub mod load;
pub mod ports;
pub mod reset;
pub mod status;
pub mod top;
pub mod top_watch;
pub mod unload;

use anyhow::Result;

use crate::pinned::{check_privileges, ensure_bpffs, Lock, PinPath, Pinned};

/// For verbs that change pinned state: privileges, bpffs, the exclusive lock, then the state.
pub fn open_for_change(pin: &PinPath) -> Result<(Lock, Pinned)> {
    check_privileges()?;
    ensure_bpffs(pin)?;
    if !pin.is_loaded() {
        return Err(crate::error::Error::NotLoaded(pin.root.clone()).into());
    }
    let lock = Lock::acquire(pin)?;
    let pinned = Pinned::open(pin)?;
    Ok((lock, pinned))
}

/// For verbs that only read: privileges and bpffs; no lock.
pub fn open_for_read(pin: &PinPath) -> Result<Pinned> {
    check_privileges()?;
    ensure_bpffs(pin)?;
    Pinned::open(pin)
}
