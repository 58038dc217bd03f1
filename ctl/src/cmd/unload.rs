//! `portwatch unload`: detach every attachment and remove every pin. Afterwards nothing of
//! portwatch is left in bpffs or on any interface.

use anyhow::Result;

use crate::{
    attach, lifecycle,
    pinned::{Access, PinPath, Pinned},
};

pub(super) fn run(pin: &PinPath) -> Result<()> {
    let Some(mut pinned) = Pinned::probe(pin, Access::Change)? else {
        println!("nothing is loaded at {}", pin.root.display());
        return Ok(());
    };
    lifecycle::detach_all(&mut pinned, |key, record| {
        println!(
            "detached from {} {}{}",
            attach::display_name(key, record),
            key.direction().name(),
            attach::netns_suffix(record)
        )
    })?;
    // Whatever is left under the pin path is ours: stale link pins, programs, maps.
    lifecycle::remove(pinned)?.remove_dir()?;
    println!("unloaded: removed every pin under {}", pin.root.display());
    Ok(())
}
