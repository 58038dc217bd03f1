//! The first load and the last unload: the maps and programs created, set up and pinned (nothing
//! attached yet), all or nothing; and every pin removed again. `load`, `unload` and `apply` begin
//! and end pinned state this way.

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::maps::Array;
use portwatch_common::{
    map_names, AttachKey, Attachment, Direction, Directions, Meta, TierSizes, ATTACH_FLAG_PENDING, LAYOUT_VERSION,
};

use crate::{
    attach, fault,
    pinned::{self, Access, Fresh, PinPath, Pinned},
};

/// The pins and directories a failed first load must take back, in reverse order of creation.
struct Undo {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    armed: bool,
}

impl Undo {
    fn dir(&mut self, dir: PathBuf) -> Result<()> {
        if !dir.exists() {
            crate::pinned::create_private_dir(&dir)?;
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

/// What a first load created: opened as any verb opens pinned state, and removed again when
/// dropped unless `keep` says it is complete.
pub(crate) struct Created {
    // Declared first, so dropped first: the pins go before the lock (held by `pinned`) does.
    undo: Undo,
    pub pinned: Pinned,
}

impl Created {
    /// The first load is complete: what it created stays.
    pub(crate) fn keep(mut self) -> Pinned {
        self.undo.armed = false;
        self.pinned
    }
}

/// Creates the maps (`sizes` keys in each tier of each counter generation) and programs and pins
/// them under `fresh`'s pin path, then opens them under the lock `fresh` holds. A failure removes
/// what this created.
pub(crate) fn create(fresh: Fresh, sizes: TierSizes, directions: Directions) -> Result<Created> {
    let pin: PinPath = fresh.pin.clone();
    // The intent directory (made by the lock) goes with a failed first load: only a loaded state
    // has one, and the lock is still held when `undo` removes it.
    let mut undo = Undo {
        files: vec![],
        dirs: if fresh.root_created {
            vec![pin.root.clone(), pin.intent_dir()]
        } else {
            vec![pin.intent_dir()]
        },
        armed: true,
    };
    remove_debris(&pin)?;
    let mut ebpf = crate::object::load_programs(sizes)?;

    undo.dir(pin.maps_dir())?;
    // `meta` is pinned last, once everything else is: its pin is what says "loaded", so a load
    // killed halfway leaves debris (removed by the next load or unload), never a state that
    // commands would take for a whole one.
    for name in map_names::ALL.into_iter().filter(|n| *n != map_names::META) {
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

    for mut generation in pinned::open_generations(&pin)? {
        generation.ensure_overflow_keys()?;
    }

    undo.dir(pin.progs_dir())?;
    for direction in Direction::ALL {
        let path = pin.prog(direction);
        crate::object::program(&mut ebpf, direction)?
            .pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        undo.files.push(path);
    }
    undo.dir(pin.links_dir())?;
    let meta = Meta {
        layout_version: LAYOUT_VERSION,
        max_entries: sizes.ip,
        directions: directions.bits(),
        _reserved: [0; 3],
        prefix_entries: sizes.prefix,
        wide_prefix_entries: sizes.wide_prefix,
        _reserved2: 0,
    };
    Array::<_, Meta>::try_from(ebpf.map_mut(map_names::META).unwrap())?.set(0, meta, 0)?;
    fault::point("load:before-meta").context("loading")?;
    let path = pin.map(map_names::META);
    ebpf.map(map_names::META)
        .context("map meta missing from the object")?
        .pin(&path)
        .with_context(|| format!("pinning {}", path.display()))?;
    undo.files.push(path);
    let pinned = Pinned::created(fresh)?;
    Ok(Created { undo, pinned })
}

/// Detaches every attachment, in a fixed order (the map's own is the kernel's hash order), and
/// removes its record; `each` is told of each one after it is gone, `say` what there is to say on
/// the way (`attach::Note`).
pub(crate) fn detach_all(
    pinned: &mut Pinned,
    mut each: impl FnMut(&AttachKey, &Attachment),
    say: &mut dyn FnMut(attach::Note),
) -> Result<()> {
    // An unload killed halfway may have removed the map already; it had detached everything
    // before it removed anything.
    if !pinned.pin.map(map_names::ATTACHMENTS).exists() {
        return Ok(());
    }
    let mut all: Vec<_> = pinned.attachments()?.iter().filter_map(|r| r.ok()).collect();
    all.sort_by_key(|(key, _)| *key);
    for (key, record) in all {
        attach::detach_one(pinned, key, &record, say)?;
        each(&key, &record);
    }
    Ok(())
}

/// Removes every pin under the pin path (attachments are `detach_all`'s): stale link pins,
/// programs, maps, `meta` last (so that a kill halfway leaves a state that is still "loaded", which
/// the next `unload` finishes). The pin directory and its lock stay: a first load can follow, or
/// `Fresh::remove_dir` ends it.
pub(crate) fn remove(pinned: Pinned) -> Result<Fresh> {
    let pin = pinned.pin.clone();
    remove_pins(&pin, true, false)?;
    Ok(pinned.into_fresh().expect("removing pinned state takes its lock"))
}

/// Removes the pins of the directories under the pin path, `meta` last, and the directories;
/// `meta` too only when `with_meta`. With `only_ours`, a pin whose kernel object is not one
/// portwatch makes (a map named otherwise, a program not called `portwatch_*`) is left, and so is
/// its directory.
fn remove_pins(pin: &PinPath, with_meta: bool, only_ours: bool) -> Result<usize> {
    let meta = pin.map(map_names::META);
    let mut removed = 0;
    for dir in [pin.links_dir(), pin.progs_dir(), pin.maps_dir()] {
        if dir.exists() {
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                if path == meta || (only_ours && !is_ours(pin, &path)) {
                    continue;
                }
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                removed += 1;
                fault::point("unload:removing").context("removing pins")?;
            }
        }
    }
    if with_meta && meta.exists() {
        std::fs::remove_file(&meta).with_context(|| format!("removing {}", meta.display()))?;
        removed += 1;
    }
    for dir in [pin.links_dir(), pin.progs_dir(), pin.maps_dir()] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if only_ours && e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }
    Ok(removed)
}

/// Whether the pin at `path` is one a `load` or `attach` of portwatch makes: a link under
/// `links/`, a map whose kernel name is its pin's name (as the object names them; the barrier is
/// `pw_barrier`), a program called `portwatch_*`.
fn is_ours(pin: &PinPath, path: &std::path::Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if path.starts_with(pin.links_dir()) {
        return true;
    }
    if path.starts_with(pin.progs_dir()) {
        return aya::programs::ProgramInfo::from_pin(path)
            .is_ok_and(|info| info.name_as_str().is_some_and(|n| n.starts_with("portwatch_")));
    }
    let expected = if name == map_names::BARRIER { "pw_barrier" } else { name };
    aya::maps::MapInfo::from_pin(path).is_ok_and(|info| {
        // The kernel keeps the first 15 bytes of a name.
        info.name_as_str()
            .is_some_and(|n| !n.is_empty() && expected.starts_with(n))
    })
}

/// What a `load` or `unload` that was killed halfway left under a pin path where nothing is loaded
/// (no `meta` pin): maps, programs or links without the pin that makes them a state. Removed (a
/// link pin's removal detaches it), with a line on stderr; a pin that is not portwatch's is left
/// where it is (`load` then fails to pin over it, and says so). `load`, and `unload` of nothing,
/// call it.
/// The `intent` directory is the lock's (see `pinned::Lock`), no pin: never debris.
pub(crate) fn remove_debris(pin: &PinPath) -> Result<()> {
    if pin.is_loaded() {
        return Ok(());
    }
    let removed = remove_pins(pin, false, true)?;
    if removed > 0 {
        eprintln!(
            "portwatch: removed {removed} pins that an interrupted load or unload left under {}",
            pin.root.display()
        );
    }
    Ok(())
}

/// The pins a loaded state must have and does not (an unload killed halfway removed them).
pub(crate) fn missing_pins(pin: &PinPath) -> Vec<String> {
    let mut expected: Vec<PathBuf> = map_names::ALL.iter().map(|n| pin.map(n)).collect();
    expected.push(pin.map(map_names::BARRIER));
    expected.extend(Direction::ALL.iter().map(|d| pin.prog(*d)));
    expected
        .into_iter()
        .filter(|p| !p.exists())
        .map(|p| p.strip_prefix(&pin.root).unwrap_or(&p).display().to_string())
        .collect()
}

/// Whether a pin path where nothing is loaded holds pins all the same (see `remove_debris`).
pub(crate) fn has_debris(pin: &PinPath) -> bool {
    !pin.is_loaded()
        && [pin.links_dir(), pin.progs_dir(), pin.maps_dir()]
            .iter()
            .any(|d| std::fs::read_dir(d).is_ok_and(|mut entries| entries.next().is_some()))
}

/// Finishes what an interrupted command left, before a command that takes the lock: a reset
/// (`reset::recover`, which says on stderr what it did) and pending attachment records
/// (`attach::resolve`, which tells `say`).
pub(crate) fn recover_interrupted(pin: &PinPath, say: &mut dyn FnMut(attach::Note)) -> Result<()> {
    let pending = match Pinned::probe(pin, Access::Read) {
        Ok(Some(mut pinned)) => {
            let journal = crate::journal::read(&mut pinned).is_ok_and(|j| j.state != 0);
            let attaching = pinned.attachments().is_ok_and(|records| {
                records
                    .iter()
                    .filter_map(|r| r.ok())
                    .any(|(_, r)| r.flags & ATTACH_FLAG_PENDING != 0)
            });
            journal || attaching
        }
        // Nothing loaded, or another layout: the command itself says so.
        _ => false,
    };
    if !pending {
        return Ok(());
    }
    let mut pinned = Pinned::open(pin, Access::Change)?;
    crate::reset::recover_and_say(&mut pinned)?;
    attach::resolve_all(&mut pinned, say)
}
