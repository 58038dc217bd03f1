//! `portwatch top`: the top talkers since the last reset, once, with rates, or live.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::{
    cli::TopArgs,
    generations,
    pinned::{PinPath, Pinned},
    report::{direction_value, Grouped, Report, View},
};

pub fn view(args: &TopArgs) -> View {
    View {
        by: args.by,
        prefix4: args.prefix4,
        prefix6: args.prefix6,
        ports: args.ports.clone(),
        direction: args.direction.map(direction_value),
        sort: args.sort,
        limit: args.limit,
    }
}

/// Both generations, grouped as the view says, in one pass.
pub fn read(pinned: &Pinned, view: &View) -> Result<Grouped> {
    let mut grouped = Grouped::default();
    generations::for_each(pinned, |key, value| view.add(&mut grouped, &key, value))?;
    Ok(grouped.finish())
}

pub fn run(pin: &PinPath, args: &TopArgs) -> Result<()> {
    let pinned = super::open_for_read(pin)?;
    let view = view(args);
    if args.watch {
        return super::top_watch::run(&pinned, &view, args.interval.unwrap_or(1.0), args.exact);
    }
    let first = read(&pinned, &view)?;
    let report = match args.interval {
        None => Report::new(&view, &first, None),
        Some(secs) => {
            let started = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(secs));
            let second = read(&pinned, &view)?;
            // The time between the reads, not the time asked for: reading 1M entries takes a while.
            let elapsed = started.elapsed().as_secs_f64();
            Report::new(&view, &second, Some((&first, elapsed)))
        }
    };
    if args.json {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        report.write_json(&mut out, &[("time", super::reset::unix_time())])?;
        std::io::Write::flush(&mut out)?;
    } else if args.csv {
        print!("{}", report.to_csv());
    } else {
        print!("{}", report.to_table(args.exact));
    }
    Ok(())
}
