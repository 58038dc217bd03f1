//! `portwatch top`: the top talkers since the last reset, once, with rates, or live (`watch`).

mod watch;

use std::time::{Duration, Instant};

use std::io::Write;

use anyhow::{Context, Result};

use crate::{
    cli::TopArgs,
    output::{self, Envelope},
    pinned::{Access, PinPath, Pinned},
    report::{Report, View},
};

pub(in crate::cmd) fn run(pin: &PinPath, args: &TopArgs) -> Result<()> {
    let mut pinned = Pinned::open(pin, Access::Read)?;
    let view = View::from(args);
    if args.watch {
        return watch::run(&mut pinned, &view, args.interval.unwrap_or(1.0), args.exact);
    }
    let Some(secs) = args.interval else {
        let report = Report::new(&view, &view.read(&mut pinned)?, None);
        return print(&report, args, true, None);
    };
    // --json and --csv are feeds: an object (or a block of rows) per interval until interrupted.
    let streaming = args.json || args.csv;
    let count = args.count.or(if streaming { None } else { Some(1) });
    let mut before = view.read(&mut pinned)?;
    let mut read_at = Instant::now();
    for n in 1.. {
        std::thread::sleep((read_at + Duration::from_secs_f64(secs)).saturating_duration_since(Instant::now()));
        let now = view.read(&mut pinned)?;
        // The time between the reads, not the time asked for: reading 1M entries takes a while.
        let elapsed = read_at.elapsed().as_secs_f64();
        read_at = Instant::now();
        let report = Report::new(&view, &now, Some((&before, elapsed)));
        // A CSV stream says when each block was read; a single block reads as before.
        let time = (count != Some(1)).then(output::unix_time);
        print(&report, args, n == 1, time)?;
        if count.is_some_and(|count| n >= count) {
            break;
        }
        before = now;
    }
    Ok(())
}

/// One report as the flags say: a JSON line, CSV rows (the header when `header`, each row led by
/// `time` when given), or a table.
fn print(report: &Report, args: &TopArgs, header: bool, time: Option<u64>) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.json {
        output::write_json(report, &Envelope::reading(None), &mut out)?;
    } else if args.csv {
        out.write_all(output::csv_with(report, header, time).as_bytes())?;
    } else {
        out.write_all(output::table(report, args.exact).as_bytes())?;
    }
    out.flush().context("writing to stdout")
}
