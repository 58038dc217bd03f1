//! The history store at the sizes: a month of 5-minute reset records of 10,000 rows each
//! (8,640 records, 86 million rows, about 9 GB of JSON lines), ingested a day at a time as
//! `portwatch-reset.service` would leave them, then queried. Reports the ingest of one 10,000-row
//! record (median over the last day's records, each ingested on its own), `history top --since
//! 30d`, `--since 24h`, `history --days`, and the database's size after one day and after the
//! month. Files go to a scratch directory that is removed at the end.
//!
//!     cargo build --release -p portwatch -p portwatch-tests
//!     target/release/bench-history [DAYS] [ROWS]
//!
//! The population: ROWS remotes (IPv4 and IPv6) on four ports, each sending in every record, with
//! heavy-tailed figures (remote i sends about 1/(i+1) of the heaviest), so that a bucket's cap
//! (1,000 remotes per port by default) folds the light ones into `other`, as it would in life.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result};
use portwatch_tests::{cli::portwatch_bin, median, rng::Rng};

fn record(time: i64, id: usize, rows: usize, rng: &mut Rng, out: &mut impl Write) -> Result<()> {
    write!(
        out,
        "{{\"time\":{time},\"reset\":true,\"reset_id\":\"{id:016x}\",\"rows\":["
    )?;
    for i in 0..rows {
        let ip = if i % 5 == 4 {
            format!("2001:db8:{:x}::{:x}", i / 65536, i % 65536 + 1)
        } else {
            format!("198.18.{}.{}", (i / 256) % 256, i % 256)
        };
        let port = [443, 80, 53, 8443][i % 4];
        let proto = if port == 53 { "udp" } else { "tcp" };
        let packets = 1 + (1_000_000 / (i + 1)) as u64 + rng.below(100) as u64;
        let bytes = packets * (60 + rng.below(1400) as u64);
        if i > 0 {
            out.write_all(b",")?;
        }
        write!(
            out,
            "{{\"ip\":\"{ip}\",\"port\":{port},\"proto\":\"{proto}\",\"direction\":\"ingress\",\"bytes\":{bytes},\"packets\":{packets}}}"
        )?;
    }
    writeln!(
        out,
        "],\"totals\":{{\"bytes\":0,\"packets\":0}},\"overflow\":{{\"bytes\":0,\"packets\":0}}}}"
    )?;
    Ok(())
}

fn portwatch(args: &[&str]) -> Result<f64> {
    let started = Instant::now();
    let out = Command::new(portwatch_bin())
        .args(args)
        .output()
        .context("running portwatch")?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "portwatch {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(secs)
}

fn size(db: &Path) -> u64 {
    ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", db.display())).ok())
        .map(|m| m.len())
        .sum()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let days: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(30);
    let rows: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10_000);
    let dir = PathBuf::from(format!("/var/tmp/pw-bench-history-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&dir, days, rows);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(dir: &Path, days: usize, rows: usize) -> Result<()> {
    let db = dir.join("history.db");
    let db_arg = db.to_str().unwrap();
    let common = ["--config", "/nonexistent", "--db", db_arg];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let start = now - (days as i64) * 86400;
    let mut rng = Rng::new(1);
    let mut id = 0;
    let mut record_bytes = 0;
    let mut one_record: Vec<f64> = Vec::new();
    let mut day_ingest: Vec<f64> = Vec::new();
    let mut size_after_day = 0;
    for day in 0..days {
        let last = day + 1 == days;
        let base = start + (day as i64) * 86400;
        if last {
            // The last day: every record in its own file, ingested on its own (as the reset
            // service does every 5 minutes).
            for r in 0..288 {
                let file = dir.join(format!("r{r}.jsonl"));
                let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
                record(base + 300 * r, id, rows, &mut rng, &mut out)?;
                out.flush()?;
                drop(out);
                record_bytes = std::fs::metadata(&file)?.len();
                id += 1;
                let mut a: Vec<&str> = vec!["history", "ingest", "--quiet"];
                a.extend_from_slice(&common);
                a.push(file.to_str().unwrap());
                one_record.push(portwatch(&a)?);
                std::fs::remove_file(&file)?;
            }
        } else {
            let file = dir.join("day.jsonl");
            let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
            for r in 0..288 {
                record(base + 300 * r, id, rows, &mut rng, &mut out)?;
                id += 1;
            }
            out.flush()?;
            drop(out);
            let mut a: Vec<&str> = vec!["history", "ingest", "--quiet"];
            a.extend_from_slice(&common);
            a.push(file.to_str().unwrap());
            day_ingest.push(portwatch(&a)?);
            std::fs::remove_file(&file)?;
        }
        if day == 0 {
            size_after_day = size(&db);
        }
        eprintln!("day {}/{days} ingested, database {} MB", day + 1, size(&db) / 1_000_000);
    }
    let query = |extra: &[&str]| -> Result<f64> {
        let mut samples = Vec::new();
        for _ in 0..5 {
            let mut a: Vec<&str> = vec!["history"];
            a.extend_from_slice(extra);
            a.extend_from_slice(&common);
            a.push("--json");
            samples.push(portwatch(&a)?);
        }
        Ok(median(&mut samples))
    };
    let top30 = query(&["top", "--since", "30d"])?;
    let top24 = query(&["top", "--since", "24h"])?;
    let per_day = query(&["--days"])?;
    let per_hour = query(&["--hours", "--since", "7d"])?;
    println!("history store, {days} days of 5-minute records of {rows} rows ({record_bytes} bytes a record), default retention and cap");
    println!("| measure | figure |");
    println!("|---|---:|");
    println!(
        "| ingest of one record (`history ingest`, its own file, median of the last day's 288) | {:.3} s |",
        median(&mut one_record)
    );
    if !day_ingest.is_empty() {
        println!(
            "| ingest of a day's file (288 records, median of {}) | {:.1} s |",
            day_ingest.len(),
            median(&mut day_ingest)
        );
    }
    println!("| `history top --since 30d --json` (median of 5) | {top30:.3} s |");
    println!("| `history top --since 24h --json` | {top24:.3} s |");
    println!("| `history --days --json` | {per_day:.3} s |");
    println!("| `history --hours --since 7d --json` | {per_hour:.3} s |");
    println!("| database after one day | {} MB |", size_after_day / 1_000_000);
    println!("| database after {days} days | {} MB |", size(&db) / 1_000_000);
    Ok(())
}
