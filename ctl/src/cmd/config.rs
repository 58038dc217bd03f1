//! `portwatch config show`: the pinned state as a configuration file that `apply -f` takes, and
//! then finds nothing to change in.

use anyhow::Result;

use crate::{
    config::FileConfig,
    pinned::{Access, PinPath, Pinned},
};

pub(super) fn show(pin: &PinPath) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Read)?;
    print!("{}", FileConfig::of_pinned(&mut pinned)?.to_yaml());
    Ok(())
}
