//! portwatch's demo: two throwaway network namespaces joined by a veth pair, the embedded kernel
//! program attached to the server's end (TCX, ingress and egress), real TCP and UDP traffic from
//! three client addresses over IPv4 and IPv6, then the counters it kept, per remote IP.
//! Everything it creates is removed when it exits.
//!
//!     sudo examples/demo.sh

use anyhow::{Context, Result};
use ctl_common::{DIRECTION_INGRESS, IPPROTO_TCP, PROTO_ALL, PROTO_UDP};
use portwatch_tests::{
    netns::{Bed, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6},
    real_counters, Harness,
};

fn main() -> Result<()> {
    let bed = Bed::new(true).context("creating the demo namespaces (needs root)")?;
    let mut h = Harness::new(65536)?;
    h.watch(443, PROTO_ALL)?;
    h.watch(53, PROTO_UDP)?;
    bed.server.enter(|| h.attach_tcx(&bed.server_if))??;
    println!(
        "portwatch demo: watching 443 (tcp, udp) and 53 (udp) on {} in namespace {}",
        bed.server_if, bed.server.name
    );

    bed.tcp_transfer(CLIENT_V4[0], SERVER_V4, 443, 3_000_000)?;
    bed.tcp_transfer(CLIENT_V6[0], SERVER_V6, 443, 1_000_000)?;
    bed.send_udp(CLIENT_V4[1], SERVER_V4, 53, 200, 512)?;
    bed.send_udp(CLIENT_V6[1], SERVER_V6, 53, 100, 512)?;
    bed.send_udp(CLIENT_V4[2], SERVER_V4, 443, 50, 1200)?;
    bed.send_udp(CLIENT_V4[2], SERVER_V4, 8080, 50, 1200)?; // not watched
    println!("sent: 3 MB tcp/443 from {} and 1 MB from {}, udp/53 from {} and {}, udp/443 from {}, udp/8080 (unwatched)\n",
        CLIENT_V4[0], CLIENT_V6[0], CLIENT_V4[1], CLIENT_V6[1], CLIENT_V4[2]);

    let mut rows: Vec<_> = real_counters(&h.counters(0)?).into_iter().collect();
    rows.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes));
    println!(
        "{:<28} {:>5} {:<5} {:<8} {:>12} {:>9}",
        "REMOTE IP", "PORT", "PROTO", "DIR", "BYTES", "PACKETS"
    );
    for (k, c) in rows {
        let ip = std::net::Ipv6Addr::from(k.remote_ip_octets());
        let ip = ip
            .to_ipv4_mapped()
            .map(|v4| v4.to_string())
            .unwrap_or_else(|| ip.to_string());
        let proto = if k.proto == IPPROTO_TCP { "tcp" } else { "udp" };
        let dir = if k.direction == DIRECTION_INGRESS {
            "ingress"
        } else {
            "egress"
        };
        println!(
            "{ip:<28} {:>5} {proto:<5} {dir:<8} {:>12} {:>9}",
            k.port, c.bytes, c.packets
        );
    }
    let s = h.stats()?;
    println!(
        "\nmatched {} packets / {} bytes; unwatched {}; not IP {}; other L4 {}; map full {}",
        s.matched_packets,
        s.matched_bytes,
        s.unwatched_packets,
        s.non_ip_packets,
        s.unknown_l4_packets,
        s.map_full_packets
    );
    Ok(())
}
