//! `portwatch unload`: detach every attachment and remove every pin. Afterwards nothing of
//! portwatch is left in bpffs or on any interface.

use anyhow::{Context, Result};

use crate::{
    attach,
    pinned::{Access, PinPath, Pinned},
};

pub(super) fn run(pin: &PinPath) -> Result<()> {
    let Some(mut pinned) = Pinned::probe(pin, Access::Change)? else {
        println!("nothing is loaded at {}", pin.root.display());
        return Ok(());
    };
    let records = pinned.attachments()?;
    let mut all: Vec<_> = records.iter().filter_map(|r| r.ok()).collect();
    // The map's iteration order is the kernel's hash order: detach in a fixed one.
    all.sort_by_key(|(key, _)| (key.ifindex, key.direction));
    for (key, record) in all {
        attach::detach(pin, key, &record)?;
        records.remove(&key)?;
        let name = attach::current_name(&key, &record).unwrap_or_else(|| attach::recorded_name(&record));
        let netns = attach::recorded_netns(&record);
        let in_netns = if netns.is_empty() {
            String::new()
        } else {
            format!(" in network namespace {netns}")
        };
        println!("detached from {name} {}{in_netns}", key.direction().name());
    }
    // Whatever is left under the pin path is ours: stale link pins, programs, maps. The lock (on
    // the pin directory) is held until the directory is gone.
    for dir in [pin.links_dir(), pin.progs_dir(), pin.maps_dir()] {
        if dir.exists() {
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
            std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    std::fs::remove_dir(&pin.root).with_context(|| format!("removing {}", pin.root.display()))?;
    println!("unloaded: removed every pin under {}", pin.root.display());
    Ok(())
}
