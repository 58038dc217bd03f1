//! Many operators at once: for 60 s (`PORTWATCH_CONCURRENCY_SECS`) under traffic from thousands of
//! remote addresses (raw-socket UDP from 4,096 IPv4 and 1,024 IPv6 sources), four workers run
//! `ports add/del`, `top`, `reset --output`, `status`, `metrics` and `apply` at random (seeded:
//! `PORTWATCH_CONCURRENCY_SEED`). None may fail, and the reset records plus the final counters
//! equal what the senders sent, key by key.
//!
//! Readers never starve a change: over many entries (200,000, `PORTWATCH_LOCK_ENTRIES`), three
//! `metrics` loops and a loop of `serve` scrapes keep the shared lock busy while resets run under
//! the same traffic; each reset gets the lock within a bound made of the measured durations of a
//! scrape and a reset, and nothing is lost. `serve` answers the scrapes that arrive during a read
//! of the maps with that read's bytes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use portwatch::generation::Key;
use portwatch_common::{Counters, Direction::Ingress as IN, IPPROTO_UDP};
use portwatch_tests::{
    bound,
    cli::{counters_of, rows_by_key, Pw, Running},
    fill_counters, kernel_test, key,
    netns::{Bed, SERVER_V4, SERVER_V6},
    rng::{seed_from_env, Rng},
    synthetic_entries, wait_scale, TestDir,
};
use serde_json::Value;

const PORTS: [u16; 2] = [7202, 7204];

#[kernel_test]
fn many_commands_at_once_under_traffic_fail_none_and_lose_nothing() {
    let secs: u64 = std::env::var("PORTWATCH_CONCURRENCY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = seed_from_env("PORTWATCH_CONCURRENCY_SEED");
    eprintln!("PORTWATCH_CONCURRENCY_SEED={seed}");
    let bed = Arc::new(Bed::new(false).unwrap());
    let pw = Arc::new(Pw::load(&bed.server, &bed.server_if, &["7202/udp", "7204/udp"]));
    let dir = std::env::temp_dir().join(format!("pwt-concurrency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _dir = RemoveDir(dir.clone());
    let log = dir.join("resets.jsonl");
    let config = dir.join("portwatch.yaml");
    std::fs::write(
        &config,
        format!(
            "pin_path: {}\ninterfaces:\n  - name: {}\nports: [7202/udp, 7204/udp, 9100/udp]\n",
            pw.pin.display(),
            bed.server_if,
        ),
    )
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let sender = send_until(&bed, &stop);

    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let ran = Arc::new(Mutex::new(BTreeMap::<&'static str, usize>::new()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (pw, failures, ran) = (pw.clone(), failures.clone(), ran.clone());
            let (log, config) = (log.clone(), config.clone());
            let mut rng = Rng::new(seed ^ (w + 1));
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let port = format!("{}/udp", 9000 + rng.below(64));
                    let (name, args): (&'static str, Vec<String>) = match rng.below(8) {
                        0 => ("ports add", vec!["ports".into(), "add".into(), port]),
                        1 => ("ports del", vec!["ports".into(), "del".into(), port]),
                        2 => ("top", vec!["top".into(), "--json".into(), "-n".into(), "5".into()]),
                        3 | 4 => (
                            "reset",
                            vec![
                                "reset".into(),
                                "--json".into(),
                                "--output".into(),
                                log.display().to_string(),
                            ],
                        ),
                        5 => ("status", vec!["status".into(), "--json".into()]),
                        6 => ("metrics", vec!["metrics".into()]),
                        _ => ("apply", vec!["apply".into(), "-f".into(), config.display().to_string()]),
                    };
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let r = pw.run(&args);
                    // `ports del` of a port that is not watched is a usage error (exit 2) by design.
                    let ok = r.code == 0 || (name == "ports del" && r.code == 2);
                    if !ok {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{args:?} exited {}: {}", r.code, r.stderr));
                    }
                    *ran.lock().unwrap().entry(name).or_default() += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().unwrap();
    eprintln!("commands run: {:?}", ran.lock().unwrap());
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{} commands failed: {failures:#?}", failures.len());
    let remotes: std::collections::BTreeSet<_> = sent.keys().map(|k| k.remote).collect();
    assert!(remotes.len() > 4096, "traffic from {} remote addresses", remotes.len());

    // The conservation check: every record in the log, plus a last reset, against what was sent.
    pw.ok(&["reset", "--json", "--output", log.to_str().unwrap()]);
    let counted = recorded(&log);
    let last = pw.json(&["top", "--by", "ip-port", "-n", "0", "--json"]);
    assert!(last["rows"].as_array().unwrap().is_empty(), "{last}");
    assert_eq!(counted.len(), sent.len());
    assert!(counted == sent, "records + counters differ from what was sent");
}

/// The counter entries the lock tests read through: `PORTWATCH_LOCK_ENTRIES` (the kernel matrix's
/// emulated machines take fewer), else 200,000.
fn lock_entries() -> u64 {
    std::env::var("PORTWATCH_LOCK_ENTRIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000)
}

/// portwatch loaded on the bed's server, watching `PORTS`, with `entries` known counts (on 443/tcp,
/// which no traffic uses) in the generation the program does not write: what a scrape and a reset
/// read through. Returns them too.
fn load_with_entries(bed: &Bed, entries: u64) -> (Pw, BTreeMap<Key, Counters>) {
    let max_entries = (entries + entries / 10 + 32_768).to_string();
    let pw = Pw::load_with(
        &bed.server,
        &bed.server_if,
        &["7202/udp", "7204/udp"],
        &["--max-entries", &max_entries],
    );
    let filled = synthetic_entries(entries);
    let idle = pw.pinned().active_generation().unwrap() ^ 1;
    fill_counters(&pw.pin, idle, &filled).unwrap();
    (pw, filled.into_iter().collect())
}

/// `serve` on `addr` in the bed's server namespace, once it answers.
fn serve(pw: &Pw, bed: &Bed, addr: &str) -> Running {
    let serve = Running(
        pw.command(&["serve", "--listen", addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while !matches!(bed.server.http_get(addr, "/"), Ok((200, _))) {
        assert!(started.elapsed() < bound(30.0), "serve never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    serve
}

/// The `portwatch_serve_reads_total` of a scrape of `serve`: which read of the maps it is from.
fn read_of(body: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix("portwatch_serve_reads_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no portwatch_serve_reads_total: {body}"))
}

/// Three `metrics` loops and a loop of HTTP scrapes of `serve`, over many entries, keep the shared
/// lock held without a gap (flock alone would keep a reset out for as long as they went on);
/// meanwhile resets of the traffic's ports, under traffic, one after another. Each ends within
/// five times a scrape under that load plus a reset alone (generous: it waits for the scrapes
/// already reading, then works while the loops and the traffic share the CPUs), and the records
/// plus the last counts are what was put in and sent, to the byte.
#[kernel_test]
fn resets_are_not_starved_by_scrapes_and_lose_nothing() {
    const RESETS: u32 = 5;
    let entries = lock_entries();
    let bed = Arc::new(Bed::new(false).unwrap());
    let (pw, filled) = load_with_entries(&bed, entries);
    let pw = Arc::new(pw);
    let dir = TestDir::new("lock");
    let log = dir.join("resets.jsonl");
    let log_arg = log.display().to_string();
    let reset_args: Vec<String> = [
        "reset", "--json", "--output", &log_arg, "--port", "7202/udp", "--port", "7204/udp",
    ]
    .map(String::from)
    .to_vec();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = send_until(&bed, &stop);

    let timed = |pw: &Pw, args: &[&str]| {
        let started = Instant::now();
        pw.ok(args);
        started.elapsed()
    };
    let reset_args_str: Vec<&str> = reset_args.iter().map(String::as_str).collect();
    let mut alone: Vec<Duration> = (0..3).map(|_| timed(&pw, &["metrics"])).collect();
    alone.sort();
    let scrape = alone[1];
    let reset = timed(&pw, &reset_args_str);
    eprintln!("{entries} entries: alone, a scrape takes {scrape:?} (median of 3), a reset {reset:?}");

    let addr = "127.0.0.1:9815";
    let mut served = serve(&pw, &bed, addr);
    let scraping = Arc::new(AtomicBool::new(true));
    let loops: Vec<_> = (0..4)
        .map(|i| {
            let (pw, bed, scraping) = (pw.clone(), bed.clone(), scraping.clone());
            std::thread::spawn(move || {
                let mut took = vec![];
                while scraping.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    if i < 3 {
                        let r = pw.run(&["metrics"]);
                        assert_eq!(r.code, 0, "metrics: {}", r.stderr);
                    } else {
                        let (code, body) = bed.server.http_get(addr, "/metrics").unwrap();
                        assert_eq!(code, 200, "{body}");
                    }
                    took.push(started.elapsed());
                }
                took
            })
        })
        .collect();
    // The scrapes overlap before the first reset comes.
    std::thread::sleep(scrape * 3);
    let resets = {
        let (pw, reset_args) = (pw.clone(), reset_args.clone());
        std::thread::spawn(move || {
            let args: Vec<&str> = reset_args.iter().map(String::as_str).collect();
            (0..RESETS)
                .map(|_| {
                    std::thread::sleep(scrape);
                    let started = Instant::now();
                    pw.ok(&args);
                    started.elapsed()
                })
                .collect::<Vec<_>>()
        })
    };
    // A starved reset must still end (and fail the test): the scrapes stop at the latest when
    // every reset has had 30 times what a scrape and a reset take alone (scaled as every wait).
    let latest = Instant::now() + (scrape + reset).mul_f64(30.0 * wait_scale()) * (RESETS + 1);
    while !resets.is_finished() && Instant::now() < latest {
        std::thread::sleep(Duration::from_millis(20));
    }
    scraping.store(false, Ordering::SeqCst);
    let took = resets.join().unwrap();
    let mut scrapes: Vec<Duration> = loops.into_iter().flat_map(|l| l.join().unwrap()).collect();
    scrapes.sort();
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().unwrap();
    assert_eq!(served.terminate().code(), Some(0));
    // A reset waits for the scrapes already reading (about one scrape: the loops and the traffic
    // share the CPUs), then does what it does alone, slower too: five times both is generous
    // (scaled as every wait).
    let under_load = scrapes[scrapes.len() / 2];
    let limit = (under_load + reset).mul_f64(5.0 * wait_scale());
    eprintln!(
        "{} scrapes under load: median {under_load:?}, max {:?}; the resets took {took:?} (limit {limit:?})",
        scrapes.len(),
        scrapes[scrapes.len() - 1]
    );
    for (n, t) in took.iter().enumerate() {
        assert!(
            *t < limit,
            "reset {n} took {t:?}, more than {limit:?}: starved by the scrapes"
        );
    }

    // The records of every reset and a last one of everything, against what was put in and sent.
    pw.ok(&["reset", "--json", "--output", &log_arg]);
    let mut expected = sent;
    expected.extend(filled);
    let counted = recorded(&log);
    assert_eq!(counted.len(), expected.len());
    assert!(
        counted == expected,
        "records + counters differ from what was put in and sent"
    );
}

/// Scrapes that reach `serve` while it reads the maps get that read's answer: eight at once, over
/// many entries, are answered by fewer reads than scrapes, every answer of a read the same bytes;
/// nothing is kept after a read (the next scrape is the next read).
#[kernel_test]
fn serve_answers_scrapes_that_come_during_a_read_with_that_read() {
    const AT_ONCE: usize = 8;
    let bed = Bed::new(false).unwrap();
    let (pw, _) = load_with_entries(&bed, lock_entries());
    let addr = "127.0.0.1:9816";
    let mut served = serve(&pw, &bed, addr);
    let mut previous = read_of(&bed.server.http_get(addr, "/metrics").unwrap().1);
    let mut shared = false;
    // Eight clients started together reach serve within one read as a rule; a few tries, in case
    // the machine scheduled them apart.
    for attempt in 0..5 {
        let together = std::sync::Barrier::new(AT_ONCE);
        let bodies: Vec<String> = std::thread::scope(|scope| {
            let clients: Vec<_> = (0..AT_ONCE)
                .map(|_| {
                    scope.spawn(|| {
                        together.wait();
                        let (code, body) = bed.server.http_get(addr, "/metrics").unwrap();
                        assert_eq!(code, 200, "{body}");
                        body
                    })
                })
                .collect();
            clients.into_iter().map(|c| c.join().unwrap()).collect()
        });
        let mut by_read: BTreeMap<u64, Vec<&String>> = BTreeMap::new();
        for body in &bodies {
            by_read.entry(read_of(body)).or_default().push(body);
        }
        for (read, answers) in &by_read {
            assert!(answers.iter().all(|b| *b == answers[0]), "read {read}: answers differ");
        }
        // Every read answered someone, none before: the reads are the next ones, in order.
        let reads: Vec<u64> = by_read.keys().copied().collect();
        assert_eq!(
            reads,
            (previous + 1..=previous + reads.len() as u64).collect::<Vec<_>>()
        );
        let after = read_of(&bed.server.http_get(addr, "/metrics").unwrap().1);
        assert_eq!(
            after,
            previous + reads.len() as u64 + 1,
            "a scrape after the others reads afresh"
        );
        previous = after;
        eprintln!(
            "attempt {attempt}: {AT_ONCE} scrapes at once, answered by {} reads ({:?} answers each)",
            reads.len(),
            by_read.values().map(Vec::len).collect::<Vec<_>>()
        );
        if reads.len() < AT_ONCE {
            shared = true;
            break;
        }
    }
    assert!(shared, "every scrape read the maps itself");
    assert_eq!(served.terminate().code(), Some(0));
}

/// Spoofed UDP to both ports from 4,096 IPv4 and 1,024 IPv6 sources, each of them many times,
/// until `stop` (and at least once from every source); the thread returns what it sent, per key
/// (L3 bytes).
fn send_until(bed: &Arc<Bed>, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<BTreeMap<Key, Counters>> {
    let v4: Vec<IpAddr> = (0..4096u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + i)))
        .collect();
    let v6: Vec<IpAddr> = (0..1024u128)
        .map(|i| {
            IpAddr::V6(Ipv6Addr::from(
                u128::from("2001:db8:1::".parse::<Ipv6Addr>().unwrap()) + i + 1,
            ))
        })
        .collect();
    bed.accept_any_source().unwrap();
    let (bed, stop) = (bed.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut sent: BTreeMap<Key, Counters> = BTreeMap::new();
        let mut round = 0usize;
        // Every source at least once (24 rounds), then until stopped; bounded: 10,000 rounds.
        while (!stop.load(Ordering::SeqCst) || round < 24) && round < 10_000 {
            let (sources, dst, nth) = if round % 4 < 3 {
                (&v4, SERVER_V4, round / 4 * 3 + round % 4)
            } else {
                (&v6, SERVER_V6, round / 4)
            };
            // The next slice of 256 sources, to both ports: every source sends many times.
            let start = (nth * 256) % sources.len();
            let slice = &sources[start..start + 256];
            let size = 20 + round % 50;
            for port in PORTS {
                let l3 = bed.send_spoofed_udp(slice, dst, port, size).unwrap();
                for src in slice {
                    *sent.entry(key(&src.to_string(), port, IPPROTO_UDP, IN)).or_default() +=
                        Counters { bytes: l3, packets: 1 };
                }
            }
            round += 1;
        }
        eprintln!("the sender sent {round} rounds of 2 x 256 datagrams");
        sent
    })
}

/// Every record in the reset log, summed per key.
fn recorded(log: &std::path::Path) -> BTreeMap<Key, Counters> {
    let mut counted: BTreeMap<Key, Counters> = BTreeMap::new();
    let text = std::fs::read_to_string(log).unwrap();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(counters_of(&v["overflow"]), Counters::default());
        for (k, c) in rows_by_key(&v) {
            *counted.entry(k).or_default() += c;
        }
    }
    counted
}
