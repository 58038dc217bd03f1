//! Every command's output on a fixed pinned state, byte for byte: help, load, attach, ports, status
//! (human and JSON), top (every `--by`, table/exact/JSON/CSV, filters, rates), reset (JSON, CSV,
//! table), detach, unload and the errors, against a golden transcript: `tests/golden/transcript.txt`
//! with TCX links, `tests/golden/transcript-tc.txt` with the classic clsact qdisc (every kernel).
//!
//! `transcript.txt` was written by the portwatch that predates the refactoring into shared types
//! and printers: it is what shows that the refactoring changed no output. `transcript-tc.txt` came
//! later (with the kernel matrix), from the refactored portwatch. Only what a run cannot fix is
//! masked: the pin path, program and link ids, program tags, reset ids, the time, the measured
//! interval and the maps' kernel memory (it varies with the possible CPUs and the kernel).
//! After an intended change of output, rewrite the transcripts with
//! `PORTWATCH_BLESS=1 cargo test -p portwatch-tests --test outputs` and review their diff.

use std::{fmt::Write as _, path::Path};

use portwatch::generation::{Key, Remote};
use portwatch_common::{
    Counters,
    Direction::{Egress as EG, Ingress as IN},
    PortKey, Stats, IPPROTO_TCP, IPPROTO_UDP,
};
use portwatch_tests::{cli::Pw, fill_counters, kernel_test, key, netns::Netns};

/// A prefix tier's key.
fn prefix(cidr: &str, port: u16, proto: u8, direction: portwatch_common::Direction) -> Key {
    Key {
        remote: Remote::Prefix(cidr.parse().unwrap()),
        port,
        proto,
        direction,
    }
}

/// The counters of both generations: IPv4 and IPv6, every port kind, both directions and
/// protocols, a key in both generations, ties in bytes (broken by the key), every tier, overflow
/// traffic.
fn generation(g: u32) -> Vec<(Key, Counters)> {
    let c = |bytes, packets| Counters { bytes, packets };
    if g == 0 {
        vec![
            (key("198.18.0.7", 443, IPPROTO_TCP, IN), c(1_500_000, 1200)),
            (key("198.18.0.7", 443, IPPROTO_TCP, EG), c(9_000_000, 7000)),
            (key("198.18.0.9", 443, IPPROTO_UDP, IN), c(52_000, 40)),
            (key("198.18.3.1", 53, IPPROTO_UDP, IN), c(3_000, 30)),
            (key("198.18.3.2", 53, IPPROTO_UDP, IN), c(3_000, 31)),
            (key("2001:db8::7", 443, IPPROTO_TCP, IN), c(700_000, 500)),
            (key("2001:db8:0:1::9", 8080, IPPROTO_TCP, EG), c(123_456_789, 90_000)),
            (key("198.19.255.254", 8000, IPPROTO_TCP, IN), c(1023, 1)),
            // Past the per-IP map: a prefix, a wide prefix, a port alone, and the overflow key.
            (prefix("198.51.100.0/24", 443, IPPROTO_TCP, IN), c(2_000_000, 1500)),
            (prefix("2001:db8::/32", 53, IPPROTO_UDP, IN), c(5_000, 50)),
            (Key::any_remote(PortKey::new(443, IPPROTO_TCP, IN)), c(64_000, 1000)),
            (Key::overflow(IN), c(4096, 3)),
        ]
    } else {
        vec![
            (key("198.18.0.7", 443, IPPROTO_TCP, IN), c(500_000, 300)),
            (key("2001:db8::7", 53, IPPROTO_UDP, IN), c(999, 9)),
        ]
    }
}

/// Statistics with a different figure in every field, so that a field printed under another's
/// name shows.
const STATS: Stats = Stats {
    matched_packets: 101,
    matched_bytes: 202_000,
    unwatched_packets: 3,
    non_ip_packets: 5,
    unknown_l4_packets: 7,
    fragment_packets: 11,
    truncated_packets: 13,
    malformed_packets: 17,
    header_limit_packets: 19,
    map_full_packets: 23,
    map_full_bytes: 29_000,
    overflow_missing_packets: 31,
};

fn fill(pw: &Pw) {
    for g in [0, 1] {
        fill_counters(&pw.pin, g, &generation(g)).unwrap();
    }
}

/// Appends a command, its exit code, stdout and stderr to the transcript.
fn run(pw: &Pw, transcript: &mut String, args: &[&str]) {
    let r = pw.run(args);
    let _ = writeln!(transcript, "$ portwatch {}", args.join(" "));
    let _ = writeln!(transcript, "[exit {}]", r.code);
    transcript.push_str(&r.stdout);
    if !r.stderr.is_empty() {
        transcript.push_str("[stderr]\n");
        transcript.push_str(&r.stderr);
    }
    transcript.push('\n');
}

/// Masks what differs from run to run, and nothing else.
fn normalize(text: &str, pin: &Path) -> String {
    let text = text.replace(&pin.display().to_string(), "PIN");
    let rules = [
        (r#""time":\d+"#, r#""time":TIME"#),
        (r#""reset_id":"[0-9a-f]{16}""#, r#""reset_id":"ID""#),
        // The leading time column of a CSV stream.
        (r"(?m)^\d{10},", "TIME,"),
        (r#""interval_secs":[0-9.e-]+"#, r#""interval_secs":INTERVAL"#),
        (r#""id": \d+"#, r#""id": ID"#),
        (r#""link_id": \d+"#, r#""link_id": ID"#),
        (r"\bid \d+ tag [0-9a-f]{16}", "id ID tag TAG"),
        (r#""tag": "[0-9a-f]{16}""#, r#""tag": "TAG""#),
        (r"\blink \d+", "link ID"),
        // The maps' kernel memory: per possible CPU, and what this kernel's structures take.
        (
            r"maps: [0-9.]+ [KMGT]?i?B of kernel memory \([0-9,]+ bytes\)",
            "maps: SIZE of kernel memory (BYTES bytes)",
        ),
        (r#""maps_memory_bytes": ?\d+"#, r#""maps_memory_bytes": BYTES"#),
        (
            r"(?m)^portwatch_maps_memory_bytes \d+$",
            "portwatch_maps_memory_bytes BYTES",
        ),
    ];
    rules.iter().fold(text, |t, (pattern, with)| {
        regex::Regex::new(pattern).unwrap().replace_all(&t, *with).into_owned()
    })
}

/// `mode` attaches `lo` and `pwg1` (`pwg0` is always attached with tc).
#[kernel_test(each_mode)]
fn outputs_stay_the_same(mode: &str) {
    let ns = Netns::new("golden").unwrap();
    // Interfaces kept down: nothing sends, so the statistics are the test's own figures.
    for iface in ["pwg0", "pwg1"] {
        ns.add_veth(iface, &format!("{iface}p")).unwrap();
    }
    let pw = Pw::new(Some(&ns));
    let mut t = String::new();

    for help in [
        &["--help"][..],
        &["--version"],
        &["load", "--help"],
        &["attach", "--help"],
        &["detach", "--help"],
        &["ports", "--help"],
        &["ports", "add", "--help"],
        &["ports", "del", "--help"],
        &["ports", "set", "--help"],
        &["ports", "list", "--help"],
        &["status", "--help"],
        &["top", "--help"],
        &["reset", "--help"],
        &["unload", "--help"],
        &["check", "--help"],
        &["apply", "--help"],
        &["watch", "--help"],
        &["config", "show", "--help"],
        &["metrics", "--help"],
        &["serve", "--help"],
        &["alert", "--help"],
        &["history", "--help"],
        &["history", "ingest", "--help"],
        &["history", "top", "--help"],
        &["completions", "--help"],
        &["man", "--help"],
    ] {
        run(&pw, &mut t, help);
    }

    // Nothing loaded.
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["unload"],
        &["ports", "list"],
        &["top"],
    ] {
        run(&pw, &mut t, args);
    }

    run(
        &pw,
        &mut t,
        &[
            "load",
            "--iface",
            "lo",
            "--port",
            "443",
            "--port",
            "53/udp",
            "--port",
            "8000-8100/tcp",
            "--mode",
            mode,
        ],
    );
    run(
        &pw,
        &mut t,
        &["attach", "pwg0", "--mode", "tc", "--direction", "ingress"],
    );
    run(&pw, &mut t, &["ports", "add", "8080/tcp"]);
    run(&pw, &mut t, &["ports", "del", "8050-8060"]);
    run(&pw, &mut t, &["ports", "list"]);
    run(&pw, &mut t, &["ports", "list", "--json"]);

    fill(&pw);
    portwatch_tests::set_stats(&pw.pin, STATS).unwrap();
    run(&pw, &mut t, &["status"]);
    run(&pw, &mut t, &["status", "--json"]);
    run(&pw, &mut t, &["config", "show"]);
    run(&pw, &mut t, &["metrics"]);
    run(&pw, &mut t, &["metrics", "--per-ip", "2"]);
    run(&pw, &mut t, &["metrics", "--per-cidr", "24,64", "--max-series", "4"]);

    for by in ["ip", "ip-port", "port", "cidr", "cidr-port"] {
        for format in [&[][..], &["--exact"], &["--json"], &["--csv"]] {
            let mut args = vec!["top", "--by", by];
            args.extend_from_slice(format);
            run(&pw, &mut t, &args);
        }
    }
    for args in [
        &["top", "-n", "2"][..],
        &["top", "-n", "1", "--by", "port", "--csv"],
        &["top", "-n", "0", "--sort", "packets", "--json"],
        &["top", "--sort", "packets", "--by", "ip-port"],
        &["top", "--port", "443", "--json"],
        &["top", "--port", "53/udp", "--by", "ip-port"],
        &[
            "top",
            "--port",
            "8000-8100",
            "--port",
            "443/udp",
            "--by",
            "ip-port",
            "--csv",
        ],
        &["top", "--direction", "egress", "--by", "ip-port", "--csv"],
        &["top", "--direction", "ingress", "--json"],
        &["top", "--by", "cidr", "--prefix4", "16", "--prefix6", "32"],
        &["top", "--by", "cidr", "--prefix4", "0", "--prefix6", "128", "--json"],
        &["top", "--interval", "0.1", "--count", "1", "--json"],
        &["top", "--interval", "0.1", "--by", "ip-port"],
        &["top", "--interval", "0.1", "--exact"],
        &["top", "--interval", "0.1", "--count", "1", "--csv"],
        &["top", "--interval", "0.1", "--count", "2", "--csv", "--by", "port"],
    ] {
        run(&pw, &mut t, args);
    }

    // Resets: selective, then everything, in each format (the maps filled again before each).
    run(
        &pw,
        &mut t,
        &["reset", "--port", "443", "--ip", "198.18.0.0/16", "--json"],
    );
    run(&pw, &mut t, &["top", "--by", "ip-port", "--json"]);
    run(&pw, &mut t, &["reset", "--ip", "2001:db8::/48", "--csv"]);
    run(&pw, &mut t, &["reset", "--csv"]);
    for args in [&["reset"][..], &["reset", "--exact"], &["reset", "--json"]] {
        fill(&pw);
        run(&pw, &mut t, args);
    }
    run(&pw, &mut t, &["top"]);
    run(&pw, &mut t, &["reset", "--json"]);

    // An interface that vanishes.
    run(&pw, &mut t, &["attach", "pwg1", "--mode", mode]);
    ns.ip(&["link", "del", "pwg1"]).unwrap();
    run(&pw, &mut t, &["status"]);
    run(&pw, &mut t, &["status", "--json"]);
    run(&pw, &mut t, &["detach", "pwg1"]);

    // Errors.
    for args in [
        &["ports", "add", "0"][..],
        &["ports", "add", "https/sctp"],
        &["detach", "nosuch0"],
        &["attach", "nosuch0"],
        &["load", "--iface", "lo", "--max-entries", "5"],
        &["load", "--iface", "lo", "--direction", "ingress"],
        &["load", "--iface", "lo", "--port", "443"],
        &["top", "--interval", "0"],
        &["top", "--count", "3"],
        &["metrics", "--per-ip", "2", "--per-cidr", "24,64"],
        &["reset", "--ip", "198.18.0.0/33"],
    ] {
        run(&pw, &mut t, args);
    }

    run(&pw, &mut t, &["detach", "pwg0"]);
    run(&pw, &mut t, &["unload"]);
    run(&pw, &mut t, &["status"]);

    let got = normalize(&t, &pw.pin);
    let name = if mode == "tcx" {
        "transcript.txt"
    } else {
        "transcript-tc.txt"
    };
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(name);
    if std::env::var_os("PORTWATCH_BLESS").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
    if got != want {
        let actual = std::env::temp_dir().join(format!("portwatch-{mode}-{name}-{}", std::process::id()));
        std::fs::write(&actual, &got).unwrap();
        let first = got
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(got.lines().count().min(want.lines().count()));
        panic!(
            "the output differs from tests/golden/{name} from line {}: `diff {} {}`\n  want: {:?}\n  got:  {:?}",
            first + 1,
            golden.display(),
            actual.display(),
            want.lines().nth(first),
            got.lines().nth(first)
        );
    }
}
