//! The history store: reset records ingested exactly once (twice over, a grown file, a rotated
//! `.gz`, a torn last line, ingests killed at random instants), retention and the per-bucket cap
//! over generated records spanning 400 days, bad input refused with one line and exit code 8
//! leaving the database as it was; and, on a real kernel, records of real resets under traffic.

use std::{
    collections::BTreeMap,
    io::Write,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use portwatch_tests::{
    cli::{portwatch_bin, Pw},
    kernel_test,
    netns::{Bed, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6},
    rng::Rng,
    TestDir,
};
use serde_json::Value;

/// A row of a generated record: (remote, port, bytes, packets); a remote with `/` is a prefix row,
/// `*` the port alone (the per-port overflow's row).
type Row = (String, u16, u64, u64);

/// One reset record as `reset --json` writes it.
fn record(time: i64, id: Option<&str>, rows: &[Row]) -> String {
    let rows: Vec<Value> = rows
        .iter()
        .map(|(remote, port, bytes, packets)| {
            let mut row = serde_json::json!({"port": port, "proto": "tcp", "direction": "ingress",
                "bytes": bytes, "packets": packets});
            if remote == "*" {
                row["tier"] = "port".into();
            } else if remote.contains('/') {
                row["cidr"] = remote.as_str().into();
                row["tier"] = "prefix".into();
            } else {
                row["ip"] = remote.as_str().into();
            }
            row
        })
        .collect();
    let mut value = serde_json::json!({"time": time, "reset": true, "rows": rows,
        "totals": {"bytes": 0, "packets": 0}, "overflow": {"bytes": 0, "packets": 0}});
    if let Some(id) = id {
        value["reset_id"] = id.into();
    }
    value.to_string() + "\n"
}

/// `count` records 5 minutes apart from `start`, each from some of 40 remotes (IPv4, IPv6, a
/// prefix) on two ports, with figures that differ per record.
fn records(rng: &mut Rng, start: i64, count: usize, first_id: usize) -> (String, Vec<(i64, Vec<Row>)>) {
    let mut text = String::new();
    let mut all = Vec::new();
    for r in 0..count {
        let mut rows = Vec::new();
        for i in 0..40u64 {
            if rng.below(3) == 0 {
                continue;
            }
            let remote = match i % 8 {
                _ if i >= 38 => "*".to_string(),
                0 => format!("2001:db8::{:x}", 0x100 + i),
                7 => format!("198.51.{i}.0/24"),
                _ => format!("198.18.0.{i}"),
            };
            let port = if i % 2 == 0 { 443 } else { 8443 };
            rows.push((
                remote,
                port,
                1 + rng.below(1_000_000) as u64,
                1 + rng.below(1000) as u64,
            ));
        }
        let time = start + 300 * r as i64;
        text += &record(time, Some(&format!("{:016x}", first_id + r)), &rows);
        all.push((time, rows));
    }
    (text, all)
}

/// The store's figures are the records', key by key (a failure shows the first differences, not
/// two maps of thousands of keys).
fn same(stored: &BTreeMap<(String, u16), (u64, u64)>, sent: &BTreeMap<(String, u16), (u64, u64)>) {
    let differ: Vec<String> = sent
        .keys()
        .chain(stored.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| stored.get(*k) != sent.get(*k))
        .take(5)
        .map(|k| format!("{k:?}: stored {:?}, sent {:?}", stored.get(k), sent.get(k)))
        .collect();
    assert!(
        differ.is_empty(),
        "{} keys stored, {} sent; first differences: {differ:#?}",
        stored.len(),
        sent.len()
    );
}

/// Remote and port to bytes and packets, summed.
fn sums<'a>(records: impl IntoIterator<Item = &'a (i64, Vec<Row>)>) -> BTreeMap<(String, u16), (u64, u64)> {
    let mut out = BTreeMap::new();
    for (_, rows) in records {
        for (remote, port, bytes, packets) in rows {
            let e = out.entry((remote.clone(), *port)).or_insert((0, 0));
            e.0 += bytes;
            e.1 += packets;
        }
    }
    out
}

fn pw(args: &[&str]) -> Output {
    Command::new(portwatch_bin())
        .args(args)
        .env_remove("PORTWATCH_PIN_PATH")
        // Daily and monthly buckets are local days: the tests' are UTC days.
        .env("TZ", "UTC")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = pw(args);
    assert!(
        out.status.success(),
        "portwatch {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ingest(db: &Path, files: &[&Path]) -> String {
    let mut args = vec![
        "history",
        "ingest",
        "--config",
        "/nonexistent",
        "--db",
        db.to_str().unwrap(),
    ];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    ok(&args)
}

/// `history top --by ip-port` over everything, as remote and port to bytes and packets (`*`: the
/// port alone).
fn stored(db: &Path) -> BTreeMap<(String, u16), (u64, u64)> {
    stored_since(db, None)
}

/// `history ARGS --json` of the store `db`.
fn asked(db: &Path, args: &[&str]) -> Value {
    let mut all = vec!["history"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", "/nonexistent", "--db", db.to_str().unwrap(), "--json"]);
    serde_json::from_str(&ok(&all)).unwrap()
}

fn stored_since(db: &Path, since: Option<&str>) -> BTreeMap<(String, u16), (u64, u64)> {
    let mut args = vec!["top", "--by", "ip-port", "-n", "0"];
    if let Some(since) = since {
        args.extend(["--since", since]);
    }
    let v = asked(db, &args);
    let mut out = BTreeMap::new();
    for row in v["rows"].as_array().unwrap() {
        let remote = row["ip"].as_str().or(row["cidr"].as_str()).unwrap_or("*").to_string();
        let port = row["port"].as_u64().unwrap() as u16;
        out.insert(
            (remote, port),
            (row["bytes"].as_u64().unwrap(), row["packets"].as_u64().unwrap()),
        );
    }
    out
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn gzip(from: &Path, to: &Path) {
    let out = Command::new("gzip").arg("-c").arg(from).output().unwrap();
    assert!(out.status.success());
    std::fs::write(to, out.stdout).unwrap();
}

#[test]
fn every_record_is_ingested_once() {
    let dir = TestDir::new("once");
    let (db, log) = (dir.join("h.db"), dir.join("portwatch.jsonl"));
    let mut rng = Rng::new(7);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let start = now - 3 * 3600;
    let (text, mut sent) = records(&mut rng, start, 24, 0);
    append(&log, &text);
    assert!(ingest(&db, &[&log]).contains("24 records"));
    same(&stored(&db), &sums(&sent));

    // Twice: nothing new.
    assert!(ingest(&db, &[&log]).contains("0 records"));
    same(&stored(&db), &sums(&sent));

    // The file grew: only what is new.
    let (more, more_sent) = records(&mut rng, start + 24 * 300, 6, 24);
    append(&log, &more);
    assert!(ingest(&db, &[&log]).contains("6 records"));
    sent.extend(more_sent);
    same(&stored(&db), &sums(&sent));

    // Rotated and compressed (logrotate), then a new file: the .gz adds nothing.
    let rotated = dir.join("portwatch.jsonl.1.gz");
    gzip(&log, &rotated);
    std::fs::remove_file(&log).unwrap();
    let (fresh, fresh_sent) = records(&mut rng, start + 30 * 300, 3, 30);
    append(&log, &fresh);
    let out = ingest(&db, &[&rotated, &log]);
    assert!(out.contains("0 records (0 rows) added, 30 already"), "{out}");
    sent.extend(fresh_sent);
    same(&stored(&db), &sums(&sent));

    // Truncated and rewritten in place (logrotate's copytruncate), longer than before: the same
    // inode, a different file, read from its start.
    let copied = dir.join("copied.jsonl");
    let (short, short_sent) = records(&mut rng, start + 50 * 300, 2, 50);
    append(&copied, &short);
    ingest(&db, &[&copied]);
    let (long, long_sent) = records(&mut rng, start + 52 * 300, 5, 52);
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&copied)
        .unwrap();
    append(&copied, &long);
    assert!(ingest(&db, &[&copied]).contains("5 records"));
    sent.extend(short_sent);
    sent.extend(long_sent);
    same(&stored(&db), &sums(&sent));

    // Records without a reset_id: keyed by offset and hash, the same read again or gzipped.
    let bare = dir.join("bare.jsonl");
    let rows = vec![("198.18.1.1".to_string(), 443u16, 1000u64, 10u64)];
    let line = record(start + 40 * 300, None, &rows);
    append(&bare, &line);
    append(&bare, &line.replace("1000", "2000"));
    ingest(&db, &[&bare]);
    ingest(&db, &[&bare]);
    let bare_gz = dir.join("bare.jsonl.1.gz");
    gzip(&bare, &bare_gz);
    ingest(&db, &[&bare_gz]);
    sent.push((0, vec![("198.18.1.1".to_string(), 443, 3000, 20)]));
    same(&stored(&db), &sums(&sent));

    // A torn last line waits for its end.
    let (torn, torn_sent) = records(&mut rng, start + 41 * 300, 2, 41);
    let cut = torn.len() - 20;
    append(&log, &torn[..cut]);
    let out = ingest(&db, &[&log]);
    assert!(out.contains("1 record ") && out.contains("not complete"), "{out}");
    append(&log, &torn[cut..]);
    assert!(ingest(&db, &[&log]).contains("1 record "));
    sent.extend(torn_sent);
    same(&stored(&db), &sums(&sent));

    // `history top` and `history` agree on the totals, and say which buckets answered.
    let top = asked(&db, &["top"]);
    let total: u64 = sums(&sent).values().map(|v| v.0).sum();
    assert_eq!(top["totals"]["bytes"], total);
    assert_eq!(top["history"]["granularity"], "5-minute");
    let days = asked(&db, &["--days"]);
    assert_eq!(days["totals"]["bytes"], total);
}

#[test]
fn ingests_killed_at_random_instants_leave_every_record_once() {
    let dir = TestDir::new("killed");
    let (db, log) = (dir.join("h.db"), dir.join("portwatch.jsonl"));
    let mut rng = Rng::new(11);
    // Enough rows that an ingest takes a while: 300 records of 800 rows (under the cap), or
    // PORTWATCH_HISTORY_RECORDS (fewer under emulation: tests/kernels.sh).
    let records: i64 = std::env::var("PORTWATCH_HISTORY_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut sent = Vec::new();
    let mut text = String::new();
    for r in 0..records {
        let rows: Vec<Row> = (0..800u64)
            .map(|i| {
                (
                    format!("198.18.{}.{}", i / 256, i % 256),
                    443,
                    1 + rng.below(100_000) as u64,
                    1 + rng.below(100) as u64,
                )
            })
            .collect();
        text += &record(1_790_000_000 + 300 * r, Some(&format!("{r:016x}")), &rows);
        sent.push((0, rows));
    }
    append(&log, &text);
    // Time one whole ingest into a scratch database, then kill others at instants across it.
    let scratch = dir.join("scratch.db");
    let began = Instant::now();
    ingest(&scratch, &[&log]);
    let whole = began.elapsed();
    let mut killed = 0;
    for _ in 0..6 {
        let at = Duration::from_micros(rng.below(whole.as_micros() as usize + 1) as u64);
        let mut child = Command::new(portwatch_bin())
            .args(["history", "ingest", "--config", "/nonexistent", "--db"])
            .arg(&db)
            .arg(&log)
            .env("TZ", "UTC")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        // Whatever the kill left, what the store holds is whole records: a subset of the sums,
        // each record all or nothing (checked at the end, after the last ingest).
    }
    eprintln!("{killed} of 6 ingests were killed before they finished (one takes {whole:?})");
    ingest(&db, &[&log]);
    same(&stored(&db), &sums(&sent));
}

#[test]
fn retention_and_the_cap_over_400_days() {
    let dir = TestDir::new("retention");
    let (db, log) = (dir.join("h.db"), dir.join("portwatch.jsonl"));
    // One record a day at noon UTC for 410 days, then a day of 5-minute records, then one record
    // of 1,500 remotes on one port (the cap keeps 1,000).
    let newest = 1_796_000_000i64 - 1_796_000_000 % 86400 + 12 * 3600;
    let first = newest - 410 * 86400;
    let mut sent = Vec::new();
    let mut text = String::new();
    for d in 0..410i64 {
        let rows = vec![("198.18.0.1".to_string(), 443u16, 1000 + d as u64, 1u64)];
        text += &record(first + d * 86400, Some(&format!("d{d}")), &rows);
        sent.push((first + d * 86400, rows));
    }
    for m in 0..288i64 {
        let rows = vec![("198.18.0.2".to_string(), 443u16, 10, 1)];
        let t = newest - 86400 + 300 * m;
        text += &record(t, Some(&format!("m{m}")), &rows);
        sent.push((t, rows));
    }
    let wide: Vec<Row> = (0..1500u64)
        .map(|i| (format!("198.19.{}.{}", i / 256, i % 256), 8443, 100_000 - i, 2))
        .collect();
    text += &record(newest, Some("wide"), &wide);
    sent.push((newest, wide));
    append(&log, &text);
    ingest(&db, &[&log]);

    let json = |args: &[&str]| asked(&db, args);
    let total: u64 = sums(&sent).values().map(|v| v.0).sum();
    // Monthly buckets are kept for ever: the months add up to everything.
    assert_eq!(json(&["--months"])["totals"]["bytes"], total);
    // Daily: 400 days back from the newest record: the first 10 days' buckets are expired.
    let days = json(&["--days"]);
    assert_eq!(days["cut"], first + 10 * 86400 - 12 * 3600, "{days}");
    let expired: u64 = (0..10).map(|d| 1000 + d).sum();
    assert_eq!(days["totals"]["bytes"], total - expired);
    // Hourly: 35 days; 5-minute: 48 hours, as the answer says.
    let hours = json(&["--hours"]);
    let kept_from = hours["cut"].as_i64().unwrap();
    assert!((newest - 150 - 35 * 86400 - 3600..=newest - 35 * 86400).contains(&kept_from));
    let five = json(&["--five-minutes"]);
    let kept_from = five["cut"].as_i64().unwrap();
    assert!((newest - 150 - 2 * 86400 - 300..=newest - 2 * 86400).contains(&kept_from));
    // Each window from the finest buckets that still hold its start, at most 100 of them.
    let at = utc_minute;
    let granularity = |since: i64| json(&["top", "--since", &at(since), "-n", "1"])["history"]["granularity"].clone();
    assert_eq!(granularity(newest - 6 * 3600), "5-minute");
    assert_eq!(granularity(newest - 2 * 86400), "hourly");
    assert_eq!(granularity(newest - 30 * 86400), "daily");
    assert_eq!(granularity(newest - 300 * 86400), "monthly");
    assert_eq!(granularity(first), "monthly");

    // The cap: 1,000 remotes of port 8443 in each bucket, the other 500 in `other`, in totals.
    let top = json(&[
        "top",
        "--port",
        "8443",
        "-n",
        "0",
        "--by",
        "ip-port",
        "--since",
        &at(newest - 3600),
    ]);
    assert_eq!(top["rows"].as_array().unwrap().len(), 1000);
    let other: u64 = (1000..1500u64).map(|i| 100_000 - i).sum();
    assert_eq!(top["history"]["other"]["bytes"], other);
    let all: u64 = (0..1500u64).map(|i| 100_000 - i).sum();
    assert_eq!(top["totals"]["bytes"], all);
    // The heaviest are the ones kept.
    assert_eq!(top["rows"][0]["ip"], "198.19.0.0");
}

/// `t` as `--since` takes a date and time (the test runs portwatch with TZ=UTC).
fn utc_minute(t: i64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{t}"), "+%Y-%m-%d %H:%M"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs `history ARGS --db DB`, expecting exit code 8 and one line on stderr.
fn refused(db: &Path, args: &[&str]) -> String {
    let mut all = vec!["history"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", "/nonexistent", "--db", db.to_str().unwrap()]);
    let out = pw(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(8), "{all:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn bad_input_is_refused_in_one_line_and_changes_nothing() {
    let dir = TestDir::new("bad");
    let (db, log) = (dir.join("h.db"), dir.join("portwatch.jsonl"));
    let mut rng = Rng::new(3);
    let (text, sent) = records(&mut rng, 1_790_000_000, 5, 0);
    append(&log, &text);
    ingest(&db, &[&log]);

    // A line that is not a reset record (a `top --json` line), after good ones: nothing of that
    // file is ingested.
    let mixed = dir.join("mixed.jsonl");
    let (good, _) = records(&mut rng, 1_790_100_000, 2, 100);
    append(&mixed, &good);
    append(&mixed, "{\"time\":1,\"rows\":[]}\n");
    let e = refused(&db, &["ingest", mixed.to_str().unwrap()]);
    assert!(e.contains("not a reset record") && e.contains("byte"), "{e}");
    append(&dir.join("junk.jsonl"), "hello\n");
    refused(&db, &["ingest", dir.join("junk.jsonl").to_str().unwrap()]);
    same(&stored(&db), &sums(&sent));

    // A damaged database, and a file that is no database: refused, left as they are.
    let garbage = dir.join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let e = refused(&garbage, &["ingest", log.to_str().unwrap()]);
    assert!(
        e.contains("damaged") || e.contains("not a portwatch history database"),
        "{e}"
    );
    assert_eq!(std::fs::read(&garbage).unwrap(), vec![0x5a; 8192]);
    refused(&garbage, &["top"]);

    // A database of another schema version.
    let other = dir.join("other.db");
    std::fs::copy(&db, &other).unwrap();
    let c = rusqlite::Connection::open(&other).unwrap();
    c.pragma_update(None, "user_version", 7).unwrap();
    drop(c);
    let before = std::fs::read(&other).unwrap();
    let e = refused(&other, &["ingest", log.to_str().unwrap()]);
    assert!(e.contains("schema version 7"), "{e}");
    refused(&other, &["top"]);
    assert_eq!(std::fs::read(&other).unwrap(), before);

    // A directory that cannot be written (root writes anywhere but in /proc).
    let e = refused(
        Path::new("/proc/portwatch/history.db"),
        &["ingest", log.to_str().unwrap()],
    );
    assert!(e.contains("/proc/portwatch"), "{e}");
    // No database yet: says how to make one.
    let e = refused(&dir.join("none.db"), &["top"]);
    assert!(e.contains("history ingest"), "{e}");
}

/// Records of real resets under traffic: ingested, `history top` is the sum of their rows and what
/// was sent.
/// A store without records yet answers each query in that query's own shape: `history top
/// --json` as `top --json` (no rows, zero totals), `--csv` with its header alone, `history
/// --json` with no periods; the table says there is nothing yet.
#[test]
fn an_empty_store_answers_in_each_querys_shape() {
    let dir = TestDir::new("empty");
    let (db, empty, log) = (dir.join("h.db"), dir.join("empty.jsonl"), dir.join("portwatch.jsonl"));
    append(&empty, "");
    ingest(&db, &[&empty]);
    let top = asked(&db, &["top"]);
    assert_eq!(top["rows"], serde_json::json!([]), "{top}");
    assert_eq!(top["totals"], serde_json::json!({"bytes": 0, "packets": 0}), "{top}");
    assert_eq!(asked(&db, &["--days"])["periods"], serde_json::json!([]));
    let args = |more: &[&'static str]| -> Vec<String> {
        [
            "history",
            "top",
            "--config",
            "/nonexistent",
            "--db",
            db.to_str().unwrap(),
        ]
        .iter()
        .chain(more)
        .map(|a| a.to_string())
        .collect()
    };
    let run = |more: &[&'static str]| ok(&args(more).iter().map(String::as_str).collect::<Vec<_>>());
    let empty_csv = run(&["--csv"]);
    assert!(run(&[]).contains("no records in the history store yet"));

    // The same queries once the store has records: the same keys (and a `history` window), the
    // same CSV header.
    let (text, _) = records(&mut Rng::new(5), 1_790_000_000, 3, 0);
    append(&log, &text);
    ingest(&db, &[&log]);
    let full = asked(&db, &["top"]);
    let keys = |v: &Value| {
        v.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    let mut expected = keys(&top);
    expected.insert("history".to_string());
    assert_eq!(keys(&full), expected, "{top}\n{full}");
    assert_eq!(
        empty_csv.lines().collect::<Vec<_>>(),
        [run(&["--csv"]).lines().next().unwrap()]
    );
}

#[kernel_test]
fn records_of_real_resets_are_the_history() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::load(&bed.server, &bed.server_if, &["7002/udp", "7003/udp"]);
    let dir = TestDir::new("real");
    let (db, log) = (dir.join("h.db"), dir.join("portwatch.jsonl"));
    let sends: [(&str, &str, u16, usize, usize); 3] = [
        (CLIENT_V4[0], SERVER_V4, 7002, 40, 1000),
        (CLIENT_V6[1], SERVER_V6, 7003, 30, 500),
        (CLIENT_V4[1], SERVER_V4, 7003, 20, 100),
    ];
    let mut expected: BTreeMap<(String, u16), (u64, u64)> = BTreeMap::new();
    for round in 0..3 {
        for (i, (src, dst, port, count, size)) in sends.iter().enumerate() {
            if (round + i) % 3 == 2 {
                continue;
            }
            bed.send_udp(src, dst, *port, *count, *size).unwrap();
            let per = (if src.contains(':') { 40 } else { 20 } + 8 + *size) as u64;
            let e = expected.entry((src.to_string(), *port)).or_insert((0, 0));
            e.0 += per * *count as u64;
            e.1 += *count as u64;
        }
        pw.ok(&["reset", "--json", "--output", log.to_str().unwrap()]);
        ingest(&db, &[&log]);
    }
    // The records' rows, summed.
    let mut recorded: BTreeMap<(String, u16), (u64, u64)> = BTreeMap::new();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        for row in v["rows"].as_array().unwrap() {
            let e = recorded
                .entry((
                    row["ip"].as_str().unwrap().to_string(),
                    row["port"].as_u64().unwrap() as u16,
                ))
                .or_insert((0, 0));
            e.0 += row["bytes"].as_u64().unwrap();
            e.1 += row["packets"].as_u64().unwrap();
        }
    }
    assert_eq!(recorded, expected);
    same(&stored_since(&db, Some("1h")), &expected);
}

/// The `history:` section of the configuration file: its database, cap and retention apply; a bad
/// duration is refused as a bad configuration (exit code 2); flags win over the file.
#[test]
fn the_configuration_file_section_applies() {
    let dir = TestDir::new("config");
    let (config, log, db) = (
        dir.join("portwatch.yaml"),
        dir.join("portwatch.jsonl"),
        dir.join("c.db"),
    );
    std::fs::write(
        &config,
        format!(
            "ports: [443]\nhistory:\n  db: {}\n  cap: 2\n  retention:\n    five_minutes: 1h\n",
            db.display()
        ),
    )
    .unwrap();
    let rows: Vec<Row> = (0..5u64).map(|i| (format!("198.18.0.{i}"), 443, 100 - i, 1)).collect();
    append(&log, &record(1_790_000_000, Some("a"), &rows));
    // `history VERB --config FILE ARGS`, its JSON when it prints one.
    let history = |verb: &str, args: &[&str]| -> String {
        let mut all = vec!["history", verb, "--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        ok(&all)
    };
    history("ingest", &[log.to_str().unwrap()]);
    let top: Value = serde_json::from_str(&history("top", &["-n", "0", "--json"])).unwrap();
    assert_eq!(top["rows"].as_array().unwrap().len(), 2, "{top}");
    assert_eq!(top["history"]["other"]["bytes"], 98 + 97 + 96);
    assert_eq!(top["totals"]["bytes"], 100 + 99 + 98 + 97 + 96);
    // --cap on the command line wins: a new database with every remote.
    let flagged = dir.join("flagged.db");
    let flagged = flagged.to_str().unwrap();
    history("ingest", &["--db", flagged, "--cap", "10", log.to_str().unwrap()]);
    let top: Value = serde_json::from_str(&history("top", &["--db", flagged, "-n", "0", "--json"])).unwrap();
    assert_eq!(top["rows"].as_array().unwrap().len(), 5);

    std::fs::write(&config, "ports: [443]\nhistory:\n  retention:\n    hours: a while\n").unwrap();
    let out = pw(&[
        "history",
        "ingest",
        "--config",
        config.to_str().unwrap(),
        log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("history.retention"));
}
