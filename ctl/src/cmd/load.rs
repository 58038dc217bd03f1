//! `portwatch load`: load the program, pin it and its maps, attach, watch ports, exit.
//! All or nothing: a failure at any step removes what this run pinned or attached.
//! When already loaded, it adds the new interfaces and ports and never attaches twice.

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, PerCpuHashMap},
    programs::SchedClassifier,
};
use portwatch_common::{
    map_names, Config, CounterKey, Counters, Direction, Directions, Meta, DEFAULT_MAX_ENTRIES, LAYOUT_VERSION,
};

use crate::{
    attach::{self, Iface},
    cli::LoadArgs,
    error::Error,
    maps,
    netns::NetNs,
    pinned::{Creating, Lock, PinPath, Pinned},
    ports::{self, PortSpec},
};

/// The pins and directories a failed first load must take back, in reverse order of creation;
/// and the lock, released only after them (fields drop after `drop`) unless `Pinned` took it.
struct Undo {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    armed: bool,
    lock: Option<Lock>,
}

impl Undo {
    fn dir(&mut self, dir: PathBuf) -> Result<()> {
        if !dir.exists() {
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            self.dirs.push(dir);
        }
        Ok(())
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for f in self.files.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

pub(super) fn run(pin: &PinPath, args: &LoadArgs) -> Result<()> {
    // Every interface must exist before anything is created.
    let netns = NetNs::from_arg(args.netns.as_deref())?;
    let ifaces = args
        .ifaces
        .iter()
        .map(|n| Iface::resolve(n, &netns))
        .collect::<Result<Vec<_>>>()?;
    let root_existed = pin.root.exists();
    let lock = match Pinned::create(pin)? {
        Creating::Loaded(pinned) => return add_to_loaded(*pinned, args, &ifaces),
        Creating::Empty(lock) => lock,
    };
    let mut undo = Undo {
        files: vec![],
        dirs: if root_existed { vec![] } else { vec![pin.root.clone()] },
        armed: true,
        lock: Some(lock),
    };
    let mut pinned = fresh_load(pin, args, &mut undo)?;
    // Attachments are taken back by `attach_all` itself; the pins by `undo`, dropped first so
    // that the lock (held by `pinned`) goes last.
    let directions = pinned.meta.directions();
    if let Err(e) = attach_and_watch(&mut pinned, &ifaces, directions, args) {
        drop(undo);
        return Err(e);
    }
    undo.armed = false;
    println!("counting goes on in the kernel; see `portwatch status`");
    Ok(())
}

/// Creates and pins the maps and programs (nothing attached), then opens them as any verb does.
fn fresh_load(pin: &PinPath, args: &LoadArgs, undo: &mut Undo) -> Result<Pinned> {
    let max_entries = args.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES);
    let directions = args.direction.map(Directions::from).unwrap_or(Directions::BOTH);
    let mut ebpf = crate::object::load(max_entries).context("creating portwatch's maps")?;

    undo.dir(pin.maps_dir())?;
    for name in map_names::ALL {
        let path = pin.map(name);
        ebpf.map(name)
            .with_context(|| format!("map {name} missing from the object"))?
            .pin(&path)
            .with_context(|| format!("pinning {} (is something else pinned there?)", path.display()))?;
        undo.files.push(path);
    }

    let barrier = pin.map(map_names::BARRIER);
    crate::sys::bpf::create_barrier(&barrier).with_context(|| format!("creating {}", barrier.display()))?;
    undo.files.push(barrier);

    let meta = Meta {
        layout_version: LAYOUT_VERSION,
        max_entries,
        directions: directions.bits(),
        _reserved: [0; 7],
    };
    Array::<_, Meta>::try_from(ebpf.map_mut(map_names::META).unwrap())?.set(0, meta, 0)?;
    Array::<_, Config>::try_from(ebpf.map_mut(map_names::CONFIG).unwrap())?.set(0, Config::default(), 0)?;
    for name in [map_names::COUNTERS_0, map_names::COUNTERS_1] {
        let mut counters: PerCpuHashMap<_, CounterKey, Counters> =
            PerCpuHashMap::try_from(ebpf.map_mut(name).unwrap())?;
        maps::ensure_overflow_keys(&mut counters)?;
    }

    undo.dir(pin.progs_dir())?;
    for direction in Direction::ALL {
        let name = direction.program_name();
        let prog: &mut SchedClassifier = ebpf.program_mut(name).context("program missing")?.try_into()?;
        prog.load()
            .with_context(|| format!("the kernel's verifier refused {name}"))?;
        let path = pin.prog(direction);
        prog.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
        undo.files.push(path);
    }
    undo.dir(pin.links_dir())?;
    println!(
        "loaded portwatch at {} (layout {LAYOUT_VERSION}, {max_entries} counter entries)",
        pin.root.display()
    );
    Pinned::created(pin, undo.lock.take().expect("the lock is taken once"))
}

fn add_to_loaded(mut pinned: Pinned, args: &LoadArgs, ifaces: &[Iface]) -> Result<()> {
    let pin = &pinned.pin;
    if let Some(max) = args.max_entries {
        if max != pinned.meta.max_entries {
            return Err(Error::Conflict(format!(
                "portwatch is loaded at {} with --max-entries {}; to change it to {max}, run `portwatch unload` \
                 first (this clears the counters), then load again",
                pin.root.display(),
                pinned.meta.max_entries
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
    let map = pinned.watched_ports()?;
    let before = maps::port_table(map)?;
    let mut after = before.clone();
    ports::add(&mut after, &args.ports);
    let undo_ports = |pinned: &mut Pinned| {
        // Writes back every port that differs, whether or not it was written.
        let _ = pinned
            .watched_ports()
            .and_then(|map| maps::write_port_changes(map, &after, &before));
    };
    if let Err(e) = maps::write_port_changes(map, &before, &after) {
        undo_ports(pinned);
        return Err(e);
    }
    if let Err(e) = attach::attach_all(pinned, ifaces, directions, args.mode) {
        undo_ports(pinned);
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
