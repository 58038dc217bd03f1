//! The kernel program against crafted packets, through `BPF_PROG_TEST_RUN`: every case asserts the
//! return code (`TC_ACT_UNSPEC`), that the packet left unchanged, the exact counter it landed in
//! (or that it landed in none) and the exact statistics.

use std::collections::BTreeMap;

use portwatch::generation::{Key, Remote};
use portwatch_common::{
    Counters, Direction,
    Direction::{Egress as EG, Ingress as IN},
    NotCounted as Reason, PortKey, Stats, TierSizes, IPPROTO_TCP as TCP, IPPROTO_UDP as UDP, PROTO_ALL, PROTO_TCP,
    PROTO_UDP,
};
use portwatch_tests::{
    kernel_test, key,
    packet::{Packet, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP},
    real_counters, Harness,
};

const TC_ACT_UNSPEC: i32 = -1;

/// Where a packet must land.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// In the counter of (remote IP, port, proto, direction) with these bytes and packets.
    Counted {
        ip: &'static str,
        port: u16,
        proto: u8,
        bytes: u64,
        packets: u64,
    },
    /// In no counter: a TCP/UDP packet of a port that is not watched (`unwatched_packets` goes up
    /// by one).
    Unwatched,
    /// In no counter, for this reason (its statistic goes up by one).
    NotCounted(Reason),
}
use Expect::*;
use Reason::*;

const C4: &str = "198.18.7.7"; // remote (client) IPv4
const S4: &str = "198.18.0.1"; // local (server) IPv4
const C6: &str = "2001:db8:7::7";
const S6: &str = "2001:db8::1";

/// Counted on ingress: bytes are the packet's L3 length, one packet.
fn counted_in(p: &Packet, ip: &'static str, port: u16, proto: u8) -> Expect {
    Counted {
        ip,
        port,
        proto,
        bytes: p.l3_len() as u64,
        packets: 1,
    }
}

struct Case {
    name: &'static str,
    direction: Direction,
    packet: Packet,
    gso: (u32, u32),
    expect: Expect,
}

fn case(name: &'static str, direction: Direction, packet: Packet, expect: impl FnOnce(&Packet) -> Expect) -> Case {
    let expect = expect(&packet);
    Case {
        name,
        direction,
        packet,
        gso: (0, 0),
        expect,
    }
}

fn cases() -> Vec<Case> {
    let tcp4 = || Packet::tcp4(C4, 40000, S4, 443);
    let udp4 = || Packet::udp4(C4, 40000, S4, 53);
    let tcp6 = || Packet::tcp6(C6, 40000, S6, 443);
    let udp6 = || Packet::udp6(C6, 40000, S6, 53);
    let mut v = vec![
        // Plain IPv4 and IPv6, TCP and UDP, both directions.
        case("ipv4 tcp ingress", IN, tcp4(), |p| counted_in(p, C4, 443, TCP)),
        case("ipv4 udp ingress", IN, udp4(), |p| counted_in(p, C4, 53, UDP)),
        case("ipv6 tcp ingress", IN, tcp6(), |p| counted_in(p, C6, 443, TCP)),
        case("ipv6 udp ingress", IN, udp6(), |p| counted_in(p, C6, 53, UDP)),
        case("ipv4 tcp empty payload", IN, tcp4().payload(0), |p| {
            counted_in(p, C4, 443, TCP)
        }),
        case(
            "ipv4 tcp egress reply",
            EG,
            Packet::tcp4(S4, 443, C4, 40000).payload(1400),
            |p| Counted {
                ip: C4,
                port: 443,
                proto: TCP,
                bytes: p.l3_len() as u64,
                packets: 1,
            },
        ),
        case(
            "ipv6 udp egress reply",
            EG,
            Packet::udp6(S6, 53, C6, 40000).payload(512),
            |p| Counted {
                ip: C6,
                port: 53,
                proto: UDP,
                bytes: p.l3_len() as u64,
                packets: 1,
            },
        ),
        // Egress looks at the source port: a packet *to* a watched port is not a reply.
        case(
            "egress to a watched port is not counted",
            EG,
            Packet::tcp4(S4, 40000, C4, 443),
            |_| Unwatched,
        ),
        // Ethernet padding after a short frame is not L3 bytes.
        case(
            "ipv4 udp with ethernet padding",
            IN,
            udp4().payload(2).trailer(16),
            |p| counted_in(p, C4, 53, UDP),
        ),
        // VLAN tags in the packet.
        case("802.1Q ipv4 tcp", IN, tcp4().vlan(ETH_P_8021Q), |p| {
            counted_in(p, C4, 443, TCP)
        }),
        case(
            "802.1ad+802.1Q ipv6 udp",
            IN,
            udp6().vlan(ETH_P_8021AD).vlan(ETH_P_8021Q),
            |p| counted_in(p, C6, 53, UDP),
        ),
        case(
            "three VLAN tags",
            IN,
            tcp4().vlan(ETH_P_8021AD).vlan(ETH_P_8021Q).vlan(ETH_P_8021Q),
            |_| NotCounted(HeaderLimit),
        ),
        // IPv4 options: L4 found after IHL*4 bytes.
        case("ipv4 with 8 bytes of options", IN, tcp4().ipv4_options(8), |p| {
            counted_in(p, C4, 443, TCP)
        }),
        case("ipv4 with 40 bytes of options", IN, udp4().ipv4_options(40), |p| {
            counted_in(p, C4, 53, UDP)
        }),
        // IPv6 extension headers.
        case("ipv6 hop-by-hop", IN, tcp6().ext(0, 1), |p| counted_in(p, C6, 443, TCP)),
        case(
            "ipv6 hop-by-hop, routing, destination options",
            IN,
            udp6().ext(0, 1).ext(43, 3).ext(60, 2),
            |p| counted_in(p, C6, 53, UDP),
        ),
        case("ipv6 authentication header", IN, tcp6().ext(51, 3), |p| {
            counted_in(p, C6, 443, TCP)
        }),
        case(
            "ipv6 eight extension headers",
            IN,
            tcp6()
                .ext(0, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1),
            |p| counted_in(p, C6, 443, TCP),
        ),
        case(
            "ipv6 nine extension headers",
            IN,
            tcp6()
                .ext(0, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1)
                .ext(60, 1),
            |_| NotCounted(HeaderLimit),
        ),
        // Fragments: the first carries the L4 header and is counted (its own L3 bytes); the others
        // carry no port.
        case(
            "ipv4 first fragment",
            IN,
            tcp4().payload(1000).ipv4_fragment(0, true),
            |p| counted_in(p, C4, 443, TCP),
        ),
        case("ipv4 non-first fragment", IN, tcp4().ipv4_fragment(185, true), |_| {
            NotCounted(Fragment)
        }),
        case("ipv4 last fragment", IN, udp4().ipv4_fragment(185, false), |_| {
            NotCounted(Fragment)
        }),
        case(
            "ipv6 first fragment",
            IN,
            udp6().payload(1000).ipv6_fragment(0, true),
            |p| counted_in(p, C6, 53, UDP),
        ),
        case("ipv6 non-first fragment", IN, udp6().ipv6_fragment(150, false), |_| {
            NotCounted(Fragment)
        }),
        case(
            "ipv6 fragment after hop-by-hop",
            IN,
            tcp6().ext(0, 1).ipv6_fragment(7, true),
            |_| NotCounted(Fragment),
        ),
        // Truncated at every layer.
        case("truncated VLAN tag", IN, tcp4().vlan(ETH_P_8021Q).truncate(15), |_| {
            NotCounted(Truncated)
        }),
        // BPF_PROG_TEST_RUN refuses an untagged frame whose IP header is short (it checks the header
        // of skb->protocol), so the short IP headers ride behind a VLAN tag.
        case(
            "truncated ipv4 header",
            IN,
            tcp4().vlan(ETH_P_8021Q).truncate(18 + 19),
            |_| NotCounted(Truncated),
        ),
        case(
            "truncated ipv4 options",
            IN,
            tcp4().ipv4_options(12).truncate(14 + 24),
            |_| NotCounted(Truncated),
        ),
        case(
            "truncated ipv6 header",
            IN,
            tcp6().vlan(ETH_P_8021Q).truncate(18 + 39),
            |_| NotCounted(Truncated),
        ),
        case(
            "truncated ipv6 extension header",
            IN,
            tcp6().ext(0, 1).ext(60, 2).truncate(14 + 40 + 8 + 1),
            |_| NotCounted(Truncated),
        ),
        case(
            "truncated tcp header",
            IN,
            tcp4().payload(0).truncate(14 + 20 + 19),
            |_| NotCounted(Truncated),
        ),
        case(
            "truncated udp header",
            IN,
            udp6().payload(0).truncate(14 + 40 + 7),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv4 total length beyond the packet",
            IN,
            tcp4().payload(100).truncate(14 + 20 + 20 + 50),
            |_| NotCounted(Truncated),
        ),
        // Malformed.
        case("ipv4 IHL 4", IN, tcp4().ipv4_ihl(4), |_| NotCounted(Malformed)),
        case("ipv4 IHL 0", IN, udp4().ipv4_ihl(0), |_| NotCounted(Malformed)),
        case("tcp data offset 4", IN, tcp4().tcp_doff(4), |_| NotCounted(Malformed)),
        // Not watched.
        case("port not watched", IN, Packet::tcp4(C4, 40000, S4, 80), |_| Unwatched),
        case("udp to a tcp-only port", IN, Packet::udp4(C4, 40000, S4, 8080), |_| {
            Unwatched
        }),
        case("tcp to a udp-only port", IN, Packet::tcp6(C6, 40000, S6, 53), |_| {
            Unwatched
        }),
        case("tcp to a tcp-only port", IN, Packet::tcp4(C4, 40000, S4, 8080), |p| {
            counted_in(p, C4, 8080, TCP)
        }),
        // Not IP at all: an ARP frame (its bytes are whatever follows the EtherType), and an IP
        // packet behind a VLAN tag whose inner EtherType is ARP.
        case("arp frame", IN, tcp4().ethertype(ETH_P_ARP), |_| NotCounted(NonIp)),
        case(
            "arp inside a vlan tag",
            IN,
            tcp4().vlan(ETH_P_8021Q).ethertype(ETH_P_ARP),
            |_| NotCounted(NonIp),
        ),
        // Unknown protocols.
        case("ipv4 icmp", IN, tcp4().proto(1), |_| NotCounted(UnknownL4)),
        case("ipv6 esp", IN, tcp6().proto(50), |_| NotCounted(UnknownL4)),
        case("ipv6 no next header", IN, tcp6().proto(59), |_| NotCounted(UnknownL4)),
        // Every header is read inside the IP datagram, not only inside the frame: bytes after the
        // datagram (Ethernet padding, a trailer) are not headers, even when they look like one.
        case(
            "ipv4 tcp header past the total length, in the padding",
            IN,
            tcp4().payload(0).ip_len(20 + 10).trailer(20),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv4 udp header past the total length, in the padding",
            IN,
            udp4().payload(0).ip_len(20).trailer(30),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 udp header past the payload length, in the padding",
            IN,
            udp6().payload(0).ip_len(4).trailer(20),
            |_| NotCounted(Truncated),
        ),
        case(
            "tcp options past the datagram",
            IN,
            tcp4().payload(0).tcp_doff(10).trailer(40),
            |_| NotCounted(Truncated),
        ),
        case(
            "tcp options up to the datagram's end",
            IN,
            tcp4().payload(20).tcp_doff(10).trailer(6),
            |p| counted_in(p, C4, 443, TCP),
        ),
        case(
            "ipv6 extension header past the payload length",
            IN,
            tcp6().ext(60, 2).ip_len(8).trailer(20),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 fragment header past the payload length",
            IN,
            udp6().ipv6_fragment(0, true).ip_len(4).trailer(30),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 datagram ends right after its extension headers: no tcp header",
            IN,
            tcp6().ext(0, 1).ext(60, 1).ip_len(16).trailer(20),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 datagram ends right after its extension headers: no next header",
            IN,
            tcp6().ext(0, 1).ext(60, 1).proto(59).payload(0),
            |_| NotCounted(UnknownL4),
        ),
        case(
            "ipv4 total length shorter than the packet: the rest is padding",
            IN,
            udp4().payload(100).ip_len(20 + 8 + 60),
            |_| Counted {
                ip: C4,
                port: 53,
                proto: UDP,
                bytes: 20 + 8 + 60,
                packets: 1,
            },
        ),
        case(
            "the udp length field is not checked",
            IN,
            udp6().payload(0).trailer(4).ip_len(8 + 4),
            |_| Counted {
                ip: C6,
                port: 53,
                proto: UDP,
                bytes: 40 + 8 + 4,
                packets: 1,
            },
        ),
        // An IP length of 0 is the skb's length only for a GSO super-packet (BIG TCP, below) or,
        // for IPv6, with a Jumbo Payload option (RFC 2675); otherwise the header is malformed.
        case("ipv4 total length 0", IN, udp4().ip_len(0).trailer(10), |_| {
            NotCounted(Malformed)
        }),
        case(
            "ipv6 payload length 0 without a jumbo option",
            IN,
            udp6().payload(2).ip_len(0).trailer(16),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv6 payload length 0 with a hop-by-hop header but no jumbo option",
            IN,
            udp6().ext(0, 1).ip_len(0),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv6 jumbogram longer than the frame",
            IN,
            tcp6().jumbo(0, 4, 70_000).ip_len(0),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 jumbo option after pad options, longer than the frame",
            IN,
            udp6().jumbo(3, 4, 100_000).ip_len(0),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 jumbo option saying 65535 or less",
            IN,
            tcp6().jumbo(0, 4, 65_535).ip_len(0),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv6 jumbo option of length 3",
            IN,
            tcp6().jumbo(0, 3, 70_000).ip_len(0),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv6 hop-by-hop option running past its header",
            IN,
            tcp6().ext_raw(0, vec![1, 9, 0, 0, 0, 0]).ip_len(0),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv6 jumbo option after eight pad1 options",
            IN,
            tcp6().jumbo(8, 4, 70_000).ip_len(0),
            |_| NotCounted(HeaderLimit),
        ),
        case(
            "ipv6 jumbo option with its hop-by-hop header cut short",
            IN,
            tcp6().jumbo(0, 4, 70_000).ip_len(0).truncate(14 + 40 + 5),
            |_| NotCounted(Truncated),
        ),
        // Precedence: the IP header and its length are checked before the fragment offset and the
        // protocol; a header is checked whole before its next header or fragment offset counts.
        case(
            "ipv4 total length 0 of an icmp packet: malformed before the protocol",
            IN,
            tcp4().proto(1).ip_len(0),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv4 total length 0 of a non-first fragment: malformed before the fragment",
            IN,
            tcp4().ipv4_fragment(185, true).ip_len(0),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv4 total length below IHL of a non-first fragment: malformed",
            IN,
            tcp4().ipv4_options(20).ipv4_fragment(185, false).ip_len(24),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv4 IHL 4 with a total length past the frame: malformed before truncated",
            IN,
            tcp4().ipv4_ihl(4).ip_len(1000),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv4 non-first fragment longer than the frame: truncated before fragment",
            IN,
            tcp4().ipv4_fragment(185, true).ip_len(1000),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv4 icmp longer than the frame: truncated before the protocol",
            IN,
            tcp4().proto(1).ip_len(1000),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 esp longer than the frame: truncated before the protocol",
            IN,
            tcp6().proto(50).ip_len(1000),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 payload length 0 of an icmpv6 packet: malformed before the protocol",
            IN,
            tcp6().proto(58).ip_len(0),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv6 version 4 behind the ipv6 ethertype",
            IN,
            tcp4().ethertype(portwatch_tests::packet::ETH_P_IPV6).payload(40),
            |_| NotCounted(Malformed),
        ),
        case(
            "ipv6 extension header cut short whose next header is icmp: truncated",
            IN,
            tcp6().ext(60, 2).proto(58).ip_len(12).trailer(20),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 fragment header with an offset, cut short: truncated before fragment",
            IN,
            udp6().ipv6_fragment(150, false).ip_len(6).trailer(10),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 eighth extension header cut short: truncated before the header limit",
            IN,
            tcp6()
                .ext(0, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 2)
                .ext(60, 1)
                .ip_len(7 * 8 + 12)
                .trailer(40),
            |_| NotCounted(Truncated),
        ),
        case(
            "ipv6 ninth extension header past the datagram: header limit, not read",
            IN,
            tcp6()
                .ext(0, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1)
                .ext(43, 1)
                .ext(60, 1)
                .ext(60, 1)
                .ip_len(8 * 8),
            |_| NotCounted(HeaderLimit),
        ),
        case(
            "three VLAN tags, the third cut short: header limit, not read",
            IN,
            tcp4()
                .vlan(ETH_P_8021AD)
                .vlan(ETH_P_8021Q)
                .vlan(ETH_P_8021Q)
                .truncate(14 + 8 + 1),
            |_| NotCounted(HeaderLimit),
        ),
        case(
            "tcp data offset 4 with the header past the datagram: truncated before malformed",
            IN,
            tcp4().payload(0).tcp_doff(4).ip_len(20 + 12).trailer(10),
            |_| NotCounted(Truncated),
        ),
        case(
            "tcp data offset 4 with options past the datagram: malformed",
            IN,
            tcp4().payload(0).tcp_doff(4),
            |_| NotCounted(Malformed),
        ),
    ];

    // GSO super-packets: max(gso_segs, 1) packets; each segment repeats the L3 and L4 headers.
    for (name, p, segs) in [
        ("gso ipv4 tcp, 3 segments", tcp4().payload(3000), 3u32),
        // BPF_PROG_TEST_RUN takes at most a page of data, so super-packets stay small here.
        (
            "gso ipv6 tcp with extension header, 3 segments",
            tcp6().ext(60, 1).payload(3 * 1000),
            3,
        ),
        ("gso ipv4 udp (UDP_SEGMENT), 3 segments", udp4().payload(3 * 1000), 3),
    ] {
        let expect_ip = match p.ip {
            portwatch_tests::packet::Ip::V4 { .. } => C4,
            portwatch_tests::packet::Ip::V6 { .. } => C6,
        };
        let proto = p.proto;
        let port = p.dst_port;
        let bytes = (p.l3_len() + (segs as usize - 1) * p.headers_len()) as u64;
        v.push(Case {
            name,
            direction: IN,
            packet: p,
            gso: (segs, 1000),
            expect: Counted {
                ip: expect_ip,
                port,
                proto,
                bytes,
                packets: segs as u64,
            },
        });
    }
    // BIG TCP: a GSO super-packet longer than 64 KiB has an IP length of 0; its datagram is the
    // rest of the skb (here small: BPF_PROG_TEST_RUN takes a page at most).
    for (name, p) in [
        (
            "gso ipv4 tcp with total length 0 (BIG TCP)",
            tcp4().payload(3000).ip_len(0),
        ),
        (
            "gso ipv6 tcp with payload length 0 (BIG TCP)",
            tcp6().payload(3000).ip_len(0),
        ),
    ] {
        let (expect_ip, port) = match p.ip {
            portwatch_tests::packet::Ip::V4 { .. } => (C4, 443),
            portwatch_tests::packet::Ip::V6 { .. } => (C6, 443),
        };
        let bytes = (p.l3_len() + 2 * p.headers_len()) as u64;
        v.push(Case {
            name,
            direction: IN,
            packet: p,
            gso: (3, 1000),
            expect: Counted {
                ip: expect_ip,
                port,
                proto: TCP,
                bytes,
                packets: 3,
            },
        });
    }
    // GSO is `gso_size` (skb_is_gso): gso_segs alone does not make a length of 0 acceptable.
    v.push(Case {
        name: "gso_segs without gso_size and total length 0",
        direction: IN,
        gso: (3, 0),
        expect: NotCounted(Malformed),
        packet: tcp4().ip_len(0),
    });
    // With a length of 0 the header itself must fit the skb: checked before the protocol.
    v.push(Case {
        name: "gso ipv4 total length 0 with an IHL past the skb",
        direction: IN,
        gso: (3, 1000),
        expect: NotCounted(Truncated),
        packet: tcp4().proto(1).payload(0).ipv4_ihl(15).ip_len(0).trailer(20),
    });
    // A GSO super-packet's IP length is checked against the skb like any other.
    v.push(Case {
        name: "gso ipv4 tcp with a total length past the skb",
        direction: IN,
        gso: (3, 1000),
        expect: NotCounted(Truncated),
        packet: tcp4().payload(3000).ip_len(3100),
    });
    v.push(Case {
        name: "gso_segs 1 is one packet",
        direction: IN,
        gso: (1, 1400),
        expect: counted_in(&tcp4(), C4, 443, TCP),
        packet: tcp4(),
    });
    v
}

fn watch_defaults(h: &mut Harness) {
    h.watch(443, PROTO_ALL).unwrap();
    h.watch(53, PROTO_UDP).unwrap();
    h.watch(8080, PROTO_TCP).unwrap();
}

#[kernel_test]
fn every_packet_lands_in_exactly_one_place() {
    let mut failures = vec![];
    let mut h = Harness::new(1024).unwrap();
    watch_defaults(&mut h);
    for case in cases() {
        // Every counter and statistic starts at zero for each case.
        h.clear().unwrap();
        let frame = case.packet.build();
        let run = h
            .run_gso(case.direction, &frame, case.gso.0, case.gso.1, 1)
            .unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        let counters = real_counters(&h.counters(0).unwrap());
        let stats = h.stats().unwrap();

        let mut expected_stats = Stats::default();
        let expected_counters = match case.expect {
            Counted {
                ip,
                port,
                proto,
                bytes,
                packets,
            } => {
                expected_stats.matched_packets = packets;
                expected_stats.matched_bytes = bytes;
                vec![(key(ip, port, proto, case.direction), Counters { bytes, packets })]
            }
            Unwatched => {
                expected_stats.unwatched_packets = 1;
                vec![]
            }
            NotCounted(reason) => {
                *expected_stats.not_counted_mut(reason) = 1;
                vec![]
            }
        };
        let got: Vec<_> = counters.into_iter().collect();
        if run.return_code != TC_ACT_UNSPEC {
            failures.push(format!(
                "{}: return code {} (want TC_ACT_UNSPEC)",
                case.name, run.return_code
            ));
        }
        if run.data_out != frame {
            failures.push(format!("{}: the program changed the packet", case.name));
        }
        if got != expected_counters {
            failures.push(format!("{}: counters {got:?}, want {expected_counters:?}", case.name));
        }
        if stats != expected_stats {
            failures.push(format!("{}: stats {stats:?}, want {expected_stats:?}", case.name));
        }
        // Nothing lands in the other generation.
        assert!(
            real_counters(&h.counters(1).unwrap()).is_empty(),
            "{}: wrote generation 1",
            case.name
        );
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[kernel_test]
fn repeated_packets_add_up_per_key() {
    let mut h = Harness::new(1024).unwrap();
    watch_defaults(&mut h);
    let a = Packet::tcp4("198.18.1.1", 1000, S4, 443).payload(700);
    let b = Packet::tcp4("198.18.1.2", 1000, S4, 443).payload(33);
    let c = Packet::udp4("198.18.1.1", 1000, S4, 443).payload(1);
    for _ in 0..5 {
        h.run(IN, &a.build()).unwrap();
    }
    h.run_gso(IN, &b.build(), 0, 0, 7).unwrap(); // repeat=7 in the kernel
    h.run(IN, &c.build()).unwrap();
    let got = real_counters(&h.counters(0).unwrap());
    let want: std::collections::BTreeMap<_, _> = [
        (
            key("198.18.1.1", 443, TCP, IN),
            Counters {
                bytes: 5 * a.l3_len() as u64,
                packets: 5,
            },
        ),
        (
            key("198.18.1.2", 443, TCP, IN),
            Counters {
                bytes: 7 * b.l3_len() as u64,
                packets: 7,
            },
        ),
        (
            key("198.18.1.1", 443, UDP, IN),
            Counters {
                bytes: c.l3_len() as u64,
                packets: 1,
            },
        ),
    ]
    .into();
    assert_eq!(got, want);
}

#[kernel_test]
fn port_changes_apply_to_the_next_packet() {
    let mut h = Harness::new(1024).unwrap();
    let p = Packet::udp4(C4, 1000, S4, 9999);
    h.run(IN, &p.build()).unwrap();
    h.watch(9999, PROTO_UDP).unwrap();
    h.run(IN, &p.build()).unwrap();
    h.watch(9999, 0).unwrap();
    h.run(IN, &p.build()).unwrap();
    let got = real_counters(&h.counters(0).unwrap());
    assert_eq!(
        got.get(&key(C4, 9999, UDP, IN)),
        Some(&Counters {
            bytes: p.l3_len() as u64,
            packets: 1
        })
    );
    assert_eq!(h.stats().unwrap().unwatched_packets, 2);
}

#[kernel_test]
fn the_generation_bit_selects_the_counter_map() {
    let mut h = Harness::new(1024).unwrap();
    watch_defaults(&mut h);
    let p = Packet::tcp4(C4, 1000, S4, 443);
    h.set_generation(1).unwrap();
    h.run(IN, &p.build()).unwrap();
    h.set_generation(0).unwrap();
    h.run(IN, &p.build()).unwrap();
    h.run(IN, &p.build()).unwrap();
    let one = Counters {
        bytes: p.l3_len() as u64,
        packets: 1,
    };
    let two = Counters {
        bytes: 2 * p.l3_len() as u64,
        packets: 2,
    };
    assert_eq!(
        real_counters(&h.counters(1).unwrap()).into_iter().collect::<Vec<_>>(),
        vec![(key(C4, 443, TCP, IN), one)]
    );
    assert_eq!(
        real_counters(&h.counters(0).unwrap()).into_iter().collect::<Vec<_>>(),
        vec![(key(C4, 443, TCP, IN), two)]
    );
}

/// A full per-IP map hides no traffic and moves none: a new source is counted under its /24 (or
/// /48), then, that tier full, under its /16 (or /32), then under its port alone; a key that exists
/// in a tier keeps counting there; every source past the per-IP map goes into its port's
/// distinct-source registers; `stats.map_full_*` is exactly what went past the per-IP map.
#[kernel_test]
fn a_full_map_counts_new_sources_under_their_prefix_then_their_port() {
    let sizes = TierSizes {
        ip: 4,
        prefix: 2,
        wide_prefix: 1,
    };
    let mut h = Harness::with_sizes(sizes).unwrap();
    watch_defaults(&mut h);
    let mut sent = Counters::default();
    let mut counted: BTreeMap<Key, Counters> = BTreeMap::new();
    let prefix = |cidr: &str, direction| Key {
        remote: Remote::Prefix(cidr.parse().unwrap()),
        port: 53,
        proto: UDP,
        direction,
    };
    let port_only = |direction| Key::any_remote(PortKey::new(53, UDP, direction));
    // (remote, direction, where it must be counted), in the order sent.
    let plan: Vec<(&str, Direction, Key)> = vec![
        ("198.18.1.1", IN, key("198.18.1.1", 53, UDP, IN)),
        ("198.18.1.2", IN, key("198.18.1.2", 53, UDP, IN)),
        ("198.18.1.3", IN, key("198.18.1.3", 53, UDP, IN)),
        ("198.18.1.4", EG, key("198.18.1.4", 53, UDP, EG)),
        // The per-IP map is full (4 keys): new sources go to their /24, then /16, then the port.
        ("198.18.1.5", IN, prefix("198.18.1.0/24", IN)),
        ("198.18.2.1", IN, prefix("198.18.2.0/24", IN)),
        ("198.18.3.1", IN, prefix("198.18.0.0/16", IN)),
        ("198.19.0.1", IN, port_only(IN)),
        ("2001:db8:1::1", IN, port_only(IN)),
        ("198.18.9.9", EG, port_only(EG)),
        // Keys that exist keep counting where they are.
        ("198.18.1.1", IN, key("198.18.1.1", 53, UDP, IN)),
        ("198.18.1.9", IN, prefix("198.18.1.0/24", IN)),
        ("198.18.3.7", IN, prefix("198.18.0.0/16", IN)),
        ("198.19.0.2", IN, port_only(IN)),
    ];
    for (i, (remote, direction, at)) in plan.iter().enumerate() {
        let p = match (*direction, remote.contains(':')) {
            (IN, false) => Packet::udp4(remote, 5000, S4, 53),
            (IN, true) => Packet::udp6(remote, 5000, S6, 53),
            (_, _) => Packet::udp4(S4, 53, remote, 5000),
        }
        .payload(10 + i);
        let run = h.run(*direction, &p.build()).unwrap();
        assert_eq!(run.return_code, TC_ACT_UNSPEC);
        let c = Counters {
            bytes: p.l3_len() as u64,
            packets: 1,
        };
        sent += c;
        *counted.entry(*at).or_default() += c;
    }
    let all = real_counters(&h.counters(0).unwrap());
    assert_eq!(all, counted, "each datagram in the tier its source found room in");
    let past = portwatch_tests::past_per_ip(&all);
    portwatch_tests::assert_past_per_ip_accounted(&h.stats().unwrap(), past, sent);
    // Sources past the per-IP map: 8 on 53/udp ingress, 1 on egress.
    let sources = h.sources(0).unwrap();
    let estimate = |direction| sources[&PortKey::new(53, UDP, direction)].estimate();
    assert_eq!((estimate(IN), estimate(EG)), (8, 1));
    assert_eq!(h.stats().unwrap().overflow_missing_packets, 0);
}
