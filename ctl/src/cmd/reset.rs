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
    let text = if args.json {
        let extra = [("time", unix_time()), ("reset", json!(true))];
        format!("{}\n", report.to_json(&extra))
    } else if args.csv {
        report.to_csv()
    } else {
        report.to_table(args.exact)
    };
    match write_out(args, &text) {
        Ok(()) => Ok(()),
        Err(e) => {
            // Nothing may be lost: put the counts back where the program does not write.
            generations::restore(&pinned, drained).context("putting the drained counters back")?;
            Err(e.context("the reset's output could not be written; the counters were put back"))
        }
    }
}

fn write_out(args: &ResetArgs, text: &str) -> Result<()> {
    match &args.output {
        Some(path) => {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            f.write_all(text.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).context("writing to stdout")?;
            out.flush().context("writing to stdout")?;
        }
    }
    Ok(())
}
