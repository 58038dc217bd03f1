//! `portwatch top`: the top talkers since the last reset, once, with rates, or live (`watch`).

mod watch;

use std::time::{Duration, Instant};

use anyhow::Result;

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
    let first = view.read(&mut pinned)?;
    let report = match args.interval {
        None => Report::new(&view, &first, None),
        Some(secs) => {
            let started = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(secs));
            let second = view.read(&mut pinned)?;
            // The time between the reads, not the time asked for: reading 1M entries takes a while.
            let elapsed = started.elapsed().as_secs_f64();
            Report::new(&view, &second, Some((&first, elapsed)))
        }
    };
    if args.json {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let envelope = Envelope {
            time: output::unix_time(),
            reset: false,
        };
        output::write_json(&report, &envelope, &mut out)?;
        std::io::Write::flush(&mut out)?;
    } else if args.csv {
        print!("{}", output::csv(&report));
    } else {
        print!("{}", output::table(&report, args.exact));
    }
    Ok(())
}
