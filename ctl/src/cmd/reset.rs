//! `portwatch reset`: zero the selected counters and print exactly what was zeroed, losing
//! nothing (see `reset` for the protocol).

use anyhow::Result;

use crate::{
    cli::ResetArgs,
    filter::Filter,
    pinned::{Access, PinPath, Pinned},
    record::Output,
};

pub(super) fn run(pin: &PinPath, args: &ResetArgs) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Change)?;
    // Opened before anything is zeroed: a path that cannot be written fails with nothing touched.
    // `>> file.jsonl` (stdout a regular file written at its end) is a file too.
    let mut output = Output::open(args.output.as_deref())?;
    crate::reset::run(&mut pinned, &Filter::from(args), &mut output, args.into())
}
