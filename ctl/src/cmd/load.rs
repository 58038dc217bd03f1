//! `portwatch load`: load the program, pin it and its maps, attach, watch ports, exit.
//! All or nothing: a failure at any step removes what this run pinned or attached.
//! When already loaded, it adds the new interfaces and ports and never attaches twice.

use anyhow::Result;
use portwatch_common::{Directions, LAYOUT_VERSION};

use crate::{
    attach::{self, Iface},
    cli::LoadArgs,
    error::Error,
    lifecycle,
    maps::PortChange,
    memory,
    netns::NetNs,
    pinned::{Creating, PinPath, Pinned},
    ports::{self, PortSpec},
};

pub(super) fn run(pin: &PinPath, args: &LoadArgs) -> Result<()> {
    // Every interface must exist before anything is created.
    let netns = NetNs::from_arg(args.netns.as_deref())?;
    let ifaces = args
        .ifaces
        .iter()
        .map(|n| Iface::resolve(n, &netns))
        .collect::<Result<Vec<_>>>()?;
    let fresh = match Pinned::create(pin)? {
        Creating::Loaded(pinned) => return add_to_loaded(*pinned, args, &ifaces),
        Creating::Empty(fresh) => fresh,
    };
    // The maps' memory is weighed before any is made.
    let sizes = args.sizes();
    let (fresh, maps) = fresh.unless_refused(memory::weigh(
        sizes,
        (&args.memory).into(),
        "ask for fewer entries (--max-entries)",
    ))?;
    let directions = args.direction.map(Directions::from).unwrap_or(Directions::BOTH);
    let mut created = lifecycle::create(fresh, sizes, directions)?;
    println!(
        "loaded portwatch at {} (layout {LAYOUT_VERSION}, {} counter entries; prefix tiers {} and {})",
        pin.root.display(),
        sizes.ip,
        sizes.prefix,
        sizes.wide_prefix
    );
    println!("maps: {maps}");
    // Attachments are taken back by `attach_all` itself; the pins when `created` is dropped.
    attach_and_watch(&mut created.pinned, &ifaces, directions, args)?;
    created.keep();
    println!("counting goes on in the kernel; see `portwatch status`");
    Ok(())
}

fn add_to_loaded(mut pinned: Pinned, args: &LoadArgs, ifaces: &[Iface]) -> Result<()> {
    let pin = &pinned.pin;
    let loaded = pinned.meta.sizes();
    let asked = args.sizes();
    for (flag, given, now, wanted) in [
        ("--max-entries", args.max_entries, loaded.ip, asked.ip),
        ("--prefix-entries", args.prefix_entries, loaded.prefix, asked.prefix),
        (
            "--wide-prefix-entries",
            args.wide_prefix_entries,
            loaded.wide_prefix,
            asked.wide_prefix,
        ),
    ] {
        if given.is_some() && wanted != now {
            return Err(Error::Conflict(format!(
                "portwatch is loaded at {} with {flag} {now}; to change it to {wanted}, run `portwatch unload` \
                 first (this clears the counters), then load again",
                pin.root.display(),
            ))
            .into());
        }
    }
    if let Some(direction) = args.direction {
        if Directions::from(direction) != pinned.meta.directions() {
            return Err(Error::Conflict(format!(
                "portwatch is loaded at {} with --direction {}; to change it, run `portwatch unload` first, \
                 then load again (or attach one interface with `portwatch attach IF --direction ...`)",
                pin.root.display(),
                pinned.meta.directions().name()
            ))
            .into());
        }
    }
    let directions = pinned.meta.directions();
    attach_and_watch(&mut pinned, ifaces, directions, args)
}

/// Watches the ports of `args` too and attaches to `ifaces` (what is not attached yet), all or
/// nothing: if attaching fails, the ports are as they were.
fn attach_and_watch(pinned: &mut Pinned, ifaces: &[Iface], directions: Directions, args: &LoadArgs) -> Result<()> {
    let ports = PortChange::new(pinned, |table| ports::add(table, &args.ports))?;
    ports.write(pinned)?;
    let attached = attach::attach_all(
        pinned,
        ifaces,
        directions,
        args.mode,
        |step| println!("{step}"),
        &mut |note| eprintln!("portwatch: {note}"),
    );
    if let Err(e) = attached {
        ports.undo(pinned);
        return Err(e);
    }
    report_ports(&args.ports);
    Ok(())
}

fn report_ports(specs: &[PortSpec]) {
    if !specs.is_empty() {
        let list: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        println!("watching {}", list.join(", "));
    }
}
