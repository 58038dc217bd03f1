//! `portwatch check`: can this kernel run portwatch's program? Loads it through the verifier and
//! unloads it; pins and attaches nothing.

use anyhow::{Context, Result};
use aya::programs::SchedClassifier;
use portwatch_common::{program_names, LAYOUT_VERSION};

pub fn run() -> Result<()> {
    crate::pinned::check_privileges()?;
    let mut ebpf = crate::object::load(65536).context("loading the embedded object")?;
    for name in [program_names::INGRESS, program_names::EGRESS] {
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
