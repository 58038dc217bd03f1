//! `portwatch ports add|del|set|list`: the port set, changed live (the next packet sees it).

use anyhow::Result;
use serde::Serialize;

use crate::{
    cli::PortsCommand,
    maps::{self, PortChange},
    output,
    pinned::{Access, PinPath, Pinned},
    ports::{self, PortSpec},
};

pub(super) fn run(pin: &PinPath, command: &PortsCommand) -> Result<()> {
    match command {
        PortsCommand::List { json } => list(pin, *json),
        PortsCommand::Add { specs } => change(pin, |table| ports::add(table, specs)),
        PortsCommand::Del { specs } => change(pin, |table| ports::del(table, specs)),
        PortsCommand::Set { specs } => change(pin, |table| ports::set(table, specs)),
    }
}

/// Applies `edit` to the port set and writes only the ports whose flags changed.
fn change(pin: &PinPath, edit: impl FnOnce(&mut [u8])) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Change)?;
    let change = PortChange::new(&mut pinned, edit)?;
    let changed = change.write(&mut pinned)?;
    let folded: Vec<String> = ports::fold(change.after()).iter().map(|s| s.to_string()).collect();
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

/// `ports list --json`.
#[derive(Serialize)]
struct PortList {
    ports: Vec<PortSpec>,
}

fn list(pin: &PinPath, json: bool) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Read)?;
    let ports = ports::fold(&maps::port_table(pinned.watched_ports()?)?);
    if json {
        output::print_json(&PortList { ports });
    } else if ports.is_empty() {
        println!("no port is watched (add one with `portwatch ports add SPEC`)");
    } else {
        ports.iter().for_each(|s| println!("{s}"));
    }
    Ok(())
}
