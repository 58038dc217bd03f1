//! `portwatch attach IF` and `portwatch detach IF`: one interface at a time, while the rest keeps
//! counting.

use anyhow::{Context, Result};
use portwatch_common::Directions;

use crate::{
    attach::{self, Iface, Mode},
    error::Error,
    pinned::{Access, PinPath, Pinned},
};

/// Attaches in `directions` (those `load` was given when `None`); all or nothing.
pub(super) fn attach(pin: &PinPath, iface: &str, directions: Option<Directions>, mode: Mode) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Change)?;
    let iface = Iface::resolve(iface)?;
    let directions = directions.unwrap_or_else(|| pinned.meta.directions());
    attach::attach_all(&mut pinned, &[iface], directions, mode)
}

pub(super) fn detach(pin: &PinPath, iface: &str) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Change)?;
    let records = pinned.attachments()?;
    let index = nix::net::if_::if_nametoindex(iface).ok();
    // By the interface's index while it exists; by the name recorded at attach time when it has
    // vanished (its pins and records are still ours to remove).
    let mut matching: Vec<_> = records
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(key, record)| match index {
            Some(index) => key.ifindex == index,
            None => attach::recorded_name(record) == iface && attach::ifname_of(key.ifindex).is_none(),
        })
        .collect();
    // The map's iteration order is the kernel's hash order: report in a fixed one.
    matching.sort_by_key(|(key, _)| key.direction);
    if matching.is_empty() {
        return Err(Error::Interface(format!(
            "portwatch is not attached to {iface:?} (see `portwatch status`)"
        ))
        .into());
    }
    for (key, record) in matching {
        attach::detach(pin, key, &record)?;
        records.remove(&key).context("removing the attachment record")?;
        println!("detached from {iface} {}", key.direction().name());
    }
    Ok(())
}
