//! Scrape time and memory of the Prometheus export over counter maps of 10k, 100k and 1M entries:
//! `portwatch metrics` as a process (wall time, peak RSS), and one `GET /metrics` from a running
//! `portwatch serve` (wall time; the server's peak RSS after the scrapes), with and without
//! `--per-ip 10`. Rounds interleave the four; medians are reported.
//!
//!     cargo build --release -p portwatch -p portwatch-tests
//!     target/release/bench-metrics [ROUNDS]

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use portwatch_tests::{
    cli::{Pw, Running},
    fill_counters, measure, median,
    netns::Netns,
    synthetic_entries,
};

/// The peak RSS (MiB) of a running process.
fn peak_rss(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

fn scrape(ns: &Netns, addr: &str) -> Result<f64> {
    let started = Instant::now();
    let (code, body) = ns.http_get(addr, "/metrics")?;
    anyhow::ensure!(
        code == 200 && body.contains("portwatch_loaded 1"),
        "scrape failed: {code}"
    );
    Ok(started.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(5);
    println!("{rounds} rounds, median; wall time in seconds, peak RSS in MiB");
    println!("| entries | metrics | metrics --per-ip 10 | serve, one scrape | serve --per-ip 10, one scrape |");
    println!("|---:|---:|---:|---:|---:|");
    for n in [10_000u64, 100_000, 1_000_000] {
        let ns = Netns::new("bench")?;
        let pw = Pw::load_with(&ns, "lo", &["443"], &["--max-entries", &n.to_string()]);
        fill_counters(&pw.pin, 0, &synthetic_entries(n))?;
        let servers = [
            Running(
                pw.command(&["serve", "--listen", "127.0.0.1:9814"])
                    .stderr(Stdio::null())
                    .spawn()?,
            ),
            Running(
                pw.command(&["serve", "--listen", "127.0.0.1:9815", "--per-ip", "10"])
                    .stderr(Stdio::null())
                    .spawn()?,
            ),
        ];
        std::thread::sleep(Duration::from_millis(500));
        let (mut plain, mut plain_m, mut per_ip, mut per_ip_m, mut served, mut served_ip) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            let (t, m) = measure(pw.command(&["metrics"]), Stdio::null())?;
            plain.push(t);
            plain_m.push(m);
            let (t, m) = measure(pw.command(&["metrics", "--per-ip", "10"]), Stdio::null())?;
            per_ip.push(t);
            per_ip_m.push(m);
            served.push(scrape(&ns, "127.0.0.1:9814")?);
            served_ip.push(scrape(&ns, "127.0.0.1:9815")?);
        }
        println!(
            "| {n} | {:.3} s, {:.0} MiB | {:.3} s, {:.0} MiB | {:.3} s, {:.0} MiB | {:.3} s, {:.0} MiB |",
            median(&mut plain),
            median(&mut plain_m),
            median(&mut per_ip),
            median(&mut per_ip_m),
            median(&mut served),
            peak_rss(servers[0].0.id())?,
            median(&mut served_ip),
            peak_rss(servers[1].0.id())?,
        );
        drop(servers);
        pw.ok(&["unload"]);
    }
    Ok(())
}
