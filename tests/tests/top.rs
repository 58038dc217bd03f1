//! `portwatch top` on known traffic: ordering, grouping (every `--by`), filters, the JSON and CSV
//! schemas, exact figures and rates; and on a million-entry map.

use portwatch::generation::Remote;
use std::collections::BTreeMap;

use portwatch_common::Counters;
use portwatch_tests::{
    cli::{counters_of, Pw},
    fill_counters, kernel_test,
    netns::{Bed, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6},
};
use serde_json::Value;

fn row_ips(v: &Value) -> Vec<String> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ip"].as_str().unwrap().to_string())
        .collect()
}

/// UDP with known sizes: L3 bytes per datagram are the IP header, 8 and the payload.
fn udp_bytes(ip: &str, count: u64, payload: u64) -> u64 {
    count * (if ip.contains(':') { 40 } else { 20 } + 8 + payload)
}

#[kernel_test]
fn top_shows_exact_figures_in_every_view() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::load(&bed.server, &bed.server_if, &["7002/udp", "7003/udp", "7001/tcp"]);
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
    let top = pw.json(&["top", "--json"]);
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
    let top2 = pw.json(&["top", "-n", "2", "--json"]);
    assert_eq!(row_ips(&top2), [a, b]);
    assert_eq!(counters_of(&top2["totals"]), total);

    // --sort packets.
    assert_eq!(row_ips(&pw.json(&["top", "--sort", "packets", "--json"]))[0], d);

    // --by ip-port: one row per (IP, port, protocol, direction).
    let per_port = pw.json(&["top", "--by", "ip-port", "--json"]);
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
    let by_port = pw.json(&["top", "--by", "port", "--json"]);
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
    let cidr = pw.json(&["top", "--by", "cidr", "--json"]);
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
    let wide = pw.json(&["top", "--by", "cidr", "--prefix4", "15", "--json"]);
    assert_eq!(wide["rows"][0]["cidr"], "198.18.0.0/15");

    // Filters.
    let only_7003 = pw.json(&["top", "--port", "7003", "--json"]);
    assert_eq!(row_ips(&only_7003), [c, a]);
    assert_eq!(
        counters_of(&only_7003["totals"]),
        Counters {
            bytes: udp_bytes(a, 20, 1000) + bytes_c,
            packets: 50
        }
    );
    assert!(pw.json(&["top", "--port", "7003/tcp", "--json"])["rows"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(pw.json(&["top", "--direction", "egress", "--json"])["rows"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        pw.json(&["top", "--direction", "ingress", "--json"])["rows"]
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
    let rated = pw.json(&["top", "--interval", "0.3", "--count", "1", "--json"]);
    assert_eq!(rated["rows"][0]["bytes_per_sec"], 0.0);
    assert_eq!(rated["rows"][0]["packets_per_sec"], 0.0);
    assert_eq!(counters_of(&rated["totals"]), total);
}

/// A counter map of 1,000,000 entries: `top -n 10 --json` returns the right ten.
#[kernel_test]
fn top_over_a_million_entries() {
    // --force: a million entries (about 480 MiB) is past the memory guard on a small machine (the
    // kernel matrix's 2 GiB guests).
    let lo = Pw::on_loopback("big", &["--max-entries", "1000000", "--force"]);
    let pw = &lo.pw;
    // Entry i: remote 2001:db8::<i>, bytes a permutation of 0..N so that the top ten are known.
    const N: u64 = 1_000_000;
    let entries = portwatch_tests::synthetic_entries(N);
    fill_counters(&pw.pin, 0, &entries).unwrap();
    let mut expected: Vec<_> = entries
        .iter()
        .map(|(k, c)| match k.remote {
            Remote::Ip(ip) => (c.bytes, ip),
            _ => unreachable!("synthetic entries are addresses"),
        })
        .collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    let expected: Vec<(String, u64)> = expected[..10]
        .iter()
        .map(|(b, ip)| (std::net::Ipv6Addr::from(*ip).to_string(), *b))
        .collect();

    let top = pw.json(&["top", "-n", "10", "--json"]);
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
