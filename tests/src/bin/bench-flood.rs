//! `top` and `reset` on a map a spoofed flood has filled: for counter maps of 65,536 entries (the
//! default) and 1,000,000, a `portwatch load --max-entries N` on a namespace's loopback is flooded
//! through its pinned ingress program (`BPF_PROG_TEST_RUN`) by N + N/10 distinct remote addresses,
//! so that the map is full and the overflow key holds the last tenth; then
//! `portwatch top -n 10 --json` and `portwatch reset --json >> FILE` run, each as its own process
//! (wall time and peak RSS from GNU time). In the same rounds, interleaved, the same map holds N
//! entries written by userspace instead (`bench-read`'s setup: no overflow, every value on one
//! CPU), for comparison. Each round fills the map again first (a reset empties it); filling is not
//! timed.
//!
//!     cargo build --release -p portwatch -p portwatch-tests
//!     target/release/bench-flood [ROUNDS]

use std::process::Stdio;

use anyhow::{ensure, Result};
use portwatch_common::Direction;
use portwatch_tests::{
    cli::Pw,
    fill_counters,
    flood::{frame, remote, PinnedPrograms},
    measure, median,
    netns::Netns,
    synthetic_entries,
};

/// Runs `sources` distinct sources through `pw`'s ingress program.
fn flood(pw: &Pw, sources: u64) -> Result<()> {
    let mut progs = PinnedPrograms::open(&pw.pin)?;
    for i in 0..sources {
        progs.run(
            Direction::Ingress,
            &frame(remote(i), Direction::Ingress, 100).build(),
            1,
        )?;
    }
    Ok(())
}

/// `top -n 10 --json`, then `reset --json >> FILE`: (seconds, MiB) of each.
fn top_and_reset(pw: &Pw) -> Result<[(f64, f64); 2]> {
    let top = measure(pw.command(&["top", "-n", "10", "--json"]), Stdio::null())?;
    let log = std::env::temp_dir().join(format!("pw-bench-flood-{}.jsonl", std::process::id()));
    let appending = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
    let reset = measure(pw.command(&["reset", "--json"]), appending.into());
    std::fs::remove_file(&log)?;
    Ok([top, reset?])
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(3);
    println!("{rounds} rounds, median; wall time in seconds, peak RSS in MiB");
    println!("| map entries | filled by | top -n 10 --json | reset --json >> FILE |");
    println!("|---:|---|---:|---:|");
    for n in [65_536u64, 1_000_000] {
        let sources = n + n / 10;
        let ns = Netns::new("bench")?;
        let pw = Pw::load_with(&ns, "lo", &["443"], &["--max-entries", &n.to_string()]);
        let data = synthetic_entries(n);
        // [flood, userspace] x [top, reset] x rounds
        let mut samples: [[Vec<(f64, f64)>; 2]; 2] = Default::default();
        for _ in 0..rounds {
            let before = pw.stats().map_full_packets;
            flood(&pw, sources)?;
            ensure!(
                pw.stats().map_full_packets - before == sources - n,
                "the map was not full after {n} sources"
            );
            for (i, m) in top_and_reset(&pw)?.into_iter().enumerate() {
                samples[0][i].push(m);
            }
            fill_counters(&pw.pin, 0, &data)?;
            for (i, m) in top_and_reset(&pw)?.into_iter().enumerate() {
                samples[1][i].push(m);
            }
        }
        for (which, s) in ["a flood of N + N/10 sources (full, overflow)", "userspace (N entries)"]
            .iter()
            .zip(samples.iter_mut())
        {
            let cell = |v: &mut Vec<(f64, f64)>| {
                let mut t: Vec<f64> = v.iter().map(|x| x.0).collect();
                let mut m: Vec<f64> = v.iter().map(|x| x.1).collect();
                format!("{:.3} s, {:.0} MiB", median(&mut t), median(&mut m))
            };
            let (top, reset) = s.split_at_mut(1);
            println!("| {n} | {which} | {} | {} |", cell(&mut top[0]), cell(&mut reset[0]));
        }
    }
    Ok(())
}
