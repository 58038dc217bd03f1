//! `portwatch reset`: zero the selected counters and print exactly what was zeroed, losing
//! nothing (see `generations` for the protocol).

use std::{
    io::Write,
    os::fd::{AsFd, AsRawFd},
};

use anyhow::{Context, Result};

use crate::{
    cli::ResetArgs,
    filter::Filter,
    generations,
    output::{self, Envelope},
    pinned::{Access, PinPath, Pinned},
    report::{Report, View},
};

pub(super) fn run(pin: &PinPath, args: &ResetArgs) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Change)?;
    // Opened before anything is zeroed: a path that cannot be written fails with nothing touched.
    // `>> file.jsonl` (stdout a regular file written at its end) is treated the same way.
    let file = match &args.output {
        Some(path) => Some((
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
            format!("writing {}", path.display()),
        )),
        None => stdout_appending_file().map(|f| (f, "writing to stdout".to_string())),
    };
    let drained = generations::reset(&mut pinned, &Filter::from(args))?;
    // Every drained key is a row: a reset reports at the finest grain.
    let view = View::every_key();
    let report = Report::new(&view, &view.group_all(&drained.entries), None);
    let written = match &file {
        Some((file, what)) => output::append_all_or_nothing(file, |w| render(&report, args, w)).context(what.clone()),
        None => {
            // Rendered whole first, so that a failure while rendering prints nothing (and, like
            // any failure here, puts the counts back below).
            let mut text = Vec::new();
            render(&report, args, &mut text)
                .and_then(|()| {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&text)?;
                    out.flush()
                })
                .context("writing to stdout")
        }
    };
    match written {
        Ok(()) => Ok(()),
        Err(e) => {
            // Nothing may be lost: put the counts back where the program does not write.
            generations::restore(&mut pinned, drained).context("putting the drained counters back")?;
            Err(e.context("the reset's output could not be written; the counters were put back"))
        }
    }
}

/// Stdout as a file, when it is a regular file written at its end (`>> log`, or `> log`): then
/// cutting it back to its old length undoes a partial write.
fn stdout_appending_file() -> Option<std::fs::File> {
    use std::io::Seek;
    let mut file = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned().ok()?);
    // SAFETY: F_GETFL on an fd we own.
    let appends = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) } & libc::O_APPEND != 0;
    let len = file.metadata().ok().filter(|m| m.file_type().is_file())?.len();
    let at = file.stream_position().ok()?;
    (appends || at == len).then_some(file)
}

/// The snapshot as `--json`, `--csv` or a table.
fn render(report: &Report, args: &ResetArgs, w: &mut dyn Write) -> std::io::Result<()> {
    if args.json {
        let envelope = Envelope {
            time: output::unix_time(),
            reset: true,
        };
        output::write_json(report, &envelope, w)
    } else if args.csv {
        w.write_all(output::csv(report).as_bytes())
    } else {
        w.write_all(output::table(report, args.exact).as_bytes())
    }
}
