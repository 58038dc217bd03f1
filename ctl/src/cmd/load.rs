//! `portwatch load`: load the program, pin it and its maps, attach, watch ports, exit.
//! All or nothing: a failure at any step removes what this run pinned or attached.
//! When already loaded, it adds the new interfaces and ports and never attaches twice.

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuHashMap},
    programs::SchedClassifier,
};
use portwatch_common::{
    map_names, program_names, AttachKey, Attachment, Config, CounterKey, Counters, Meta, DIRECTION_EGRESS,
    DIRECTION_INGRESS, LAYOUT_VERSION,
};

use crate::{
    attach::{self, Iface},
    cli::{Direction, LoadArgs},
    error::Error,
    maps,
    pinned::{check_privileges, directions_from_bits, ensure_bpffs, Lock, PinPath, Pinned},
    ports::PortSpec,
};

pub const DEFAULT_MAX_ENTRIES: u32 = 65536;

/// What a failed load must take back, in reverse order of doing.
struct Undo {
    pin: PinPath,
    attachments: Vec<(AttachKey, Attachment)>,
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    armed: bool,
}

impl Undo {
    fn new(pin: &PinPath) -> Self {
        Undo {
            pin: pin.clone(),
            attachments: vec![],
            files: vec![],
            dirs: vec![],
            armed: true,
        }
    }
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
        for (key, record) in self.attachments.iter().rev() {
            if let Err(e) = attach::detach(&self.pin, *key, record) {
                eprintln!("portwatch: while undoing: {e:#}");
            }
        }
        for f in self.files.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

pub fn run(pin: &PinPath, args: &LoadArgs) -> Result<()> {
    check_privileges()?;
    ensure_bpffs(pin)?;
    // Every interface must exist before anything is created.
    let ifaces = args
        .ifaces
        .iter()
        .map(|n| Iface::resolve(n))
        .collect::<Result<Vec<_>>>()?;
    let root_existed = pin.root.exists();
    let lock = Lock::acquire(pin)?;
    if pin.is_loaded() {
        return add_to_loaded(pin, args, &ifaces, lock);
    }
    let mut undo = Undo::new(pin);
    if !root_existed {
        undo.dirs.push(pin.root.clone());
    }
    fresh_load(pin, args, &ifaces, &mut undo)?;
    undo.armed = false;
    Ok(())
}

fn fresh_load(pin: &PinPath, args: &LoadArgs, ifaces: &[Iface], undo: &mut Undo) -> Result<()> {
    let max_entries = args.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES);
    let direction = args.direction.unwrap_or(Direction::Both);
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
    crate::sys::create_barrier(&barrier).with_context(|| format!("creating {}", barrier.display()))?;
    undo.files.push(barrier);

    let meta = Meta {
        layout_version: LAYOUT_VERSION,
        max_entries,
        directions: direction.bits(),
        _reserved: [0; 7],
    };
    Array::<_, Meta>::try_from(ebpf.map_mut(map_names::META).unwrap())?.set(0, meta, 0)?;
    Array::<_, Config>::try_from(ebpf.map_mut(map_names::CONFIG).unwrap())?.set(0, Config::default(), 0)?;
    for name in [map_names::COUNTERS_0, map_names::COUNTERS_1] {
        let mut counters: PerCpuHashMap<_, CounterKey, Counters> =
            PerCpuHashMap::try_from(ebpf.map_mut(name).unwrap())?;
        maps::ensure_overflow_keys(&mut counters)?;
    }
    let mut ports: Array<_, u8> = Array::try_from(ebpf.map_mut(map_names::WATCHED_PORTS).unwrap())?;
    add_ports(&mut ports, &args.ports)?;

    undo.dir(pin.progs_dir())?;
    for d in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
        let name = program_name(d);
        let prog: &mut SchedClassifier = ebpf.program_mut(name).context("program missing")?.try_into()?;
        prog.load()
            .with_context(|| format!("the kernel's verifier refused {name}"))?;
        let path = pin.prog(d);
        prog.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
        undo.files.push(path);
    }

    let mut records: HashMap<MapData, AttachKey, Attachment> =
        HashMap::try_from(ebpf.take_map(map_names::ATTACHMENTS).unwrap())?;
    undo.dir(pin.links_dir())?;
    println!(
        "loaded portwatch at {} (layout {LAYOUT_VERSION}, {max_entries} counter entries)",
        pin.root.display()
    );
    for iface in ifaces {
        for d in directions_from_bits(direction.bits()) {
            let prog: &mut SchedClassifier = ebpf.program_mut(program_name(d)).unwrap().try_into()?;
            let (key, record) = attach::attach(prog, pin, &mut records, iface, d, args.mode)?;
            undo.attachments.push((key, record));
            attach::announce(iface, d, &record);
        }
    }
    report_ports(&args.ports);
    println!("counting goes on in the kernel; see `portwatch status`");
    Ok(())
}

fn add_to_loaded(pin: &PinPath, args: &LoadArgs, ifaces: &[Iface], _lock: Lock) -> Result<()> {
    let pinned = Pinned::open(pin)?;
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
        if direction.bits() != pinned.meta.directions {
            return Err(Error::Conflict(format!(
                "portwatch is loaded at {} with --direction {}; to change it, run `portwatch unload` first, \
                 then load again (or attach one interface with `portwatch attach IF --direction ...`)",
                pin.root.display(),
                Direction::from_bits(pinned.meta.directions)
            ))
            .into());
        }
    }
    let mut records = pinned.attachments()?;
    let mut undo = Undo::new(pin);
    for iface in ifaces {
        for d in pinned.directions() {
            if let Some(attached) = attach::attach_pinned(pin, &mut records, iface, d, args.mode)? {
                undo.attachments.push(attached);
            }
        }
    }
    add_ports(&mut pinned.watched_ports()?, &args.ports)?;
    undo.armed = false;
    report_ports(&args.ports);
    Ok(())
}

fn program_name(direction: u8) -> &'static str {
    if direction == DIRECTION_INGRESS {
        program_names::INGRESS
    } else {
        program_names::EGRESS
    }
}

/// Adds the protocols of `specs` to the port map (existing flags are kept).
pub fn add_ports<T: std::borrow::BorrowMut<MapData>>(ports: &mut Array<T, u8>, specs: &[PortSpec]) -> Result<()> {
    for spec in specs {
        for port in spec.ports() {
            let current = ports.get(&(port as u32), 0)?;
            if current | spec.protocols != current {
                maps::set_port(ports, port, current | spec.protocols)?;
            }
        }
    }
    Ok(())
}

fn report_ports(specs: &[PortSpec]) {
    if !specs.is_empty() {
        let list: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        println!("watching {}", list.join(", "));
    }
}
