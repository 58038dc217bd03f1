//! Real traffic: `portwatch load` on a veth in a namespace the test creates (with TCX links where
//! the kernel has them, and with the classic clsact qdisc everywhere), real TCP and UDP sockets
//! sending from a second namespace, over IPv4 and IPv6. The counters must equal, to the byte, the
//! L3 bytes and packets that crossed: computed from first principles for UDP, and read from an
//! nftables counter on the same traffic for TCP (whose segmentation the stack decides).

use portwatch_common::{
    Counters,
    Direction::{Egress as EG, Ingress as IN},
    IPPROTO_TCP as TCP, IPPROTO_UDP as UDP,
};
use portwatch_tests::{
    cli::Pw,
    kernel_test, key,
    netns::{Bed, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6},
    nft,
};

const TCP_PORT: u16 = 7001;
const UDP_PORT: u16 = 7002;

/// portwatch loaded in `mode` on the server's end of the bed, watching TCP and UDP on `TCP_PORT`
/// and UDP on `UDP_PORT`.
fn load(bed: &Bed, mode: &str) -> Pw {
    let pw = Pw::load_with(
        &bed.server,
        &bed.server_if,
        &[&TCP_PORT.to_string(), &format!("{UDP_PORT}/udp")],
        &["--mode", mode, "--max-entries", "4096"],
    );
    assert!(pw.status()["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["mode"] == mode));
    pw
}

#[kernel_test(each_mode)]
fn counters_equal_the_l3_bytes_and_packets_that_crossed(mode: &str) {
    let bed = Bed::new(false).unwrap();
    let pw = load(&bed, mode);
    nft::install(&bed);

    // UDP: 300 datagrams of 1000 bytes from one address, 200 of 1200 from another, per family.
    let udp4_a = bed.send_udp(CLIENT_V4[1], SERVER_V4, UDP_PORT, 300, 1000).unwrap();
    let udp4_b = bed.send_udp(CLIENT_V4[2], SERVER_V4, UDP_PORT, 200, 1200).unwrap();
    let udp6_a = bed.send_udp(CLIENT_V6[1], SERVER_V6, UDP_PORT, 300, 1000).unwrap();
    let udp6_b = bed.send_udp(CLIENT_V6[2], SERVER_V6, UDP_PORT, 200, 1200).unwrap();
    // TCP: 2 MB each way of family, from the primary addresses.
    bed.tcp_transfer(CLIENT_V4[0], SERVER_V4, TCP_PORT, 2_000_000).unwrap();
    bed.tcp_transfer(CLIENT_V6[0], SERVER_V6, TCP_PORT, 2_000_000).unwrap();

    let got = pw.counters();
    let nft = nft::counters(&bed);
    let c = |ip: &str, port, proto, dir| got.get(&key(ip, port, proto, dir)).copied().unwrap_or_default();

    // UDP, from first principles: IP header + 8 + payload per datagram.
    assert_eq!(
        c(CLIENT_V4[1], UDP_PORT, UDP, IN),
        Counters {
            bytes: udp4_a,
            packets: 300
        }
    );
    assert_eq!(
        c(CLIENT_V4[2], UDP_PORT, UDP, IN),
        Counters {
            bytes: udp4_b,
            packets: 200
        }
    );
    assert_eq!(
        c(CLIENT_V6[1], UDP_PORT, UDP, IN),
        Counters {
            bytes: udp6_a,
            packets: 300
        }
    );
    assert_eq!(
        c(CLIENT_V6[2], UDP_PORT, UDP, IN),
        Counters {
            bytes: udp6_b,
            packets: 200
        }
    );
    // ...and nftables agrees.
    assert_eq!(
        nft["udp4_in"],
        Counters {
            bytes: udp4_a + udp4_b,
            packets: 500
        }
    );
    assert_eq!(
        nft["udp6_in"],
        Counters {
            bytes: udp6_a + udp6_b,
            packets: 500
        }
    );

    // TCP, both directions, against nftables.
    assert!(nft["tcp4_in"].bytes > 2_000_000, "the transfer crossed the veth");
    assert_eq!(c(CLIENT_V4[0], TCP_PORT, TCP, IN), nft["tcp4_in"]);
    assert_eq!(c(CLIENT_V4[0], TCP_PORT, TCP, EG), nft["tcp4_out"]);
    assert_eq!(c(CLIENT_V6[0], TCP_PORT, TCP, IN), nft["tcp6_in"]);
    assert_eq!(c(CLIENT_V6[0], TCP_PORT, TCP, EG), nft["tcp6_out"]);

    // Nothing else was counted (the pings that primed the neighbours are ICMP).
    assert_eq!(got.len(), 8, "unexpected keys: {got:#?}");
    let stats = pw.stats();
    let total = portwatch::generation::sum(&got.values().copied().collect::<Vec<_>>());
    assert_eq!(
        (stats.matched_packets, stats.matched_bytes),
        (total.packets, total.bytes)
    );
}

/// With TSO/GSO on, the veth carries super-packets of many segments: the program must count the
/// segments the wire would carry, with the headers each one repeats. The reference is the client's
/// own TCP (`TCP_INFO` segment counts), and for bytes the segments' sizes: every client segment has
/// a 20-byte IPv4 header and a 32-byte TCP header (timestamps), but the SYN, whose options make 40.
#[kernel_test(each_mode)]
fn gso_super_packets_count_as_their_wire_segments(mode: &str) {
    let bed = Bed::new(true).unwrap();
    let pw = load(&bed, mode);
    // A GSO super-packet is only made when TSO is on at the sender.
    let features = bed.client.exec(&["ethtool", "-k", &bed.client_if]).unwrap();
    assert!(features.contains("tcp-segmentation-offload: on"), "{features}");

    const PAYLOAD: u64 = 4_000_000;
    let segments = bed
        .tcp_transfer(CLIENT_V4[0], SERVER_V4, TCP_PORT, PAYLOAD as usize)
        .unwrap();
    let got = pw.counters();
    let ingress = got[&key(CLIENT_V4[0], TCP_PORT, TCP, IN)];
    let egress = got[&key(CLIENT_V4[0], TCP_PORT, TCP, EG)];
    assert_eq!(
        ingress.packets, segments.sent,
        "packets from the client = segments its TCP sent"
    );
    assert_eq!(
        egress.packets, segments.received,
        "packets to the client = segments its TCP received"
    );
    // tcpi_bytes_sent: the payload put on the wire, retransmissions included.
    assert!(segments.client_payload >= PAYLOAD);
    let expected_bytes = segments.sent * (20 + 32) + 8 + segments.client_payload;
    assert_eq!(
        ingress.bytes, expected_bytes,
        "L3 bytes of {} segments carrying {PAYLOAD} bytes",
        segments.sent
    );
    // And super-packets really crossed: the server's veth received far fewer skbs than segments.
    let skbs: u64 = bed
        .server
        .exec(&[
            "cat",
            &format!("/sys/class/net/{}/statistics/rx_packets", bed.server_if),
        ])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        skbs < segments.sent / 4,
        "{skbs} skbs for {} segments: no GSO happened",
        segments.sent
    );
    let stats = pw.stats();
    assert_eq!(stats.matched_packets, ingress.packets + egress.packets);
}
