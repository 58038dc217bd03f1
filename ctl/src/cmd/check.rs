//! `portwatch check`: can this kernel run portwatch's program? Loads it through the verifier and
//! unloads it; pins and attaches nothing.

use anyhow::Result;
use portwatch_common::{Direction, TierSizes, DEFAULT_MAX_ENTRIES, LAYOUT_VERSION};

pub(super) fn run() -> Result<()> {
    let mut ebpf = crate::object::load_programs(TierSizes::derived(DEFAULT_MAX_ENTRIES))?;
    for direction in Direction::ALL {
        let info = crate::object::program(&mut ebpf, direction)?.info()?;
        println!(
            "{}: loaded and verified (tag {:016x}, {} bytes JITed)",
            direction.program_name(),
            info.tag(),
            info.size_jitted()
        );
    }
    println!("layout version {LAYOUT_VERSION}; everything was unloaded again");
    Ok(())
}
