//! Wall time and peak memory of `portwatch top -n 10 --json` and `portwatch reset --json` over
//! counter maps of 10k, 100k and 1M entries, next to `bpftool map dump pinned` of the same map,
//! all in one run, interleaved round by round; the median round is reported.
//!
//!     cargo build --release -p portwatch -p portwatch-tests
//!     target/release/bench-read [ROUNDS] [--against OTHER/portwatch]
//!
//! Each command runs as its own process (as an operator runs it); peak memory is the child's
//! maximum resident set size from GNU time. With `--against`, every round also runs `top` and
//! `reset` with another portwatch binary (a release build of another commit, of the same layout)
//! on the same maps, in alternating order, and a second table compares the two side by side: the
//! median of each, and the median of the per-round ratios.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result};
use aya::maps::IterableMap;
use portwatch::pinned::{Access, PinPath, Pinned};
use portwatch_common::{CounterKey, Counters};
use portwatch_tests::{
    cli::{portwatch_bin, Pw},
    fill_counters, measure, median,
    netns::Netns,
    synthetic_entries,
};

/// The floor under `top`: the kernel's BPF_MAP_LOOKUP_BATCH over both generations, in this
/// process, with nothing done to the entries.
fn batch_read_alone(pin: &std::path::Path) -> Result<f64> {
    let mut pinned = Pinned::open(&PinPath::new(pin), Access::Read)?;
    let cpus = portwatch::generation::possible_cpus()?;
    let started = Instant::now();
    let mut got = 0;
    for generation in [0, 1] {
        let map = pinned.generation(generation)?.hash().map();
        portwatch::sys::bpf::lookup_batch::<CounterKey, Counters>(map.fd().as_fd(), cpus, 16384, |keys, _| {
            got += keys.len()
        })?;
    }
    std::hint::black_box(got);
    Ok(started.elapsed().as_secs_f64())
}

/// `portwatch top -n 10 --json` by `bin`: (seconds, MiB).
fn top(pw: &Pw, bin: &Path) -> Result<(f64, f64)> {
    measure(pw.command_of(bin, &["top", "-n", "10", "--json"]), Stdio::null())
}

/// `portwatch reset --json >> log` by `bin`, as cron runs it: (seconds, MiB). It drains the map.
fn reset(pw: &Pw, bin: &Path) -> Result<(f64, f64)> {
    let log = std::env::temp_dir().join(format!("pw-bench-reset-{}.jsonl", std::process::id()));
    let appending = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
    let measured = measure(pw.command_of(bin, &["reset", "--json"]), appending.into());
    std::fs::remove_file(&log)?;
    measured
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut rounds = 5usize;
    let mut against: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--against" => against = Some(args.next().context("--against needs a portwatch binary")?.into()),
            n => rounds = n.parse().with_context(|| format!("{n}: ROUNDS is a number"))?,
        }
    }
    let this = portwatch_bin();
    println!("{rounds} rounds, median; wall time in seconds, peak RSS in MiB");
    println!(
        "| entries | portwatch top -n 10 --json | portwatch reset --json >> FILE | bpftool map dump pinned | batch read alone |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let mut side_by_side = vec![];
    for n in [10_000u64, 100_000, 1_000_000] {
        let ns = Netns::new("bench")?;
        let pw = Pw::load_with(&ns, "lo", &["443"], &["--max-entries", &n.to_string()]);
        let data = synthetic_entries(n);
        let dump_path = pw.pin.join("maps/counters_0");
        let (mut top_t, mut top_m, mut reset_t, mut reset_m, mut dump_t, mut dump_m, mut floor_t) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        // With --against: (this, other) seconds per round, for top and for reset.
        let mut tops: Vec<(f64, f64)> = vec![];
        let mut resets: Vec<(f64, f64)> = vec![];
        for round in 0..rounds {
            // reset drains the map: fill it again every round (not timed).
            fill_counters(&pw.pin, 0, &data)?;
            let (t, m) = top(&pw, &this)?;
            top_t.push(t);
            top_m.push(m);
            if let Some(other) = &against {
                let other_t = top(&pw, other)?.0;
                // Alternate which goes first: on odd rounds, this build's run after the other's counts.
                let this_t = if round % 2 == 1 { top(&pw, &this)?.0 } else { t };
                tops.push((this_t, other_t));
            }
            floor_t.push(batch_read_alone(&pw.pin)?);
            let mut dump = Command::new("bpftool");
            dump.args(["map", "dump", "pinned"]).arg(&dump_path);
            let (t, m) = measure(dump, Stdio::null())?;
            dump_t.push(t);
            dump_m.push(m);
            // Alternate which resets first, the map filled again for the second.
            let other_first = match &against {
                Some(other) if round % 2 == 1 => {
                    let other_t = reset(&pw, other)?.0;
                    fill_counters(&pw.pin, 0, &data)?;
                    Some(other_t)
                }
                _ => None,
            };
            let (t, m) = reset(&pw, &this)?;
            reset_t.push(t);
            reset_m.push(m);
            if let Some(other) = &against {
                let other_t = match other_first {
                    Some(other_t) => other_t,
                    None => {
                        fill_counters(&pw.pin, 0, &data)?;
                        reset(&pw, other)?.0
                    }
                };
                resets.push((t, other_t));
            }
        }
        println!(
            "| {n} | {:.3} s, {:.0} MiB | {:.3} s, {:.0} MiB | {:.3} s, {:.0} MiB | {:.3} s |",
            median(&mut top_t),
            median(&mut top_m),
            median(&mut reset_t),
            median(&mut reset_m),
            median(&mut dump_t),
            median(&mut dump_m),
            median(&mut floor_t)
        );
        side_by_side.push((n, tops, resets));
    }
    if let Some(other) = &against {
        println!();
        println!("Side by side with {} (same maps, same rounds):", other.display());
        println!(
            "| entries | top: this | top: other | ratio this/other | reset: this | reset: other | ratio this/other |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        for (n, tops, resets) in side_by_side {
            let cells = |pairs: &[(f64, f64)]| {
                let mut this: Vec<f64> = pairs.iter().map(|p| p.0).collect();
                let mut other: Vec<f64> = pairs.iter().map(|p| p.1).collect();
                let mut ratio: Vec<f64> = pairs.iter().map(|p| p.0 / p.1).collect();
                format!(
                    "{:.3} s | {:.3} s | {:.2}",
                    median(&mut this),
                    median(&mut other),
                    median(&mut ratio)
                )
            };
            println!("| {n} | {} | {} |", cells(&tops), cells(&resets));
        }
    }
    Ok(())
}
