//! `portwatch check`: can this kernel run portwatch's program? Loads it through the verifier and
//! unloads it; pins and attaches nothing.

use anyhow::{Context, Result};
use aya::programs::SchedClassifier;
use portwatch_common::{Direction, DEFAULT_MAX_ENTRIES, LAYOUT_VERSION};

pub(super) fn run() -> Result<()> {
    let mut ebpf = crate::object::load(DEFAULT_MAX_ENTRIES).context("loading the embedded object")?;
    for direction in Direction::ALL {
        let name = direction.program_name();
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .context("program missing from the object")?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel's verifier refused {name}"))?;
        let info = prog.info()?;
        println!(
            "{name}: loaded and verified (tag {:016x}, {} bytes JITed)",
            info.tag(),
            info.size_jitted()
        );
    }
    println!("layout version {LAYOUT_VERSION}; everything was unloaded again");
    Ok(())
}
