//! `portwatch attach IF` and `portwatch detach IF`: one interface at a time, while the rest keeps
//! counting.

use anyhow::Result;
use portwatch_common::Directions;

use crate::{
    attach::{self, Iface, Mode},
    error::Error,
    netns::NetNs,
    pinned::{Access, PinPath, Pinned},
};

/// Attaches in `directions` (those `load` was given when `None`); all or nothing.
pub(super) fn attach(
    pin: &PinPath,
    iface: &str,
    netns: Option<&str>,
    directions: Option<Directions>,
    mode: Mode,
) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Change)?;
    let iface = Iface::resolve(iface, &NetNs::from_arg(netns)?)?;
    let directions = directions.unwrap_or_else(|| pinned.meta.directions());
    attach::attach_all(
        &mut pinned,
        &[iface],
        directions,
        mode,
        |step| println!("{step}"),
        &mut |note| eprintln!("portwatch: {note}"),
    )
}

pub(super) fn detach(pin: &PinPath, iface: &str, netns: Option<&str>) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Change)?;
    // A namespace that is gone is still named by the records of what was attached in it.
    let (inode, index) = match NetNs::from_arg(netns) {
        Ok(ns) => (Some(ns.inode), ns.enter(|| nix::net::if_::if_nametoindex(iface).ok())?),
        Err(_) => (None, None),
    };
    let in_netns = netns.map_or(String::new(), |ns| format!(" in network namespace {ns}"));
    let records = pinned.attachments()?;
    // By the interface's index while it exists; by the name recorded at attach time when it (or
    // its namespace) has vanished: its pins and records are still ours to remove.
    let mut matching: Vec<_> = records
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(key, record)| {
            let same_netns = match inode {
                Some(inode) => key.netns == inode,
                None => attach::recorded_netns(record) == netns.unwrap_or_default(),
            };
            same_netns
                && match index {
                    Some(index) => key.ifindex == index,
                    None => attach::recorded_name(record) == iface && attach::current_name(key, record).is_none(),
                }
        })
        .collect();
    // The map's iteration order is the kernel's hash order: report in a fixed one.
    matching.sort_by_key(|(key, _)| key.direction);
    if matching.is_empty() {
        return Err(Error::Interface(format!(
            "portwatch is not attached to {iface:?}{in_netns} (see `portwatch status`)"
        ))
        .into());
    }
    for (key, record) in matching {
        attach::detach_one(&mut pinned, key, &record, &mut |note| eprintln!("portwatch: {note}"))?;
        println!("detached from {iface} {}{in_netns}", key.direction().name());
    }
    Ok(())
}
