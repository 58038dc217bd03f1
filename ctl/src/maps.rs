//! The port map and the global statistics, whether owned by a fresh `Ebpf` or reopened from pins.
//! (A generation's counters are `generation`'s.)

use std::{
    borrow::{Borrow, BorrowMut},
    os::fd::AsFd,
};

use anyhow::{Context, Result};
use aya::maps::{Array, IterableMap, MapData, PerCpuArray};
use portwatch_common::{Stats, PORT_COUNT};

use crate::{generation::sum, pinned::Pinned, sys};

/// The global statistics, summed over CPUs.
pub fn read_stats<T: Borrow<MapData>>(stats: &PerCpuArray<T, Stats>) -> Result<Stats> {
    Ok(sum(&stats.get(&0, 0).context("reading the stats map")?))
}

/// Sets the protocol flags (`PROTO_TCP | PROTO_UDP`, or 0) of one port; the next packet sees it.
pub fn set_port<T: BorrowMut<MapData>>(ports: &mut Array<T, u8>, port: u16, flags: u8) -> Result<()> {
    ports
        .set(port as u32, flags, 0)
        .with_context(|| format!("writing port {port} to the port map"))
}

/// The whole port map: the flags of every port, indexed by port number.
///
/// One `BPF_MAP_LOOKUP_BATCH` for the 65,536 entries where the kernel has batch operations on
/// arrays (5.6 and later), else one lookup per port (65,536 syscalls: about 60 ms).
pub fn port_table<T: Borrow<MapData>>(ports: &Array<T, u8>) -> Result<Vec<u8>> {
    let mut table = vec![0u8; PORT_COUNT as usize];
    let mut filled = 0usize;
    let batched = sys::bpf::lookup_batch::<u32, u8>(
        ports.map().fd().as_fd(),
        1,
        PORT_COUNT as usize,
        |port_numbers, flags| {
            for (port, flags) in port_numbers.iter().zip(flags) {
                if let Some(slot) = table.get_mut(*port as usize) {
                    *slot = *flags;
                    filled += 1;
                }
            }
        },
    );
    match batched {
        Ok(()) if filled == PORT_COUNT as usize => return Ok(table),
        Ok(()) => {}
        Err(e) if sys::bpf::batch_unsupported(&e) => {}
        Err(e) => return Err(e).context("reading the port map"),
    }
    for (port, flags) in ports.iter().enumerate() {
        table[port] = flags.context("reading the port map")?;
    }
    Ok(table)
}

/// Writes the ports whose flags differ between `before` (the map's content) and `after`; returns
/// how many it wrote.
fn write_port_changes<T: BorrowMut<MapData>>(ports: &mut Array<T, u8>, before: &[u8], after: &[u8]) -> Result<usize> {
    let mut changed = 0;
    for (port, (&old, &new)) in before.iter().zip(after).enumerate() {
        if old != new {
            set_port(ports, port as u16, new)?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// A change of the port set, all or nothing: the port map's flags before it and after it.
#[derive(Clone, Debug)]
pub(crate) struct PortChange {
    before: Vec<u8>,
    after: Vec<u8>,
}

impl PortChange {
    /// From the port map as it is now to what `edit` makes of it.
    pub(crate) fn new(pinned: &mut Pinned, edit: impl FnOnce(&mut [u8])) -> Result<PortChange> {
        let before = port_table(pinned.watched_ports()?)?;
        let mut after = before.clone();
        edit(&mut after);
        Ok(PortChange { before, after })
    }

    /// From port table `before` (the map's content) to `after`.
    pub(crate) fn between(before: Vec<u8>, after: Vec<u8>) -> PortChange {
        PortChange { before, after }
    }

    /// The flags of every port once the change is written.
    pub(crate) fn after(&self) -> &[u8] {
        &self.after
    }

    /// Writes the ports whose flags change (the next packet sees them); returns how many. If a
    /// write fails, the ports are put back as they were.
    pub(crate) fn write(&self, pinned: &mut Pinned) -> Result<usize> {
        let written = pinned
            .watched_ports()
            .and_then(|map| write_port_changes(map, &self.before, &self.after));
        if written.is_err() {
            self.undo(pinned);
        }
        written
    }

    /// Puts the ports back as they were before the change: writes back every port that differs,
    /// whether or not it was written. Best effort, on a path that is failing already.
    pub(crate) fn undo(&self, pinned: &mut Pinned) {
        let _ = pinned
            .watched_ports()
            .and_then(|map| write_port_changes(map, &self.after, &self.before));
    }
}
