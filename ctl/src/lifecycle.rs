//! The first load and the last unload: the maps and programs created, set up and pinned (nothing
//! attached yet), all or nothing; and every pin removed again. `load`, `unload` and `apply` begin
//! and end pinned state this way.

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, PerCpuHashMap},
    programs::SchedClassifier,
};
use portwatch_common::{
    map_names, AttachKey, Attachment, Config, CounterKey, Counters, Direction, Directions, Meta, LAYOUT_VERSION,
};

use crate::{
    attach, maps,
    pinned::{Fresh, PinPath, Pinned},
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

/// Creates the maps (`max_entries` remote-IP keys in each counter generation) and programs and pins
/// them under `fresh`'s pin path, then opens them under the lock `fresh` holds. A failure removes
/// what this created.
pub(crate) fn create(fresh: Fresh, max_entries: u32, directions: Directions) -> Result<Created> {
    let pin: PinPath = fresh.pin.clone();
    let mut undo = Undo {
        files: vec![],
        dirs: if fresh.root_created {
            vec![pin.root.clone()]
        } else {
            vec![]
        },
        armed: true,
    };
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
    let pinned = Pinned::created(fresh)?;
    Ok(Created { undo, pinned })
}

/// Detaches every attachment, in a fixed order (the map's own is the kernel's hash order), and
/// removes its record; `each` is told of each one after it is gone.
pub(crate) fn detach_all(pinned: &mut Pinned, mut each: impl FnMut(&AttachKey, &Attachment)) -> Result<()> {
    let mut all: Vec<_> = pinned.attachments()?.iter().filter_map(|r| r.ok()).collect();
    all.sort_by_key(|(key, _)| *key);
    for (key, record) in all {
        attach::detach_one(pinned, key, &record)?;
        each(&key, &record);
    }
    Ok(())
}

/// Removes every pin under the pin path (attachments are `detach_all`'s): stale link pins,
/// programs, maps. The pin directory and its lock stay: a first load can follow, or
/// `Fresh::remove_dir` ends it.
pub(crate) fn remove(pinned: Pinned) -> Result<Fresh> {
    let pin = pinned.pin.clone();
    for dir in [pin.links_dir(), pin.progs_dir(), pin.maps_dir()] {
        if dir.exists() {
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
            std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    Ok(pinned.into_fresh().expect("removing pinned state takes its lock"))
}
