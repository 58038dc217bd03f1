//! A spoofed flood: far more distinct remote addresses than the counter map holds, through the
//! programs of a real `portwatch load` (`BPF_PROG_TEST_RUN` on its pinned programs, so into its
//! pinned maps). Nothing is lost: the keys that fit hold their traffic to the byte, the rest is in
//! the overflow keys and in `stats.map_full_*`, and `top` and `reset` work on the full map.
//!
//! `PORTWATCH_FLOOD_SOURCES=N` sets the distinct sources (default 100,000: 100 times the map;
//! 1,000,000 is 131,072 IPv4 and 868,928 IPv6 ones).

use std::collections::BTreeMap;

use portwatch::generation::{sum, Key};
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
fn a_spoofed_flood_overflows_exactly_and_top_and_reset_still_work() {
    let sources: u64 = std::env::var("PORTWATCH_FLOOD_SOURCES")
        .map(|s| s.parse().expect("PORTWATCH_FLOOD_SOURCES is a count"))
        .unwrap_or(DEFAULT_SOURCES);
    assert!(sources > 10 * MAX_ENTRIES);
    let lo = Pw::on_loopback("flood", &["--max-entries", &MAX_ENTRIES.to_string()]);
    let pw = &lo.pw;
    let mut progs = PinnedPrograms::open(&pw.pin).unwrap();

    let mut sent = Counters::default();
    let mut keys: BTreeMap<Key, Counters> = BTreeMap::new();
    let mut overflow_in = Counters::default();
    let mut overflow_eg = Counters::default();
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
            overflow_in += c;
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
    // Replies to addresses never seen: no room, the egress overflow key.
    for j in 0..EGRESS_REMOTES {
        let ip = remote(sources + j);
        let p = frame(ip, EG, (j % 13) as usize);
        progs.run(EG, &p.build(), 1).unwrap();
        let c = counted(ip, EG, &p).1;
        sent += c;
        overflow_eg += c;
    }

    // The map: exactly the keys that fit, each to the byte, and the overflow keys; together,
    // everything sent.
    let all = all_counters(pw);
    let real: BTreeMap<_, _> = all
        .iter()
        .filter(|(k, _)| !k.is_overflow())
        .map(|(k, v)| (*k, *v))
        .collect();
    assert_eq!(real.len() as u64, MAX_ENTRIES, "the map is full");
    assert!(real == keys, "the keys that fit hold exactly their traffic");
    assert_eq!(all[&Key::overflow(IN)], overflow_in);
    assert_eq!(all[&Key::overflow(EG)], overflow_eg);
    assert_eq!(
        sum(&all.values().copied().collect::<Vec<_>>()),
        sent,
        "entries + overflow = sent"
    );
    let stats = pw.stats();
    portwatch_tests::assert_overflow_accounted(&stats, [overflow_in, overflow_eg], sent);
    assert_eq!(stats.overflow_missing_packets, 0);

    // top on the full map: the heavy hitters in order, totals and overflow exact.
    let top = pw.json(&["top", "-n", &HEAVY.to_string(), "--json"]);
    let rows = top["rows"].as_array().unwrap();
    assert_eq!(rows.len() as u64, HEAVY);
    for (k, row) in rows.iter().enumerate() {
        let ip = remote(k as u64);
        assert_eq!(row["ip"], ip.to_string(), "top row {k}: {row}");
        assert_eq!(counters_of(row), keys[&counted(ip, IN, &frame(ip, IN, 0)).0]);
    }
    assert_eq!(
        counters_of(&top["totals"]),
        sent,
        "top's totals: every row plus the overflow"
    );
    let overflowed = Counters {
        bytes: overflow_in.bytes + overflow_eg.bytes,
        packets: overflow_in.packets + overflow_eg.packets,
    };
    assert_eq!(counters_of(&top["overflow"]), overflowed);

    // reset on the full map: every key once, with the overflow, and the map has room again.
    let reset = pw.json(&["reset", "--json"]);
    let rows = reset["rows"].as_array().unwrap();
    assert_eq!(rows.len() as u64, MAX_ENTRIES);
    let drained = sum(&rows.iter().map(counters_of).collect::<Vec<_>>());
    assert_eq!(
        Counters {
            bytes: drained.bytes + counters_of(&reset["overflow"]).bytes,
            packets: drained.packets + counters_of(&reset["overflow"]).packets,
        },
        sent,
        "reset printed everything sent"
    );
    assert_eq!(counters_of(&reset["overflow"]), overflowed);
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
