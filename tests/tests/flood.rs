//! A spoofed flood: far more distinct remote addresses than the counter map holds, through the
//! programs of a real `portwatch load` (`BPF_PROG_TEST_RUN` on its pinned programs, so into its
//! pinned maps). Nothing is lost: the keys that fit hold their traffic to the byte, the rest is in
//! the overflow keys and in `stats.map_full_*`, and `top` and `reset` work on the full map.
//!
//! `PORTWATCH_FLOOD_SOURCES=N` sets the distinct sources (default 100,000: 100 times the map;
//! 1,000,000 is 131,072 IPv4 and 868,928 IPv6 ones).

use std::collections::BTreeMap;

use portwatch::generation::{sum, Key, Remote};
use portwatch_common::{
    Counters,
    Direction::{Egress as EG, Ingress as IN},
};
use portwatch_tests::{
    cli::{counters_of, Pw},
    flood::{counted, frame, remote, PinnedPrograms},
    kernel_test,
};

const MAX_ENTRIES: u64 = 1000;
const DEFAULT_SOURCES: u64 = 100_000;
/// The first sources come back after the map is full, with far more bytes: keys that exist
/// still count in place, and `top` must rank them.
const HEAVY: u64 = 5;
/// Replies to this many new remote addresses after the map is full: the egress overflow key.
const EGRESS_REMOTES: u64 = 1000;

/// Every entry of both counter generations, overflow keys included.
fn all_counters(pw: &Pw) -> BTreeMap<Key, Counters> {
    let mut all = BTreeMap::new();
    pw.pinned()
        .for_each_count(|k, v| *all.entry(k).or_insert_with(Counters::default) += v)
        .unwrap();
    all
}

#[kernel_test]
fn a_spoofed_flood_is_counted_exactly_past_the_per_ip_map_and_top_and_reset_still_work() {
    let sources: u64 = std::env::var("PORTWATCH_FLOOD_SOURCES")
        .map(|s| s.parse().expect("PORTWATCH_FLOOD_SOURCES is a count"))
        .unwrap_or(DEFAULT_SOURCES);
    assert!(sources > 10 * MAX_ENTRIES);
    let lo = Pw::on_loopback("flood", &["--max-entries", &MAX_ENTRIES.to_string()]);
    let pw = &lo.pw;
    let mut progs = PinnedPrograms::open(&pw.pin).unwrap();

    let mut sent = Counters::default();
    let mut keys: BTreeMap<Key, Counters> = BTreeMap::new();
    let mut past_per_ip = Counters::default();
    let started = std::time::Instant::now();
    // Every source once, in order: the first MAX_ENTRIES fill the map, the others find it full.
    for i in 0..sources {
        let ip = remote(i);
        let p = frame(ip, IN, (i % 97) as usize);
        progs.run(IN, &p.build(), 1).unwrap();
        let (key, c) = counted(ip, IN, &p);
        sent += c;
        if i < MAX_ENTRIES {
            keys.insert(key, c);
        } else {
            past_per_ip += c;
        }
    }
    let flood_secs = started.elapsed().as_secs_f64();
    // The heavy hitters come back: their keys exist, so they count in place in the full map.
    for k in 0..HEAVY {
        let ip = remote(k);
        let p = frame(ip, IN, 1400);
        let times = 10 * (HEAVY - k) as u32;
        progs.run(IN, &p.build(), times).unwrap();
        let (key, c) = counted(ip, IN, &p);
        let c = Counters {
            bytes: c.bytes * u64::from(times),
            packets: u64::from(times),
        };
        sent += c;
        *keys.get_mut(&key).unwrap() += c;
    }
    // Replies to addresses never seen: no room, counted past the per-IP map.
    for j in 0..EGRESS_REMOTES {
        let ip = remote(sources + j);
        let p = frame(ip, EG, (j % 13) as usize);
        progs.run(EG, &p.build(), 1).unwrap();
        let c = counted(ip, EG, &p).1;
        sent += c;
        past_per_ip += c;
    }

    // The per-IP map: exactly the keys that fit, each to the byte; past it, the prefix tiers and
    // the per-port overflow; together, everything sent.
    let all = all_counters(pw);
    let per_ip: BTreeMap<_, _> = all
        .iter()
        .filter(|(k, _)| matches!(k.remote, Remote::Ip(_)))
        .map(|(k, v)| (*k, *v))
        .collect();
    assert_eq!(per_ip.len() as u64, MAX_ENTRIES, "the per-IP map is full");
    assert!(per_ip == keys, "the keys that fit hold exactly their traffic");
    assert_eq!(portwatch_tests::past_per_ip(&all), past_per_ip);
    assert_eq!(
        sum(&all.values().copied().collect::<Vec<_>>()),
        sent,
        "every tier together = sent"
    );
    let stats = pw.stats();
    portwatch_tests::assert_past_per_ip_accounted(&stats, past_per_ip, sent);
    assert_eq!(stats.overflow_missing_packets, 0);
    assert_eq!(
        all.get(&Key::overflow(IN)).copied().unwrap_or_default(),
        Counters::default()
    );

    // top on the full map: the heavy hitters in order among the per-IP rows (the flood's prefix
    // rows, marked with their tier, may outrank some), totals exact.
    let top = pw.json(&["top", "-n", "0", "--json"]);
    let rows: Vec<&serde_json::Value> = top["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row.get("ip").is_some())
        .take(HEAVY as usize)
        .collect();
    assert_eq!(rows.len() as u64, HEAVY);
    assert!(top["rows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|row| row.get("ip").is_some() != row.get("tier").is_some()));
    for (k, row) in rows.iter().enumerate() {
        let ip = remote(k as u64);
        assert_eq!(row["ip"], ip.to_string(), "top row {k}: {row}");
        assert_eq!(counters_of(row), keys[&counted(ip, IN, &frame(ip, IN, 0)).0]);
    }
    assert_eq!(
        counters_of(&top["totals"]),
        sent,
        "top's totals: everything, every tier"
    );
    assert_eq!(counters_of(&top["overflow"]), Counters::default());
    assert_eq!(
        counters_of(&top["by_tier"]["ip"]),
        sum(&keys.values().copied().collect::<Vec<_>>())
    );

    // reset on the full map: every key of every tier once, and the map has room again.
    let reset = pw.json(&["reset", "--json"]);
    let rows = reset["rows"].as_array().unwrap();
    assert!(
        rows.len() as u64 > MAX_ENTRIES,
        "per-IP rows and rows past the per-IP map"
    );
    let drained = sum(&rows.iter().map(counters_of).collect::<Vec<_>>());
    assert_eq!(drained, sent, "reset printed everything sent");
    assert_eq!(counters_of(&reset["overflow"]), Counters::default());
    let after = pw.json(&["top", "--json"]);
    assert_eq!(counters_of(&after["totals"]), Counters::default());
    let newcomer = remote(sources + EGRESS_REMOTES);
    let p = frame(newcomer, IN, 10);
    progs.run(IN, &p.build(), 1).unwrap();
    let (key, c) = counted(newcomer, IN, &p);
    assert_eq!(
        pw.counters(),
        BTreeMap::from([(key, c)]),
        "after the reset a new source gets its key"
    );
    eprintln!(
        "flood: {sources} sources through the pinned program in {flood_secs:.1} s ({:.2} us each)",
        flood_secs * 1e6 / sources as f64
    );
}
