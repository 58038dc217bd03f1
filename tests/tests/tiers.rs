//! A real flood into a small map (issue 19): `portwatch load --max-entries 1000 --port 9000 --port
//! 9001 --direction ingress` on a bed's server, and 100,000 spoofed UDP datagrams
//! (`PORTWATCH_TIERS_DATAGRAMS=1000000` for the long run) to both ports from random hosts of three
//! heavy prefixes and a uniform spray over 198.18.128.0/17 and 2001:db8:1000::/36
//! (`portwatch_tests::mix`), nftables counting per port and per heavy prefix at the receiver.
//! Checked to the byte and packet:
//!
//! - per port, `top --by port`, `metrics` and the reset records equal nftables;
//! - the heavy /24s and /48 lead the /24 and /48 rows of `top --by cidr --prefix4 24 --prefix6 48`,
//!   in nftables' order, with nftables' bytes and packets;
//! - every key holds what the send list says it must at the granularity it was counted at: the
//!   sources that took the per-IP map's keys their own datagrams, every other source's under its
//!   prefix, its wide prefix or its port, the first of them that has a key; a reset's record plus
//!   what it left is that, key by key;
//! - the distinct sources counted past the per-IP map (`top`, `status`, `metrics`) are within 5% of
//!   the true number, per port;
//! - a reset that frees room lets new sources back into the per-IP map;
//! - a reset in the middle of a second flood: the records plus what is left equal nftables, per
//!   port and per heavy prefix.
//!
//! Twice: with the tier sizes `--max-entries 1000` derives (the wide prefix tier then has room for
//! every /16 and /32 of 198.18.0.0/15 and 2001:db8::/32, so nothing reaches the per-port
//! overflow), and with `--wide-prefix-entries 2`, which sends the rest to the per-port overflow.
//! Seeded: `PORTWATCH_TIERS_SEED=N` replays a run (the seed is printed).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use portwatch::{
    cidr::Cidr,
    generation::{Key, Remote},
};
use portwatch_common::{Counters, Tier};
use portwatch_tests::{
    cli::{counters_of, rows_by_key, Pw},
    kernel_test, metric_samples,
    mix::{self, Counted, HEAVY},
    netns::{Bed, Spoofed},
    nft,
    rng::{seed_from_env, Rng},
};
use serde_json::Value;

const MAX_ENTRIES: usize = 1000;
const PORTS: [u16; 2] = [9000, 9001];
/// A datagram's port: 9000 three times in five.
const PORT_WEIGHTS: [(u16, usize); 2] = [(9000, 60), (9001, 40)];
const DEFAULT_DATAGRAMS: usize = 100_000;
/// How far an estimate of distinct sources may be from the truth: about three standard errors.
const ESTIMATE_TOLERANCE: f64 = 0.05;

#[kernel_test]
fn a_flood_into_a_small_map_is_exact_per_port_prefix_and_key() {
    flood("a_flood_into_a_small_map", &[], false);
}

#[kernel_test]
fn a_flood_past_every_tier_is_exact_per_port_prefix_and_key() {
    flood(
        "a_flood_past_every_tier",
        &["--prefix-entries", "512", "--wide-prefix-entries", "2"],
        true,
    );
}

fn flood(test: &str, sizes: &[&str], past_every_tier: bool) {
    let seed = seed_from_env("PORTWATCH_TIERS_SEED");
    eprintln!("{test}: PORTWATCH_TIERS_SEED={seed}");
    let mut rng = Rng::new(seed);
    let count: usize = std::env::var("PORTWATCH_TIERS_DATAGRAMS")
        .map(|s| s.parse().expect("PORTWATCH_TIERS_DATAGRAMS is a count"))
        .unwrap_or(DEFAULT_DATAGRAMS);
    let bed = Bed::new(false).unwrap();
    bed.accept_any_source().unwrap();
    nft::load(&bed, &mix::nft_rules(&PORTS)).unwrap();
    let max_entries = MAX_ENTRIES.to_string();
    let mut load = vec!["--max-entries", &max_entries, "--direction", "ingress"];
    load.extend_from_slice(sizes);
    let pw = Pw::load_with(&bed.server, &bed.server_if, &["9000", "9001"], &load);

    // The flood. nftables must have counted every datagram: the sender waits for each run of them
    // to reach the server's UDP layer, so none is dropped on the way.
    let datagrams = mix::datagrams(&mut rng, count, &PORT_WEIGHTS);
    let started = Instant::now();
    bed.send_spoofed(&datagrams).unwrap();
    let send_time = started.elapsed();
    let mut sent = BTreeMap::new();
    mix::add_sent(&mut sent, &datagrams);
    let nft = Counted::read(&bed, &PORTS);
    assert_eq!(
        nft.per_port,
        mix::per_port(&sent),
        "nftables counted every datagram sent"
    );

    // Per port, every tier: exactly nftables'.
    assert_eq!(top_per_port(&pw), nft.per_port, "top --by port");
    assert_eq!(status_per_port(&pw), nft.per_port, "status --json: counters.ports");
    assert_eq!(exported_per_port(&pw), nft.per_port, "metrics: portwatch_port_*_total");
    let tiers = status_tiers(&pw);
    let top = pw.json(&["top", "-n", "0", "--json"]);
    for (tier, used) in &tiers {
        assert_eq!(
            used.counted,
            counters_of(&top["by_tier"][tier.name()]),
            "status and top --json by_tier, tier {}",
            tier.name()
        );
    }
    let total = nft.per_port.values().fold(Counters::default(), |a, c| a + *c);
    assert_eq!(
        tiers.values().fold(Counters::default(), |a, t| a + t.counted),
        total,
        "status: the tiers together hold every datagram"
    );
    assert_eq!(counters_of(&top["totals"]), total);
    assert_eq!(
        counters_of(&top["overflow"]),
        Counters::default(),
        "nothing unattributed"
    );
    assert_eq!(
        counters_of(&pw.status()["counters"]["unattributed"]),
        Counters::default()
    );
    // The flood really went past the tiers it should have.
    for tier in [Tier::Ip, Tier::Prefix] {
        assert_eq!(
            Some(tiers[&tier].entries),
            tiers[&tier].max_entries,
            "the {} tier is full",
            tier.name()
        );
    }
    assert!(tiers[&Tier::WidePrefix].counted.packets > 0, "{tiers:?}");
    if past_every_tier {
        assert_eq!(
            Some(tiers[&Tier::WidePrefix].entries),
            tiers[&Tier::WidePrefix].max_entries
        );
        assert!(tiers[&Tier::Port].counted.packets > 0, "{tiers:?}");
    }

    // The heavy prefixes lead the /24 and /48 rows, each exactly as nftables counted it.
    heavy_prefixes_lead(&pw, &nft);

    // Key by key: exactly where the send list says each datagram must be.
    let counted = ip_port_rows(&pw);
    let expected = where_counted(&sent, &counted);
    let per_ip: BTreeSet<Key> = counted
        .keys()
        .filter(|k| matches!(k.remote, Remote::Ip(_)))
        .copied()
        .collect();
    assert_eq!(per_ip.len(), MAX_ENTRIES, "the per-IP map's keys");
    assert_same(&counted, &expected, "top --by ip-port against the send list");
    for (tier, used) in &tiers {
        let reference = expected
            .iter()
            .filter(|(k, _)| k.tier() == Some(*tier))
            .fold(Counters::default(), |a, (_, c)| a + *c);
        assert_eq!(
            used.counted,
            reference,
            "status: tier {} against the send list",
            tier.name()
        );
    }
    let late = late_per_ip_keys(&datagrams, &per_ip);

    // Distinct sources past the per-IP map, per port: within 5% in every output.
    let truth = sources_past_per_ip(&sent, &per_ip);
    let estimates = [
        ("top --json", estimates_of(&top["sources"]["ports"])),
        ("status --json", estimates_of(&pw.status()["counters"]["sources"])),
        ("metrics", exported_estimates(&pw)),
    ];
    for (output, estimate) in &estimates {
        assert_eq!(
            estimate.keys().collect::<Vec<_>>(),
            truth.keys().collect::<Vec<_>>(),
            "{output}"
        );
        for (port, &n) in estimate {
            let error = (n as f64 - truth[port] as f64) / truth[port] as f64;
            assert!(
                error.abs() <= ESTIMATE_TOLERANCE,
                "{output}: port {port}: {n} distinct sources estimated, {} true ({:+.2}%)",
                truth[port],
                error * 100.0
            );
        }
    }
    assert!(estimates.iter().all(|(_, e)| *e == estimates[0].1), "{estimates:?}");

    // A reset of one port: its record is that port's keys, what is left the other's.
    let record = pw.json(&["reset", "--port", "9001", "--json"]);
    let recorded = rows_by_key(&record);
    let of_port = |counts: &BTreeMap<Key, Counters>, port: u16| -> BTreeMap<Key, Counters> {
        counts
            .iter()
            .filter(|(k, _)| k.port == port)
            .map(|(k, c)| (*k, *c))
            .collect()
    };
    assert_same(&recorded, &of_port(&expected, 9001), "the record of reset --port 9001");
    assert_same(
        &ip_port_rows(&pw),
        &of_port(&expected, 9000),
        "what reset --port 9001 left",
    );
    assert_eq!(counters_of(&record["totals"]), nft.per_port[&9001]);
    assert_eq!(counters_of(&record["overflow"]), Counters::default());
    assert_eq!(
        exported_per_port(&pw),
        nft.per_port,
        "metrics after the reset: drained included"
    );
    let mut records = vec![recorded];

    // It freed room in the per-IP map: new sources get keys of their own again.
    let newcomers: Vec<Spoofed> = ["198.19.200.1", "2001:db8:cafe::1"]
        .iter()
        .flat_map(|src| {
            let src: IpAddr = src.parse().unwrap();
            PORTS.map(|port| Spoofed {
                src,
                dst: datagrams.iter().find(|d| d.src.is_ipv4() == src.is_ipv4()).unwrap().dst,
                port,
                payload: 100,
            })
        })
        .collect();
    bed.send_spoofed(&newcomers).unwrap();
    mix::add_sent(&mut sent, &newcomers);
    let now = ip_port_rows(&pw);
    for d in &newcomers {
        assert_eq!(
            now.get(&mix::key_of(d)),
            Some(&Counters {
                bytes: d.l3_len(),
                packets: 1
            }),
            "{} to {} after the reset: a per-IP row",
            d.src,
            d.port
        );
    }

    // A second flood with a full reset in its middle: the records and what is left hold every
    // datagram, per port and per heavy prefix, as nftables counted them.
    let second = mix::datagrams(&mut rng, count / 2, &PORT_WEIGHTS);
    let (before_reset, under_reset) = second.split_at(second.len() / 4);
    bed.send_spoofed(before_reset).unwrap();
    let (record, sender_still_sending) = std::thread::scope(|s| {
        let sender = s.spawn(|| bed.send_spoofed(under_reset));
        let record = pw.json(&["reset", "--json"]);
        let still = !sender.is_finished();
        sender.join().unwrap().unwrap();
        (record, still)
    });
    mix::add_sent(&mut sent, &second);
    records.push(rows_by_key(&record));
    let left = ip_port_rows(&pw);
    let nft = Counted::read(&bed, &PORTS);
    assert_eq!(
        nft.per_port,
        mix::per_port(&sent),
        "nftables counted every datagram sent"
    );
    let mut everything: BTreeMap<Key, Counters> = BTreeMap::new();
    for (k, c) in records.iter().flatten().chain(&left) {
        *everything.entry(*k).or_default() += *c;
    }
    assert_eq!(
        mix::per_port(&everything),
        nft.per_port,
        "records plus what is left, per port"
    );
    for (heavy, counted) in HEAVY.iter().zip(nft.per_heavy) {
        assert_eq!(
            within(&everything, heavy.cidr),
            counted,
            "records plus what is left, {}",
            heavy.cidr
        );
    }
    for (k, c) in &everything {
        if let Remote::Ip(_) = k.remote {
            let sent = sent.get(k).copied().unwrap_or_default();
            assert!(
                c.packets <= sent.packets && c.bytes <= sent.bytes,
                "{}: {c:?} counted, {sent:?} sent",
                describe(k)
            );
        }
    }
    assert_eq!(exported_per_port(&pw), nft.per_port, "metrics at the end");

    eprintln!(
        "{test}: {count} datagrams sent in {:.2} s ({:.1} us each); {} per-IP keys, {late} of them outside \
         the first {MAX_ENTRIES} source-port pairs in send order",
        send_time.as_secs_f64(),
        send_time.as_secs_f64() * 1e6 / count as f64,
        per_ip.len()
    );
    for (tier, used) in &tiers {
        eprintln!(
            "{test}: tier {:<11} {:>5} of {:>5} keys, {:>10} bytes, {:>7} packets",
            tier.name(),
            used.entries,
            used.max_entries.map_or("-".to_string(), |m| m.to_string()),
            used.counted.bytes,
            used.counted.packets
        );
    }
    eprintln!("{test}: per port (nftables = portwatch): {:?}", nft.per_port);
    for (heavy, c) in HEAVY.iter().zip(nft.per_heavy) {
        eprintln!(
            "{test}: {:<20} {:>9} bytes {:>6} packets",
            heavy.cidr, c.bytes, c.packets
        );
    }
    for (port, n) in &estimates[0].1 {
        eprintln!(
            "{test}: port {port}: {n} distinct sources past the per-IP map estimated, {} true ({:+.2}%)",
            truth[port],
            (*n as f64 / truth[port] as f64 - 1.0) * 100.0
        );
    }
    eprintln!(
        "{test}: the reset in the second flood took {} rows, left {} (the sender was {}still sending when it \
         ended); total {:.1} s",
        records[1].len(),
        left.len(),
        if sender_still_sending { "" } else { "not " },
        started.elapsed().as_secs_f64()
    );
}

/// Every row of `top --by ip-port`, by key.
fn ip_port_rows(pw: &Pw) -> BTreeMap<Key, Counters> {
    rows_by_key(&pw.json(&["top", "--by", "ip-port", "-n", "0", "--json"]))
}

/// `top --by port`, per port.
fn top_per_port(pw: &Pw) -> BTreeMap<u16, Counters> {
    let report = pw.json(&["top", "--by", "port", "-n", "0", "--json"]);
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["port"].as_u64().unwrap() as u16, counters_of(r)))
        .collect()
}

/// `status --json`'s `counters.ports` (every port is UDP, ingress here).
fn status_per_port(pw: &Pw) -> BTreeMap<u16, Counters> {
    pw.status()["counters"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(
                (&p["proto"], &p["direction"]),
                (&Value::from("udp"), &Value::from("ingress"))
            );
            (p["port"].as_u64().unwrap() as u16, counters_of(p))
        })
        .collect()
}

/// A sample of the metrics of a watched port (UDP, ingress), 0 when absent.
fn port_sample(metrics: &str, metric: &str, port: u16) -> u64 {
    metric_samples(metrics, metric)
        .get(&format!("{{direction=\"ingress\",port=\"{port}\",proto=\"udp\"}}"))
        .map_or(0, |v| *v as u64)
}

/// `portwatch_port_bytes_total` and `_packets_total` per watched port.
fn exported_per_port(pw: &Pw) -> BTreeMap<u16, Counters> {
    let text = pw.ok(&["metrics"]);
    PORTS
        .iter()
        .map(|&port| {
            let c = Counters {
                bytes: port_sample(&text, "portwatch_port_bytes_total", port),
                packets: port_sample(&text, "portwatch_port_packets_total", port),
            };
            (port, c)
        })
        .collect()
}

/// `portwatch_overflow_sources_estimate` per watched port that has one.
fn exported_estimates(pw: &Pw) -> BTreeMap<u16, u64> {
    let text = pw.ok(&["metrics"]);
    PORTS
        .iter()
        .map(|&port| (port, port_sample(&text, "portwatch_overflow_sources_estimate", port)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The estimates of `top --json`'s `sources.ports` or `status --json`'s `counters.sources`, per
/// port (all UDP ingress here).
fn estimates_of(list: &Value) -> BTreeMap<u16, u64> {
    list.as_array()
        .unwrap_or_else(|| panic!("no list of estimates: {list}"))
        .iter()
        .map(|s| {
            assert_eq!(
                (&s["proto"], &s["direction"]),
                (&Value::from("udp"), &Value::from("ingress"))
            );
            (s["port"].as_u64().unwrap() as u16, s["estimate"].as_u64().unwrap())
        })
        .collect()
}

/// A tier as `status --json` shows it.
#[derive(Debug)]
struct TierUse {
    entries: u64,
    max_entries: Option<u64>,
    counted: Counters,
}

fn status_tiers(pw: &Pw) -> BTreeMap<Tier, TierUse> {
    let status = pw.status();
    status["counters"]["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let tier = *Tier::ALL.iter().find(|tier| t["tier"] == tier.name()).unwrap();
            let used = TierUse {
                entries: t["entries"].as_u64().unwrap(),
                max_entries: t["max_entries"].as_u64(),
                counted: counters_of(t),
            };
            (tier, used)
        })
        .collect()
}

/// The heavy /24s and /48 are the first /24 and /48 rows of `top --by cidr --prefix4 24 --prefix6
/// 48`, in the order of nftables' bytes, each with nftables' bytes and packets (its per-IP rows and
/// its prefix tier's key together: exact only if none of its datagrams went to a coarser tier).
fn heavy_prefixes_lead(pw: &Pw, nft: &Counted) {
    let report = pw.json(&[
        "top",
        "--by",
        "cidr",
        "--prefix4",
        "24",
        "--prefix6",
        "48",
        "-n",
        "0",
        "--json",
    ]);
    let fine: Vec<(String, Counters)> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["cidr"].as_str().unwrap().to_string(), counters_of(r)))
        .filter(|(cidr, _)| {
            (cidr.ends_with("/24") && !cidr.contains(':')) || (cidr.ends_with("/48") && cidr.contains(':'))
        })
        .collect();
    let mut heavy: Vec<(String, Counters)> = HEAVY
        .iter()
        .zip(nft.per_heavy)
        .map(|(h, c)| (h.cidr.to_string(), c))
        .collect();
    heavy.sort_by_key(|(_, c)| std::cmp::Reverse(c.bytes));
    assert_eq!(
        fine[..heavy.len()],
        heavy[..],
        "the first /24 and /48 rows of top --by cidr (then {:?})",
        fine.get(heavy.len())
    );
}

/// Where each source's datagrams on each port (`sent`, per-IP keys) must be counted, given the
/// keys portwatch holds (`counted`): under the source's own key if it has one (it took it with its
/// first datagram, and the per-IP map drops no key until a reset); else under the first of its
/// prefix and wide prefix that has a key on that port (a tier drops no key either, so a key that
/// exists was made by the first datagram that looked for it, and every later one found it); else
/// under its port alone.
fn where_counted(sent: &BTreeMap<Key, Counters>, counted: &BTreeMap<Key, Counters>) -> BTreeMap<Key, Counters> {
    let mut out: BTreeMap<Key, Counters> = BTreeMap::new();
    for (key, c) in sent {
        let Remote::Ip(ip) = key.remote else {
            unreachable!("sent per source")
        };
        let prefix = |tier: Tier| Key {
            remote: Remote::Prefix(Cidr::of(ip, tier.prefix4(), tier.prefix6())),
            ..*key
        };
        let at = [*key, prefix(Tier::Prefix), prefix(Tier::WidePrefix)]
            .into_iter()
            .find(|k| counted.contains_key(k))
            .unwrap_or(Key::any_remote(key.port_key()));
        *out.entry(at).or_default() += *c;
    }
    out
}

/// Per port, the distinct sources that have no per-IP key on it: those counted past the per-IP
/// map, which its estimate is of.
fn sources_past_per_ip(sent: &BTreeMap<Key, Counters>, per_ip: &BTreeSet<Key>) -> BTreeMap<u16, u64> {
    let mut out = BTreeMap::new();
    for key in sent.keys().filter(|k| !per_ip.contains(k)) {
        *out.entry(key.port).or_default() += 1;
    }
    out
}

/// How many per-IP keys are not among the first `MAX_ENTRIES` distinct source-port pairs of the
/// send list: the datagrams arrive in that order, but for what the receiving CPUs' backlogs
/// reorder.
fn late_per_ip_keys(datagrams: &[Spoofed], per_ip: &BTreeSet<Key>) -> usize {
    let mut first = BTreeSet::new();
    for d in datagrams {
        if first.len() == MAX_ENTRIES {
            break;
        }
        first.insert(mix::key_of(d));
    }
    per_ip.difference(&first).count()
}

/// What the rows within `cidr` (a heavy /24 or /48) hold: its per-IP keys and its prefix tier's.
fn within(counts: &BTreeMap<Key, Counters>, cidr: &str) -> Counters {
    let cidr: Cidr = cidr.parse().unwrap();
    counts
        .iter()
        .filter(|(k, _)| match k.remote {
            Remote::Ip(ip) => cidr.contains(&ip),
            Remote::Prefix(prefix) => prefix == cidr,
            Remote::AnyRemote | Remote::Overflow => false,
        })
        .fold(Counters::default(), |a, (_, c)| a + *c)
}

/// A key as a person reads it: `198.18.0.7 9000`, `198.19.100.0/24 9001`, `any 9000`.
fn describe(key: &Key) -> String {
    let remote = match key.remote {
        Remote::Ip(ip) => {
            let v6 = std::net::Ipv6Addr::from(ip);
            v6.to_ipv4_mapped().map_or(v6.to_string(), |v4| v4.to_string())
        }
        Remote::Prefix(cidr) => cidr.to_string(),
        Remote::AnyRemote => "any".to_string(),
        Remote::Overflow => "overflow".to_string(),
    };
    format!("{remote} {}", key.port)
}

/// `got == want`, or a failure that names the first keys that differ (the maps hold thousands).
fn assert_same(got: &BTreeMap<Key, Counters>, want: &BTreeMap<Key, Counters>, what: &str) {
    if got == want {
        return;
    }
    let keys: BTreeSet<&Key> = got.keys().chain(want.keys()).collect();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| got.get(k) != want.get(k))
        .map(|k| format!("{}: {:?}, expected {:?}", describe(k), got.get(k), want.get(k)))
        .collect();
    panic!(
        "{what}: {} of {} keys differ ({} rows, {} expected), first: {:#?}",
        differ.len(),
        got.len().max(want.len()),
        got.len(),
        want.len(),
        &differ[..differ.len().min(12)]
    );
}
