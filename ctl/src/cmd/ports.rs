//! `portwatch ports add|del|set|list`: the port set, changed live (the next packet sees it).

use anyhow::Result;
use aya::maps::{Array, MapData};
use portwatch_common::PORT_COUNT;
use serde_json::json;

use crate::{cli::PortsCommand, maps, output, pinned::PinPath, ports};

pub fn run(pin: &PinPath, command: &PortsCommand) -> Result<()> {
    match command {
        PortsCommand::List { json } => list(pin, *json),
        PortsCommand::Add { specs } => change(pin, |table| {
            for s in specs {
                s.ports().for_each(|p| table[p as usize] |= s.protocols);
            }
        }),
        PortsCommand::Del { specs } => change(pin, |table| {
            for s in specs {
                s.ports().for_each(|p| table[p as usize] &= !s.protocols);
            }
        }),
        PortsCommand::Set { specs } => change(pin, |table| {
            table.fill(0);
            for s in specs {
                s.ports().for_each(|p| table[p as usize] |= s.protocols);
            }
        }),
    }
}

fn read_table(ports: &Array<MapData, u8>) -> Result<Vec<u8>> {
    let mut table = vec![0u8; PORT_COUNT as usize];
    for (port, flags) in ports.iter().enumerate() {
        table[port] = flags?;
    }
    Ok(table)
}

/// Applies `edit` to the port set and writes only the ports whose flags changed.
fn change(pin: &PinPath, edit: impl FnOnce(&mut [u8])) -> Result<()> {
    let (_lock, pinned) = super::open_for_change(pin)?;
    let mut ports = pinned.watched_ports()?;
    let before = read_table(&ports)?;
    let mut after = before.clone();
    edit(&mut after);
    let mut changed = 0;
    for (port, (&old, &new)) in before.iter().zip(after.iter()).enumerate() {
        if old != new {
            maps::set_port(&mut ports, port as u16, new)?;
            changed += 1;
        }
    }
    let folded: Vec<String> = ports::fold(&after).iter().map(|s| s.to_string()).collect();
    println!(
        "{changed} port(s) changed; watching: {}",
        if folded.is_empty() {
            "nothing".into()
        } else {
            folded.join(", ")
        }
    );
    Ok(())
}

fn list(pin: &PinPath, json: bool) -> Result<()> {
    let pinned = super::open_for_read(pin)?;
    let folded = ports::fold(&read_table(&pinned.watched_ports()?)?);
    if json {
        output::print_json(&json!({ "ports": folded.iter().map(spec_json).collect::<Vec<_>>() }));
    } else if folded.is_empty() {
        println!("no port is watched (add one with `portwatch ports add SPEC`)");
    } else {
        folded.iter().for_each(|s| println!("{s}"));
    }
    Ok(())
}

pub fn spec_json(s: &ports::PortSpec) -> serde_json::Value {
    json!({ "spec": s.to_string(), "first": s.first, "last": s.last, "protocols": s.protocol_names() })
}
