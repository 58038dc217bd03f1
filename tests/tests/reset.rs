//! `portwatch reset`: the lossless reset under traffic (every byte in exactly one snapshot or still
//! counted), selective resets, and a reset whose output cannot be written.

use std::collections::BTreeMap;

use portwatch::generation::Key;
use portwatch_common::{Counters, Direction::Ingress as IN, IPPROTO_TCP, IPPROTO_UDP};
use portwatch_tests::{
    cli::{counters_of, Pw},
    fill_counters, kernel_test, key,
    netns::{Bed, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6},
};
use serde_json::Value;

/// The conservation test: while a sender in the client namespace sends a known number of bytes to
/// two watched ports from four addresses, `portwatch reset --json` runs in a loop. Every snapshot
/// plus the final `top --json` adds up, per key and in total, to exactly what was sent.
#[kernel_test]
fn resets_under_traffic_lose_and_double_count_nothing() {
    let bed = std::sync::Arc::new(Bed::new(false).unwrap());
    let pw = Pw::load(&bed.server, &bed.server_if, &["7002/udp", "7004/udp"]);
    let sources = [
        (CLIENT_V4[0], SERVER_V4),
        (CLIENT_V4[1], SERVER_V4),
        (CLIENT_V6[0], SERVER_V6),
        (CLIENT_V6[1], SERVER_V6),
    ];
    let sender_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let bed = bed.clone();
        std::thread::spawn(move || {
            let mut sent: BTreeMap<Key, Counters> = BTreeMap::new();
            // Bounded: 40 rounds x 4 sources x 2 ports x 100 datagrams.
            for round in 0..40u64 {
                for (i, (src, dst)) in sources.iter().enumerate() {
                    for port in [7002u16, 7004] {
                        let payload = 200 + 10 * i + (round as usize % 7);
                        let bytes = bed.send_udp(src, dst, port, 100, payload).unwrap();
                        *sent.entry(key(src, port, IPPROTO_UDP, IN)).or_default() += Counters { bytes, packets: 100 };
                    }
                }
            }
            sent
        })
    };
    // Two reset loops at once (cron and a person): the lock serializes them.
    let pw = std::sync::Arc::new(pw);
    let resetters: Vec<_> = (0..2)
        .map(|_| {
            let (pw, sender_done) = (pw.clone(), sender_done.clone());
            std::thread::spawn(move || {
                let mut snapshots = vec![];
                while !sender_done.load(std::sync::atomic::Ordering::SeqCst) {
                    snapshots.push(pw.json(&["reset", "--json"]));
                }
                snapshots
            })
        })
        .collect();
    let sent = sender.join().unwrap();
    sender_done.store(true, std::sync::atomic::Ordering::SeqCst);
    let snapshots: Vec<Value> = resetters.into_iter().flat_map(|r| r.join().unwrap()).collect();
    std::thread::sleep(portwatch_tests::bound(0.2));
    let last = pw.json(&["top", "--by", "ip-port", "-n", "0", "--json"]);
    assert!(
        snapshots.len() >= 3,
        "only {} resets ran during the traffic",
        snapshots.len()
    );

    let mut counted: BTreeMap<Key, Counters> = BTreeMap::new();
    let mut totals = Counters::default();
    for v in snapshots.iter().chain(std::iter::once(&last)) {
        totals += counters_of(&v["totals"]);
        assert_eq!(counters_of(&v["overflow"]), Counters::default());
        for r in v["rows"].as_array().unwrap() {
            let proto = if r["proto"] == "tcp" { IPPROTO_TCP } else { IPPROTO_UDP };
            let k = key(r["ip"].as_str().unwrap(), r["port"].as_u64().unwrap() as u16, proto, IN);
            *counted.entry(k).or_default() += counters_of(r);
        }
    }
    let mut sent_total = Counters::default();
    sent.values().for_each(|c| sent_total += *c);
    assert_eq!(
        counted, sent,
        "per key, snapshots + what is still counted = what was sent"
    );
    assert_eq!(totals, sent_total);
    // And the snapshots really split the traffic.
    let nonempty = snapshots
        .iter()
        .filter(|s| !s["rows"].as_array().unwrap().is_empty())
        .count();
    assert!(nonempty >= 2, "{nonempty} non-empty snapshots");
}

/// A selective reset zeroes only what it selects, reports exactly that, and keeps the rest.
#[kernel_test]
fn a_selective_reset_keeps_what_it_does_not_select() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::load(&bed.server, &bed.server_if, &["7002/udp", "7003/udp"]);
    let a = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 10, 100).unwrap();
    let b = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7003, 10, 100).unwrap();
    let c = bed.send_udp(CLIENT_V6[0], SERVER_V6, 7002, 10, 100).unwrap();

    let zeroed = pw.json(&["reset", "--port", "7002", "--ip", "198.18.0.0/16", "--json"]);
    assert_eq!(zeroed["rows"].as_array().unwrap().len(), 1);
    assert_eq!(
        (zeroed["rows"][0]["ip"].as_str(), zeroed["rows"][0]["port"].as_u64()),
        (Some(CLIENT_V4[0]), Some(7002))
    );
    assert_eq!(counters_of(&zeroed["totals"]), Counters { bytes: a, packets: 10 });
    // Twice more after new traffic: the selection spans both generations each time.
    let a2 = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 5, 100).unwrap();
    assert_eq!(
        counters_of(&pw.json(&["reset", "--port", "7002", "--ip", CLIENT_V4[0], "--json"])["totals"]),
        Counters { bytes: a2, packets: 5 }
    );
    assert_eq!(
        counters_of(&pw.json(&["reset", "--port", "7002", "--ip", CLIENT_V4[0], "--json"])["totals"]),
        Counters::default()
    );

    let left = pw.json(&["top", "--by", "ip-port", "--json"]);
    assert_eq!(
        counters_of(&left["totals"]),
        Counters {
            bytes: b + c,
            packets: 20
        }
    );
    let all = pw.json(&["reset", "--json"]);
    assert_eq!(
        counters_of(&all["totals"]),
        Counters {
            bytes: b + c,
            packets: 20
        }
    );
    assert!(pw.json(&["top", "--json"])["rows"].as_array().unwrap().is_empty());

    // The output cannot be written: the reset fails and puts everything back.
    let d = bed.send_udp(CLIENT_V4[1], SERVER_V4, 7003, 7, 100).unwrap();
    let r = pw.run(&["reset", "--json", "--output", "/proc/version"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("nothing was zeroed"), "{}", r.stderr);
    assert_eq!(
        counters_of(&pw.json(&["top", "--json"])["totals"]),
        Counters { bytes: d, packets: 7 }
    );
    // --output appends one JSON line per reset.
    let log = std::env::temp_dir().join(format!("pwt-reset-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    pw.ok(&["reset", "--json", "--output", log.to_str().unwrap()]);
    pw.ok(&["reset", "--json", "--output", log.to_str().unwrap()]);
    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(counters_of(&lines[0]["totals"]), Counters { bytes: d, packets: 7 });
    assert_eq!(counters_of(&lines[1]["totals"]), Counters::default());
    let _ = std::fs::remove_file(&log);
}

/// A reset whose output fails leaves the counters as they were and the log as it was: a path that
/// cannot be opened fails before anything is zeroed; a full disk midway through the snapshot cuts
/// the file back to its old length and puts the counts back, with `--output FILE` and with
/// `>> FILE`; a stdout that fails puts the counts back too.
#[kernel_test]
fn a_reset_that_cannot_write_changes_nothing() {
    let lo = Pw::on_loopback("full", &[]);
    let pw = &lo.pw;
    // 3,000 rows: a JSON snapshot of about 300 kB.
    let entries = portwatch_tests::synthetic_entries(3000);
    fill_counters(&pw.pin, 0, &entries).unwrap();
    let all = Counters {
        bytes: entries.iter().map(|(_, c)| c.bytes).sum(),
        packets: 3000,
    };
    let totals = |pw: &Pw| counters_of(&pw.json(&["top", "--json"])["totals"]);
    assert_eq!(totals(pw), all);

    let r = pw.run(&["reset", "--json", "--output", "/nonexistent-pwt/reset.jsonl"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("opening /nonexistent-pwt/reset.jsonl"),
        "{}",
        r.stderr
    );
    assert_eq!(totals(pw), all);

    // A 64 KiB tmpfs that the test mounts, and unmounts even if it fails.
    struct Tmpfs(std::path::PathBuf);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = nix::mount::umount(&self.0);
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let dir = Tmpfs(std::env::temp_dir().join(format!("pwt-full-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &dir.0,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k"),
    )
    .unwrap();
    let log = dir.0.join("reset.jsonl");
    std::fs::write(&log, "{\"earlier\":true}\n").unwrap();
    let r = pw.run(&["reset", "--json", "--output", log.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("nothing was zeroed"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "{\"earlier\":true}\n");
    assert_eq!(totals(pw), all);

    // The same with `>> log` (stdout appending to the file).
    let mut appending = pw.command(&["reset", "--json"]);
    appending.stdout(std::fs::OpenOptions::new().append(true).open(&log).unwrap());
    let out = appending.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing was zeroed"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "{\"earlier\":true}\n");
    assert_eq!(totals(pw), all);

    let mut to_full = pw.command(&["reset", "--json"]);
    to_full.stdout(std::fs::File::create("/dev/full").unwrap());
    let out = to_full.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing was zeroed"), "{stderr}");
    assert_eq!(totals(pw), all);

    // And a reset that can write takes it all, once.
    let zeroed = pw.json(&["reset", "--json"]);
    assert_eq!(counters_of(&zeroed["totals"]), all);
    assert_eq!(zeroed["rows"].as_array().unwrap().len(), 3000);
    assert_eq!(totals(pw), Counters::default());
}
