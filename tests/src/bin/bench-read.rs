//! Wall time and peak memory of `portwatch top -n 10 --json` and `portwatch reset --json` over
//! counter maps of 10k, 100k and 1M entries, next to `bpftool map dump pinned` of the same map,
//! all in one run, interleaved round by round; the median round is reported.
//!
//!     cargo build --release -p portwatch -p portwatch-tests
//!     target/release/bench-read [ROUNDS]
//!
//! Each command runs as its own process (as an operator runs it); peak memory is the child's
//! maximum resident set size from wait4(2).

use std::{
    os::fd::AsFd,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::Result;
use aya::maps::IterableMap;
use portwatch::pinned::{Access, PinPath, Pinned};
use portwatch_common::{CounterKey, Counters};
use portwatch_tests::{cli::Pw, fill_counters, measure, median, netns::Netns, synthetic_entries};

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

fn main() -> Result<()> {
    let rounds: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(5);
    println!("{rounds} rounds, median; wall time in seconds, peak RSS in MiB");
    println!(
        "| entries | portwatch top -n 10 --json | portwatch reset --json >> FILE | bpftool map dump pinned | batch read alone |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for n in [10_000u64, 100_000, 1_000_000] {
        let ns = Netns::new("bench")?;
        let pw = Pw::load_with(&ns, "lo", &["443"], &["--max-entries", &n.to_string()]);
        let data = synthetic_entries(n);
        let dump_path = pw.pin.join("maps/counters_0");
        let (mut top_t, mut top_m, mut reset_t, mut reset_m, mut dump_t, mut dump_m, mut floor_t) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            // reset drains the map: fill it again every round (not timed).
            fill_counters(&pw.pin, 0, &data)?;
            let (t, m) = measure(pw.command(&["top", "-n", "10", "--json"]), Stdio::null())?;
            top_t.push(t);
            top_m.push(m);
            floor_t.push(batch_read_alone(&pw.pin)?);
            let mut dump = Command::new("bpftool");
            dump.args(["map", "dump", "pinned"]).arg(&dump_path);
            let (t, m) = measure(dump, Stdio::null())?;
            dump_t.push(t);
            dump_m.push(m);
            // As cron runs it: `portwatch reset --json >> log`.
            let log = std::env::temp_dir().join(format!("pw-bench-reset-{}.jsonl", std::process::id()));
            let reset = pw.command(&["reset", "--json"]);
            let appending = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
            let measured = measure(reset, appending.into());
            std::fs::remove_file(&log)?;
            let (t, m) = measured?;
            reset_t.push(t);
            reset_m.push(m);
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
    }
    Ok(())
}
