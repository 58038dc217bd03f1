//! `portwatch reset`: zero the selected counters and print exactly what was zeroed, losing
//! nothing (see `generations` for the protocol).

use std::{
    io::Write,
    os::fd::{AsFd, AsRawFd},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::{
    cli::ResetArgs,
    generations::{self, Selector},
    pinned::PinPath,
    report::{By, Report, SortBy, View},
};

pub fn unix_time() -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    json!(now.as_secs())
}

pub fn run(pin: &PinPath, args: &ResetArgs) -> Result<()> {
    let (_lock, pinned) = super::open_for_change(pin)?;
    // Opened before anything is zeroed: a path that cannot be written fails with nothing touched.
    let output = match &args.output {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        None => None,
    };
    let selector = Selector {
        ports: args.ports.clone(),
        cidrs: args.cidrs.clone(),
    };
    let drained = generations::reset(&pinned, &selector)?;
    // Every drained key is a row: a reset reports at the finest grain.
    let view = View {
        by: By::IpPort,
        prefix4: 32,
        prefix6: 128,
        ports: vec![],
        direction: None,
        sort: SortBy::Bytes,
        limit: 0,
    };
    let report = Report::new(&view, &view.group_all(&drained.entries), None);
    let written = match &output {
        Some(file) => append_all_or_nothing(file, |w| render(&report, args, w))
            .with_context(|| format!("writing {}", args.output.as_ref().unwrap().display())),
        // `>> file.jsonl`: the same streaming and cutting back, on stdout's file.
        None if stdout_appends_to_a_file() => {
            let stdout = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating stdout")?;
            append_all_or_nothing(&std::fs::File::from(stdout), |w| render(&report, args, w))
                .context("writing to stdout")
        }
        None => {
            // Rendered whole first, so that a failure while rendering prints nothing.
            let mut text = Vec::new();
            render(&report, args, &mut text).context("rendering the snapshot")?;
            let mut out = std::io::stdout().lock();
            out.write_all(&text)
                .and_then(|()| out.flush())
                .context("writing to stdout")
        }
    };
    match written {
        Ok(()) => Ok(()),
        Err(e) => {
            // Nothing may be lost: put the counts back where the program does not write.
            generations::restore(&pinned, drained).context("putting the drained counters back")?;
            Err(e.context("the reset's output could not be written; the counters were put back"))
        }
    }
}

/// Whether stdout is a regular file written at its end (`>> log`, or `> log`): then cutting it
/// back to its old length undoes a partial write.
fn stdout_appends_to_a_file() -> bool {
    use std::io::Seek;
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return false;
    };
    let mut file = std::fs::File::from(fd);
    // SAFETY: F_GETFL on an fd we own.
    let appends = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) } & libc::O_APPEND != 0;
    match (file.metadata(), file.stream_position()) {
        (Ok(m), Ok(at)) => m.file_type().is_file() && (appends || at == m.len()),
        _ => false,
    }
}

/// The snapshot as `--json`, `--csv` or a table.
fn render(report: &Report, args: &ResetArgs, w: &mut dyn Write) -> std::io::Result<()> {
    if args.json {
        report.write_json(w, &[("time", unix_time()), ("reset", json!(true))])
    } else if args.csv {
        w.write_all(report.to_csv().as_bytes())
    } else {
        w.write_all(report.to_table(args.exact).as_bytes())
    }
}

/// Appends what `write` writes to `file` and syncs it, streaming (a million-row snapshot is not
/// held in memory); if anything fails, the file is cut back to its old length: whole or nothing.
fn append_all_or_nothing(
    file: &std::fs::File,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let old_len = file.metadata()?.len();
    let mut buffered = std::io::BufWriter::with_capacity(1 << 20, file);
    let result = write(&mut buffered)
        .and_then(|()| buffered.flush())
        .and_then(|()| file.sync_all());
    if result.is_err() {
        drop(buffered.into_parts());
        let _ = file.set_len(old_len);
    }
    result
}
