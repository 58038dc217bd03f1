//! A flood as an operator meets it (issue 19): most datagrams from random hosts of a few heavy
//! prefixes, the rest sprayed uniformly over a large IPv4 and a large IPv6 range, every source
//! spoofed (`Bed::send_spoofed`). Everything stays inside 198.18.0.0/15 and 2001:db8::/32. What was
//! sent is kept per source and port, so that a test computes from its own send list what each tier
//! must hold; nftables rules count the same traffic per port and per heavy prefix at the receiver.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use portwatch::generation::Key;
use portwatch_common::{Counters, Direction, IPPROTO_UDP};

use crate::{
    netns::{Bed, Spoofed, SERVER_V4, SERVER_V6},
    nft,
    rng::Rng,
};

/// A range of sources and its share of the datagrams, in percent.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    pub cidr: &'static str,
    pub share: usize,
}

/// The heavy prefixes: a /24 with a fifth of the datagrams, a /48 and another /24 with a tenth
/// each (the /48's datagrams carry a 20-byte longer IP header, so it has more bytes than the
/// second /24: the three rank A, then the /48, then B).
pub const HEAVY: [Range; 3] = [
    Range {
        cidr: "198.19.100.0/24",
        share: 20,
    },
    Range {
        cidr: "2001:db8:beef::/48",
        share: 10,
    },
    Range {
        cidr: "198.19.101.0/24",
        share: 10,
    },
];

/// The spray: every address of these ranges as likely as any other (32,768 IPv4 addresses in 128
/// /24s, 2^92 IPv6 addresses in 4,096 /48s, all of one /16 and one /32).
pub const SPRAY: [Range; 2] = [
    Range {
        cidr: "198.18.128.0/17",
        share: 30,
    },
    Range {
        cidr: "2001:db8:1000::/36",
        share: 30,
    },
];

/// Payload bytes of a datagram: uniform in this range.
pub const PAYLOAD: std::ops::RangeInclusive<usize> = 0..=200;

/// A host of `cidr` (`198.18.128.0/17`), uniformly at random.
pub fn random_host(rng: &mut Rng, cidr: &str) -> IpAddr {
    let (base, len) = cidr.split_once('/').expect("a CIDR");
    let len: u32 = len.parse().expect("a prefix length");
    match base.parse().expect("an address") {
        IpAddr::V4(base) => {
            let host = (rng.next_u64() as u32).checked_shr(len).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(base) | host))
        }
        IpAddr::V6(base) => {
            let random = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
            IpAddr::V6(Ipv6Addr::from(u128::from(base) | random.checked_shr(len).unwrap_or(0)))
        }
    }
}

/// `count` datagrams to the bed's server (its address of the source's family): each from a host
/// of a range of `HEAVY` or `SPRAY` picked by share, to a port of `ports` picked by weight, with
/// a payload of `PAYLOAD` bytes.
pub fn datagrams(rng: &mut Rng, count: usize, ports: &[(u16, usize)]) -> Vec<Spoofed> {
    let ranges: Vec<Range> = HEAVY.iter().chain(&SPRAY).copied().collect();
    let shares: Vec<usize> = ranges.iter().map(|r| r.share).collect();
    let port_weights: Vec<usize> = ports.iter().map(|(_, w)| *w).collect();
    let (server4, server6): (IpAddr, IpAddr) = (SERVER_V4.parse().unwrap(), SERVER_V6.parse().unwrap());
    (0..count)
        .map(|_| {
            let range = ranges[rng.weighted(&shares)];
            let src = random_host(rng, range.cidr);
            Spoofed {
                src,
                dst: if src.is_ipv4() { server4 } else { server6 },
                port: ports[rng.weighted(&port_weights)].0,
                payload: rng.range(*PAYLOAD.start(), *PAYLOAD.end()),
            }
        })
        .collect()
}

/// The per-IP key of a datagram's source and port (UDP, ingress): what was sent, as portwatch
/// would count it with room for every source.
pub fn key_of(d: &Spoofed) -> Key {
    let octets = match d.src {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    Key::ip(octets, d.port, IPPROTO_UDP, Direction::Ingress)
}

/// Adds `datagrams` to `sent`, per source and port (`key_of`).
pub fn add_sent(sent: &mut BTreeMap<Key, Counters>, datagrams: &[Spoofed]) {
    for d in datagrams {
        *sent.entry(key_of(d)).or_default() += Counters {
            bytes: d.l3_len(),
            packets: 1,
        };
    }
}

/// The nftables table of `rules`.
pub const NFT_TABLE: &str = "pwmix";

/// nftables rules for the bed's server (`nft::load`) that count UDP to each of `ports` (counter
/// `port_<port>`) and, apart, from each heavy prefix to each port (`heavy<i>_<port>`, `i` its
/// index in `HEAVY`), at the input hook: after portwatch's TC ingress, on the same datagrams.
pub fn nft_rules(ports: &[u16]) -> String {
    let mut counters = String::new();
    let mut rules = String::new();
    for port in ports {
        counters += &format!("  counter port_{port} {{}}\n");
        rules += &format!("    udp dport {port} counter name port_{port}\n");
        for (i, heavy) in HEAVY.iter().enumerate() {
            let family = if heavy.cidr.contains(':') { "ip6" } else { "ip" };
            counters += &format!("  counter heavy{i}_{port} {{}}\n");
            rules += &format!(
                "    {family} saddr {} udp dport {port} counter name heavy{i}_{port}\n",
                heavy.cidr
            );
        }
    }
    format!(
        "table inet {NFT_TABLE} {{\n{counters}  chain input {{\n    type filter hook input priority 0; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// What nftables counted (`nft_rules`): per port, and per heavy prefix (index in `HEAVY`) over
/// every port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counted {
    pub per_port: BTreeMap<u16, Counters>,
    pub per_heavy: [Counters; 3],
}

impl Counted {
    pub fn read(bed: &Bed, ports: &[u16]) -> Counted {
        let all = nft::table_counters(bed, NFT_TABLE);
        let named = |name: &str| *all.get(name).unwrap_or_else(|| panic!("no nftables counter {name}"));
        let per_port = ports.iter().map(|&p| (p, named(&format!("port_{p}")))).collect();
        let mut per_heavy = [Counters::default(); 3];
        for (i, total) in per_heavy.iter_mut().enumerate() {
            for port in ports {
                *total += named(&format!("heavy{i}_{port}"));
            }
        }
        Counted { per_port, per_heavy }
    }
}

/// `counts` summed per port.
pub fn per_port(counts: &BTreeMap<Key, Counters>) -> BTreeMap<u16, Counters> {
    let mut out = BTreeMap::new();
    for (k, c) in counts {
        *out.entry(k.port).or_default() += *c;
    }
    out
}
