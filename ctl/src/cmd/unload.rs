//! `portwatch unload [--drain-to LOG]`: detach every attachment and remove every pin. Afterwards
//! nothing of portwatch is left in bpffs or on any interface. With `--drain-to`, every counter is
//! appended to LOG first, after everything is detached, so nothing counted is lost.

use std::path::Path;

use anyhow::Result;
use portwatch_common::{AttachKey, Attachment};

use crate::{
    attach, lifecycle,
    pinned::{Access, Creating, PinPath, Pinned},
    reconcile,
};

pub(super) fn run(pin: &PinPath, drain_to: Option<&Path>, force: bool) -> Result<()> {
    let Some(mut pinned) = Pinned::probe(pin, Access::Change)? else {
        if lifecycle::has_debris(pin) {
            // An interrupted load or unload left pins without the `meta` that makes them a state.
            if let Creating::Empty(fresh) = Pinned::create(pin)? {
                lifecycle::remove_debris(&fresh.pin)?;
                let _ = fresh.remove_dir();
                println!("nothing is loaded at {}", pin.root.display());
                return Ok(());
            }
            return run(pin, drain_to, force);
        }
        println!("nothing is loaded at {}", pin.root.display());
        return Ok(());
    };
    if let Err(e) = crate::reset::recover_and_say(&mut pinned) {
        if !force {
            return Err(e.context(
                "an interrupted reset holds counts that it may also have written to its record, and it cannot be \
                 finished: unloading now could lose or double them (`portwatch status` shows it; `unload --force` \
                 removes them anyway)",
            ));
        }
        eprintln!("portwatch: warning: {e:#}; unloading anyway (--force)");
    }
    let say = |key: &AttachKey, record: &Attachment| {
        println!(
            "detached from {} {}{}",
            attach::display_name(key, record),
            key.direction().name(),
            attach::netns_suffix(record)
        )
    };
    if let Some(log) = drain_to {
        let detached = reconcile::detach_and_drain(&mut pinned, log)?;
        detached.iter().for_each(|(key, record)| say(key, record));
        println!("drained every counter into {}", log.display());
    }
    lifecycle::detach_all(&mut pinned, say, &mut |note| eprintln!("portwatch: {note}"))?;
    // Whatever is left under the pin path is ours: stale link pins, programs, maps.
    lifecycle::remove(pinned)?.remove_dir()?;
    println!("unloaded: removed every pin under {}", pin.root.display());
    Ok(())
}
