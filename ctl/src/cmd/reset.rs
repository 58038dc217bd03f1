//! `portwatch reset`: zero the selected counters and print exactly what was zeroed, losing
//! nothing (see `generations` for the protocol).

use std::io::Write;

use anyhow::Result;

use crate::{
    cli::ResetArgs,
    filter::Filter,
    generations,
    output::{self, Envelope},
    pinned::{Access, PinPath, Pinned},
    record::Output,
    report::{Report, View},
};

pub(super) fn run(pin: &PinPath, args: &ResetArgs) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Change)?;
    // Opened before anything is zeroed: a path that cannot be written fails with nothing touched.
    // `>> file.jsonl` (stdout a regular file written at its end) is a file too.
    let mut output = Output::open(args.output.as_deref())?;
    let view = View::every_key();
    generations::reset(&mut pinned, &Filter::from(args), &mut output, |entries, id, w| {
        // Every drained key is a row: a reset reports at the finest grain.
        let report = Report::new(&view, &view.group_all(entries), None);
        render(&report, args, id, w)
    })
}

/// The snapshot as `--json`, `--csv` or a table.
fn render(report: &Report, args: &ResetArgs, id: &str, w: &mut dyn Write) -> std::io::Result<()> {
    if args.json {
        let envelope = Envelope {
            time: output::unix_time(),
            reset: true,
            reset_id: Some(id.to_string()),
        };
        output::write_json(report, &envelope, w)
    } else if args.csv {
        w.write_all(output::csv(report).as_bytes())
    } else {
        w.write_all(output::table(report, args.exact).as_bytes())
    }
}
