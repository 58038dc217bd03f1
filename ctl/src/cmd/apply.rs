//! `portwatch apply -f FILE`: make the pinned state match a configuration file.

use anyhow::Result;

use crate::{
    cli::ApplyArgs,
    config::Desired,
    pinned::PinPath,
    reconcile::{self, Options},
};

pub(super) fn run(pin: &PinPath, args: &ApplyArgs) -> Result<()> {
    let desired = Desired::from_file(pin, &args.file)?;
    let options = Options {
        dry_run: args.dry_run,
        reload: args.reload,
        drain_to: args.drain_to.clone(),
        memory: (&args.memory).into(),
    };
    let changes = reconcile::apply(&desired, &options)?;
    if changes.is_empty() {
        println!("no changes");
    }
    changes.iter().for_each(|line| println!("{line}"));
    Ok(())
}
