//! `portwatch attach IF` and `portwatch detach IF`: one interface at a time, while the rest keeps
//! counting.

use anyhow::{Context, Result};

use crate::{
    attach::{self, Iface, Mode},
    cli::Direction,
    error::Error,
    pinned::{direction_name, directions_from_bits, PinPath},
};

pub fn attach(pin: &PinPath, iface: &str, direction: Option<Direction>, mode: Mode) -> Result<()> {
    let (_lock, pinned) = super::open_for_change(pin)?;
    let iface = Iface::resolve(iface)?;
    let directions = direction
        .map(|d| directions_from_bits(d.bits()))
        .unwrap_or_else(|| pinned.directions());
    let mut records = pinned.attachments()?;
    let mut done = vec![];
    for d in directions {
        match attach::attach_pinned(pin, &mut records, &iface, d, mode) {
            Ok(None) => {}
            Ok(Some((key, record))) => {
                done.push((key, record));
            }
            Err(e) => {
                // All or nothing: take back the direction attached just before.
                for (key, record) in done {
                    let _ = attach::detach(pin, key, &record);
                    let _ = records.remove(&key);
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

pub fn detach(pin: &PinPath, iface: &str) -> Result<()> {
    let (_lock, pinned) = super::open_for_change(pin)?;
    let mut records = pinned.attachments()?;
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
        println!("detached from {iface} {}", direction_name(key.direction));
    }
    Ok(())
}
