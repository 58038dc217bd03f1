//! `portwatch top` and `portwatch reset` on known traffic: ordering, grouping, filters, the JSON
//! and CSV schemas, exact figures; the lossless reset under traffic; a million-entry map.

use std::collections::BTreeMap;

use portwatch_common::{CounterKey, Counters, Direction::Ingress as IN, IPPROTO_TCP, IPPROTO_UDP};
use portwatch_tests::{
    cli::Pw,
    fill_counters, kernel_test, key,
    netns::{Bed, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6},
};
use serde_json::Value;

fn json(pw: &Pw, args: &[&str]) -> Value {
    let out = pw.ok(args);
    assert_eq!(out.lines().count(), 1, "--json is one line: {out}");
    serde_json::from_str(&out).unwrap()
}

/// portwatch loaded on the loopback of a namespace of the test's own, watching 443 (no traffic:
/// these tests fill the counter maps themselves).
struct OnLoopback {
    /// Declared first, so dropped (unloaded) before the namespace goes.
    pw: Pw,
    _ns: portwatch_tests::netns::Netns,
}

fn loaded_on_lo(name: &str, load_args: &[&str]) -> OnLoopback {
    let ns = portwatch_tests::netns::Netns::new(name).unwrap();
    let pw = Pw::new(Some(&ns));
    let mut args = vec!["load", "--iface", "lo", "--port", "443"];
    args.extend_from_slice(load_args);
    pw.ok(&args);
    OnLoopback { pw, _ns: ns }
}

fn row_ips(v: &Value) -> Vec<String> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ip"].as_str().unwrap().to_string())
        .collect()
}

fn counters_of(v: &Value) -> Counters {
    Counters {
        bytes: v["bytes"].as_u64().unwrap(),
        packets: v["packets"].as_u64().unwrap(),
    }
}

/// UDP with known sizes: L3 bytes per datagram are the IP header, 8 and the payload.
fn udp_bytes(ip: &str, count: u64, payload: u64) -> u64 {
    count * (if ip.contains(':') { 40 } else { 20 } + 8 + payload)
}

#[kernel_test]
fn top_shows_exact_figures_in_every_view() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::new(Some(&bed.server));
    pw.ok(&[
        "load",
        "--iface",
        &bed.server_if,
        "--port",
        "7002/udp",
        "--port",
        "7003/udp",
        "--port",
        "7001/tcp",
    ]);
    // Known traffic. By bytes: v4[0] > v6[1] > v4[1] > v4[2]; by packets v4[2] sends the most.
    let (a, b, c, d) = (CLIENT_V4[0], CLIENT_V6[1], CLIENT_V4[1], CLIENT_V4[2]);
    bed.send_udp(a, SERVER_V4, 7002, 60, 1000).unwrap();
    bed.send_udp(a, SERVER_V4, 7003, 20, 1000).unwrap();
    bed.send_udp(b, SERVER_V6, 7002, 50, 1000).unwrap();
    bed.send_udp(c, SERVER_V4, 7003, 30, 1000).unwrap();
    bed.send_udp(d, SERVER_V4, 7002, 200, 10).unwrap();
    let bytes_a = udp_bytes(a, 60, 1000) + udp_bytes(a, 20, 1000);
    let (bytes_b, bytes_c, bytes_d) = (udp_bytes(b, 50, 1000), udp_bytes(c, 30, 1000), udp_bytes(d, 200, 10));
    let total = Counters {
        bytes: bytes_a + bytes_b + bytes_c + bytes_d,
        packets: 80 + 50 + 30 + 200,
    };

    // Default: per IP by bytes, IPv4 dotted, IPv6 canonical.
    let top = json(&pw, &["top", "--json"]);
    assert_eq!(row_ips(&top), [a, b, c, d]);
    assert_eq!(
        counters_of(&top["rows"][0]),
        Counters {
            bytes: bytes_a,
            packets: 80
        }
    );
    assert_eq!(
        counters_of(&top["rows"][1]),
        Counters {
            bytes: bytes_b,
            packets: 50
        }
    );
    assert_eq!(top["rows"][1]["ip"], "2001:db8::3");
    assert_eq!(counters_of(&top["totals"]), total);
    assert_eq!(counters_of(&top["overflow"]), Counters::default());
    assert!(top["rows"][0].get("port").is_none(), "--by ip sums over ports");

    // -n cuts the rows, not the totals.
    let top2 = json(&pw, &["top", "-n", "2", "--json"]);
    assert_eq!(row_ips(&top2), [a, b]);
    assert_eq!(counters_of(&top2["totals"]), total);

    // --sort packets.
    assert_eq!(row_ips(&json(&pw, &["top", "--sort", "packets", "--json"]))[0], d);

    // --by ip-port: one row per (IP, port, protocol, direction).
    let per_port = json(&pw, &["top", "--by", "ip-port", "--json"]);
    let rows = per_port["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0]["ip"], a);
    assert_eq!(
        (
            rows[0]["port"].as_u64(),
            rows[0]["proto"].as_str(),
            rows[0]["direction"].as_str()
        ),
        (Some(7002), Some("udp"), Some("ingress"))
    );
    assert_eq!(
        counters_of(&rows[0]),
        Counters {
            bytes: udp_bytes(a, 60, 1000),
            packets: 60
        }
    );

    // --by port.
    let by_port = json(&pw, &["top", "--by", "port", "--json"]);
    let ports: BTreeMap<u64, Counters> = by_port["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["port"].as_u64().unwrap(), counters_of(r)))
        .collect();
    assert_eq!(
        ports[&7002],
        Counters {
            bytes: udp_bytes(a, 60, 1000) + bytes_b + bytes_d,
            packets: 310
        }
    );
    assert_eq!(
        ports[&7003],
        Counters {
            bytes: udp_bytes(a, 20, 1000) + bytes_c,
            packets: 50
        }
    );

    // --by cidr: the IPv4 clients share a /24, the IPv6 one is its own /64.
    let cidr = json(&pw, &["top", "--by", "cidr", "--json"]);
    let cidrs: Vec<(&str, Counters)> = cidr["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["cidr"].as_str().unwrap(), counters_of(r)))
        .collect();
    assert_eq!(
        cidrs,
        [
            (
                "198.18.0.0/24",
                Counters {
                    bytes: bytes_a + bytes_c + bytes_d,
                    packets: 310
                }
            ),
            (
                "2001:db8::/64",
                Counters {
                    bytes: bytes_b,
                    packets: 50
                }
            )
        ]
    );
    let wide = json(&pw, &["top", "--by", "cidr", "--prefix4", "15", "--json"]);
    assert_eq!(wide["rows"][0]["cidr"], "198.18.0.0/15");

    // Filters.
    let only_7003 = json(&pw, &["top", "--port", "7003", "--json"]);
    assert_eq!(row_ips(&only_7003), [c, a]);
    assert_eq!(
        counters_of(&only_7003["totals"]),
        Counters {
            bytes: udp_bytes(a, 20, 1000) + bytes_c,
            packets: 50
        }
    );
    assert!(json(&pw, &["top", "--port", "7003/tcp", "--json"])["rows"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(json(&pw, &["top", "--direction", "egress", "--json"])["rows"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        json(&pw, &["top", "--direction", "ingress", "--json"])["rows"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // CSV: a header and the same rows and figures as JSON.
    let csv = pw.ok(&["top", "--by", "ip-port", "--csv"]);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("ip,port,proto,direction,bytes,packets"));
    let csv_rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(String::from).collect()).collect();
    assert_eq!(csv_rows.len(), rows.len());
    for (csv_row, json_row) in csv_rows.iter().zip(rows) {
        assert_eq!(csv_row[0], json_row["ip"].as_str().unwrap());
        assert_eq!(csv_row[1], json_row["port"].to_string());
        assert_eq!(csv_row[4], json_row["bytes"].to_string());
        assert_eq!(csv_row[5], json_row["packets"].to_string());
    }

    // The table: human units, exact figures on the totals line.
    let table = pw.ok(&["top"]);
    assert!(
        table.contains("KiB") && table.contains(&format!("({} bytes)", total.bytes)),
        "{table}"
    );
    assert!(pw.ok(&["top", "--exact"]).contains(&bytes_a.to_string()));

    // --interval: rates over a quiet interval are exactly zero, and the rows carry them.
    let rated = json(&pw, &["top", "--interval", "0.3", "--json"]);
    assert_eq!(rated["rows"][0]["bytes_per_sec"], 0.0);
    assert_eq!(rated["rows"][0]["packets_per_sec"], 0.0);
    assert_eq!(counters_of(&rated["totals"]), total);
}

/// The conservation test: while a sender in the client namespace sends a known number of bytes to
/// two watched ports from four addresses, `portwatch reset --json` runs in a loop. Every snapshot
/// plus the final `top --json` adds up, per key and in total, to exactly what was sent.
#[kernel_test]
fn resets_under_traffic_lose_and_double_count_nothing() {
    let bed = std::sync::Arc::new(Bed::new(false).unwrap());
    let pw = Pw::new(Some(&bed.server));
    pw.ok(&[
        "load",
        "--iface",
        &bed.server_if,
        "--port",
        "7002/udp",
        "--port",
        "7004/udp",
    ]);
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
            let mut sent: BTreeMap<CounterKey, Counters> = BTreeMap::new();
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
                    snapshots.push(json(&pw, &["reset", "--json"]));
                }
                snapshots
            })
        })
        .collect();
    let sent = sender.join().unwrap();
    sender_done.store(true, std::sync::atomic::Ordering::SeqCst);
    let snapshots: Vec<Value> = resetters.into_iter().flat_map(|r| r.join().unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let last = json(&pw, &["top", "--by", "ip-port", "-n", "0", "--json"]);
    assert!(
        snapshots.len() >= 3,
        "only {} resets ran during the traffic",
        snapshots.len()
    );

    let mut counted: BTreeMap<CounterKey, Counters> = BTreeMap::new();
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
    let pw = Pw::new(Some(&bed.server));
    pw.ok(&[
        "load",
        "--iface",
        &bed.server_if,
        "--port",
        "7002/udp",
        "--port",
        "7003/udp",
    ]);
    let a = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 10, 100).unwrap();
    let b = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7003, 10, 100).unwrap();
    let c = bed.send_udp(CLIENT_V6[0], SERVER_V6, 7002, 10, 100).unwrap();

    let zeroed = json(&pw, &["reset", "--port", "7002", "--ip", "198.18.0.0/16", "--json"]);
    assert_eq!(zeroed["rows"].as_array().unwrap().len(), 1);
    assert_eq!(
        (zeroed["rows"][0]["ip"].as_str(), zeroed["rows"][0]["port"].as_u64()),
        (Some(CLIENT_V4[0]), Some(7002))
    );
    assert_eq!(counters_of(&zeroed["totals"]), Counters { bytes: a, packets: 10 });
    // Twice more after new traffic: the selection spans both generations each time.
    let a2 = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 5, 100).unwrap();
    assert_eq!(
        counters_of(&json(&pw, &["reset", "--port", "7002", "--ip", CLIENT_V4[0], "--json"])["totals"]),
        Counters { bytes: a2, packets: 5 }
    );
    assert_eq!(
        counters_of(&json(&pw, &["reset", "--port", "7002", "--ip", CLIENT_V4[0], "--json"])["totals"]),
        Counters::default()
    );

    let left = json(&pw, &["top", "--by", "ip-port", "--json"]);
    assert_eq!(
        counters_of(&left["totals"]),
        Counters {
            bytes: b + c,
            packets: 20
        }
    );
    let all = json(&pw, &["reset", "--json"]);
    assert_eq!(
        counters_of(&all["totals"]),
        Counters {
            bytes: b + c,
            packets: 20
        }
    );
    assert!(json(&pw, &["top", "--json"])["rows"].as_array().unwrap().is_empty());

    // The output cannot be written: the reset fails and puts everything back.
    let d = bed.send_udp(CLIENT_V4[1], SERVER_V4, 7003, 7, 100).unwrap();
    let r = pw.run(&["reset", "--json", "--output", "/proc/version"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("put back"), "{}", r.stderr);
    assert_eq!(
        counters_of(&json(&pw, &["top", "--json"])["totals"]),
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

/// A counter map of 1,000,000 entries: `top -n 10 --json` returns the right ten.
#[kernel_test]
fn top_over_a_million_entries() {
    let lo = loaded_on_lo("big", &["--max-entries", "1000000"]);
    let pw = &lo.pw;
    // Entry i: remote 2001:db8::<i>, bytes a permutation of 0..N so that the top ten are known.
    const N: u64 = 1_000_000;
    let entries = portwatch_tests::synthetic_entries(N);
    fill_counters(&pw.pin, 0, &entries).unwrap();
    let mut expected: Vec<_> = entries.iter().map(|(k, c)| (c.bytes, k.remote_ip_octets())).collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    let expected: Vec<(String, u64)> = expected[..10]
        .iter()
        .map(|(b, ip)| (std::net::Ipv6Addr::from(*ip).to_string(), *b))
        .collect();

    let top = json(pw, &["top", "-n", "10", "--json"]);
    let got: Vec<(String, u64)> = top["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["ip"].as_str().unwrap().to_string(), r["bytes"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(
        counters_of(&top["totals"]),
        Counters {
            bytes: N * (N - 1) / 2,
            packets: N
        }
    );
    assert_eq!(pw.status()["counters"]["entries"], 1_000_000);
}

/// The text of terminal output: each control sequence becomes a space, and runs of spaces one.
fn plain(screen: &str) -> String {
    let mut out = String::new();
    let mut chars = screen.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
            }
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs `portwatch top --watch` on a 100x24 pseudo-terminal (`script` from util-linux), waits until
/// the screen's text shows `until`, sends `key`, and returns everything written to the terminal.
/// Bounded: the child is killed after 20 s.
fn watch_on_a_terminal(pw: &Pw, key: &[u8], until: &str) -> (std::process::ExitStatus, String) {
    use std::{
        io::{Read, Write},
        process::{Command, Stdio},
        sync::{Arc, Mutex},
        time::{Duration, Instant},
    };
    let cmd = pw.command(&["top", "--watch", "--interval", "0.2"]);
    let line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_str().unwrap()))
        .collect();
    let mut child = Command::new("script")
        .args([
            "-qec",
            &format!("stty rows 24 cols 100; exec {}", line.join(" ")),
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running script(1)");
    let screen = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let reader = {
        let screen = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let started = Instant::now();
    let text = |s: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&s.lock().unwrap()).into_owned();
    while !plain(&text(&screen)).contains(until) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(key).unwrap();
    stdin.flush().unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    reader.join().unwrap();
    (status, text(&screen))
}

#[kernel_test]
fn top_watch_draws_a_live_screen_and_restores_the_terminal() {
    let lo = loaded_on_lo("watch", &[]);
    let pw = &lo.pw;
    let entries = [
        (
            key("198.18.0.9", 443, IPPROTO_TCP, IN),
            Counters {
                bytes: 3 << 20,
                packets: 2100,
            },
        ),
        (
            key("2001:db8::9", 443, IPPROTO_UDP, IN),
            Counters {
                bytes: 5 << 10,
                packets: 7,
            },
        ),
    ];
    fill_counters(&pw.pin, 0, &entries).unwrap();
    const ENTER_ALTERNATE: &str = "\x1b[?1049h";
    const LEAVE_ALTERNATE: &str = "\x1b[?1049l";
    const SHOW_CURSOR: &str = "\x1b[?25h";
    // `q` quits; so does Ctrl-C, which arrives as a key in raw mode.
    for (key, name) in [(&b"q"[..], "q"), (&b"\x03"[..], "Ctrl-C")] {
        // The second reading adds rates (nothing flows: 0 B/s).
        let (status, screen) = watch_on_a_terminal(pw, key, "0 B/s");
        assert!(status.success(), "{name}: exit {status:?}; screen: {screen:?}");
        let text = plain(&screen);
        for shown in [
            "total: 3.0 MiB (3150848 bytes), 2107 packets; 2 rows; overflow (map full): 0 B (0 bytes), 0 packets",
            "IP BYTES PACKETS BYTES/S PKTS/S",
            "198.18.0.9 3.0 MiB 2100",
            "2001:db8::9 5.0 KiB 7",
            "0 B/s",
        ] {
            assert!(text.contains(shown), "{name}: the screen lacks {shown:?}: {text:?}");
        }
        let entered = screen.find(ENTER_ALTERNATE).expect("entered the alternate screen");
        let left = screen.rfind(LEAVE_ALTERNATE).expect("left the alternate screen");
        assert!(left > entered, "{name}: the terminal was not restored");
        assert!(
            screen[left..].contains(SHOW_CURSOR),
            "{name}: the cursor was not shown again"
        );
    }
}

/// The batch read `top` and `reset` use (`BPF_MAP_LOOKUP_BATCH`, 16384 entries a call, a reader
/// thread) and the key-at-a-time walk that is its fallback on kernels without batch operations see
/// the same entries and values, over both generations, with more entries than one batch holds.
#[kernel_test]
fn batch_and_key_by_key_reads_agree() {
    let lo = loaded_on_lo("batch", &[]);
    let pw = &lo.pw;
    let entries = portwatch_tests::synthetic_entries(40_000);
    fill_counters(&pw.pin, 0, &entries).unwrap();
    // Generation 1 holds every third key again, with other values.
    let again: Vec<_> = entries
        .iter()
        .step_by(3)
        .map(|(k, c)| {
            (
                *k,
                Counters {
                    bytes: c.bytes * 2 + 1,
                    packets: 3,
                },
            )
        })
        .collect();
    fill_counters(&pw.pin, 1, &again).unwrap();

    let mut pinned = pw.pinned();
    let mut walked: BTreeMap<CounterKey, Counters> = BTreeMap::new();
    let mut batched: BTreeMap<CounterKey, Counters> = BTreeMap::new();
    for generation in [0, 1] {
        let by_key = portwatch::maps::read_counters(pinned.counters(generation).unwrap()).unwrap();
        let by_batch = portwatch::maps::read_generation(&mut pinned, generation).unwrap();
        assert_eq!(by_batch.len(), by_key.len(), "generation {generation}");
        assert_eq!(
            by_batch.into_iter().collect::<BTreeMap<_, _>>(),
            by_key,
            "generation {generation}"
        );
        for (k, c) in by_key {
            *walked.entry(k).or_default() += c;
        }
    }
    portwatch::generations::for_each(&mut pinned, |k, c| *batched.entry(k).or_default() += c).unwrap();
    assert_eq!(batched, walked);
    // Known figures, not only agreement: 40,000 keys plus the two overflow keys per generation.
    let total = batched.values().fold(Counters::default(), |mut a, c| {
        a += *c;
        a
    });
    let expected_bytes: u64 =
        entries.iter().map(|(_, c)| c.bytes).sum::<u64>() + again.iter().map(|(_, c)| c.bytes).sum::<u64>();
    assert_eq!(
        total,
        Counters {
            bytes: expected_bytes,
            packets: 40_000 + 3 * again.len() as u64
        }
    );
    assert_eq!(batched.len(), 40_000 + 2);
}

/// A reset whose output fails leaves the counters as they were and the log as it was: a path that
/// cannot be opened fails before anything is zeroed; a full disk midway through the snapshot cuts
/// the file back to its old length and puts the counts back, with `--output FILE` and with
/// `>> FILE`; a stdout that fails puts the counts back too.
#[kernel_test]
fn a_reset_that_cannot_write_changes_nothing() {
    let lo = loaded_on_lo("full", &[]);
    let pw = &lo.pw;
    // 3,000 rows: a JSON snapshot of about 300 kB.
    let entries = portwatch_tests::synthetic_entries(3000);
    fill_counters(&pw.pin, 0, &entries).unwrap();
    let all = Counters {
        bytes: entries.iter().map(|(_, c)| c.bytes).sum(),
        packets: 3000,
    };
    let totals = |pw: &Pw| counters_of(&json(pw, &["top", "--json"])["totals"]);
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
    assert!(r.stderr.contains("put back"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "{\"earlier\":true}\n");
    assert_eq!(totals(pw), all);

    // The same with `>> log` (stdout appending to the file).
    let mut appending = pw.command(&["reset", "--json"]);
    appending.stdout(std::fs::OpenOptions::new().append(true).open(&log).unwrap());
    let out = appending.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("put back"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "{\"earlier\":true}\n");
    assert_eq!(totals(pw), all);

    let mut to_full = pw.command(&["reset", "--json"]);
    to_full.stdout(std::fs::File::create("/dev/full").unwrap());
    let out = to_full.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("put back"), "{stderr}");
    assert_eq!(totals(pw), all);

    // And a reset that can write takes it all, once.
    let zeroed = json(pw, &["reset", "--json"]);
    assert_eq!(counters_of(&zeroed["totals"]), all);
    assert_eq!(zeroed["rows"].as_array().unwrap().len(), 3000);
    assert_eq!(totals(pw), Counters::default());
}
