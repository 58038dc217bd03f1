//! `portwatch reset`: zero the selected counters and print exactly what was zeroed, losing
//! nothing (see `generations` for the protocol).

use std::io::Write;

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
    let mut text = Vec::new();
    if args.json {
        report.write_json(&mut text, &[("time", unix_time()), ("reset", json!(true))])?;
    } else if args.csv {
        text = report.to_csv().into_bytes();
    } else {
        text = report.to_table(args.exact).into_bytes();
    }
    match write_out(args, &text) {
        Ok(()) => Ok(()),
        Err(e) => {
            // Nothing may be lost: put the counts back where the program does not write.
            generations::restore(&pinned, drained).context("putting the drained counters back")?;
            Err(e.context("the reset's output could not be written; the counters were put back"))
        }
    }
}

/// Writes the whole snapshot or nothing: a file that fails midway is cut back to its old length.
fn write_out(args: &ResetArgs, text: &[u8]) -> Result<()> {
    match &args.output {
        Some(path) => {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            let old_len = f.metadata().map(|m| m.len()).ok();
            let written = f.write_all(text).and_then(|()| f.sync_all());
            if let Err(e) = written {
                if let Some(len) = old_len {
                    let _ = f.set_len(len);
                }
                return Err(e).with_context(|| format!("writing {}", path.display()));
            }
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text).context("writing to stdout")?;
            out.flush().context("writing to stdout")?;
        }
    }
    Ok(())
}
