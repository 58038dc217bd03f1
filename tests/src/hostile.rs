//! Hostile frames for the kernel program: random and mutated Ethernet frames (VLAN stacks of 0-4
//! tags, IPv4 with IHL 0-15 and wrong total lengths, IPv6 with extension chains up to and past the
//! parser's bound of eight and Jumbo Payload options, first and later fragments, TCP data offsets
//! 0-15, UDP, other protocols, trailing padding, frames cut at every offset, GSO metadata), from
//! a small seeded PRNG so that a run is replayed from its seed. `reference::classify` says where
//! each must land.

use portwatch_common::Direction;

use crate::reference::Gso;

pub use crate::rng::{seed_from_env, Rng};

/// One frame to run, as the program of `direction` sees it, with its skb's GSO fields.
#[derive(Clone, Debug)]
pub struct Sample {
    pub frame: Vec<u8>,
    pub gso: Gso,
    pub direction: Direction,
    /// What the generator did, for a failure's message.
    pub notes: String,
}

/// The frame sizes to generate.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Frames are cut to at most this (BPF_PROG_TEST_RUN takes a page, headroom and
    /// `skb_shared_info` included: about 3,700 bytes).
    pub max_frame: usize,
    /// When set, every frame is padded with payload to at least this many bytes and never cut
    /// (frames sent with AF_PACKET become paged above a page), and no GSO fields are set.
    pub min_frame: Option<usize>,
}

pub const TEST_RUN_SIZES: Sizes = Sizes {
    max_frame: 3600,
    min_frame: None,
};

/// Frames for `RawSocket` on a veth of MTU 9000: above a page, so paged (a frame may exceed the
/// MTU by a VLAN tag's 4 bytes and the Ethernet header's 14).
pub const PAGED_SIZES: Sizes = Sizes {
    max_frame: 9000,
    min_frame: Some(4200),
};

/// The ports the generator favours: `WATCHED` as `Harness::watch` sets them, and some others.
pub const WATCHED: [(u16, u8); 3] = [
    (443, portwatch_common::PROTO_TCP | portwatch_common::PROTO_UDP),
    (53, portwatch_common::PROTO_UDP),
    (8080, portwatch_common::PROTO_TCP),
];
const PORTS: [u16; 8] = [443, 443, 53, 53, 8080, 80, 22, 40000];

/// Whether `port`/`proto` is watched in `WATCHED`.
pub fn watched(port: u16, proto: u8) -> bool {
    WATCHED
        .iter()
        .any(|(p, flags)| *p == port && flags & portwatch_common::proto_bit(proto) != 0)
}

pub struct Generator {
    pub rng: Rng,
    sizes: Sizes,
    /// This frame is well formed: every mutation is skipped (a third of the frames), so that
    /// exact counting of good traffic is tested as hard as the refusals.
    clean: bool,
    /// This frame is short (small payload and trailer), to be cut at every length.
    short: bool,
    /// Every cut of one frame, served before new frames ("truncated at every offset").
    sweep: Vec<Sample>,
}

impl Generator {
    pub fn new(seed: u64, sizes: Sizes) -> Generator {
        Generator {
            rng: Rng::new(seed),
            sizes,
            clean: false,
            short: false,
            sweep: vec![],
        }
    }

    /// `weighted(weights)`, or 0 (the normal case) for a clean frame.
    fn choose(&mut self, weights: &[usize]) -> usize {
        if self.clean {
            0
        } else {
            self.rng.weighted(weights)
        }
    }

    /// `chance(percent)`, or false for a clean frame.
    fn odd(&mut self, percent: usize) -> bool {
        !self.clean && self.rng.chance(percent)
    }

    pub fn next_sample(&mut self) -> Sample {
        if let Some(s) = self.sweep.pop() {
            return s;
        }
        let paged = self.sizes.min_frame.is_some();
        self.short = !paged && self.rng.chance(1);
        self.clean = !self.short && self.rng.chance(33);
        let mut sample = self.sample();
        if self.short {
            // The same frame cut at every length from 14 bytes on.
            self.sweep = (14..sample.frame.len())
                .rev()
                .map(|len| Sample {
                    frame: sample.frame[..len].to_vec(),
                    notes: format!("{} cut={len}", sample.notes),
                    ..sample.clone()
                })
                .collect();
            sample.notes.push_str(" (uncut, then every cut)");
        } else if !paged && self.odd(12) {
            let len = self.rng.range(14, sample.frame.len().max(15) - 1);
            sample.frame.truncate(len);
            sample.notes.push_str(&format!(" cut={len}"));
        }
        sample
    }

    fn sample(&mut self) -> Sample {
        let mut notes = String::new();
        let direction = if self.rng.chance(50) {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let gso_kind = if self.sizes.min_frame.is_some() {
            0
        } else {
            self.choose(&[88, 8, 4])
        };
        let r = &mut self.rng;
        let gso = {
            match gso_kind {
                0 => Gso::default(),
                1 => Gso {
                    segs: r.range(0, 8) as u32,
                    size: r.range(1, 1500) as u32,
                },
                _ => Gso {
                    segs: r.range(2, 8) as u32,
                    size: 0,
                },
            }
        };
        if gso != Gso::default() {
            notes.push_str(&format!("gso={}/{} ", gso.segs, gso.size));
        }

        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
        let tags = self.choose(&[55, 20, 14, 6, 5]);
        let r = &mut self.rng;
        for _ in 0..tags {
            let tpid: u16 = r.pick(&[0x8100, 0x88a8]);
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(r.below(4096) as u16).to_be_bytes());
            notes.push_str(&format!("tag {tpid:#06x} "));
        }
        let family = if self.clean {
            r.below(2)
        } else {
            r.weighted(&[45, 45, 10])
        };
        let l4 = self.l4_header(&mut notes);
        let r = &mut self.rng;
        let payload_len = match r.weighted(&[30, 50, 20]) {
            _ if self.short => r.range(0, 24),
            // Paged frames: mostly one datagram, a few thousand bytes long.
            _ if self.sizes.min_frame.is_some() => r.range(self.sizes.max_frame / 2, self.sizes.max_frame - 200),
            0 => r.range(0, 16),
            1 => r.range(17, 200),
            _ => r.range(201, 1400),
        };
        let (ethertype, mut l3) = match family {
            0 => (0x0800u16, self.ipv4(&l4, payload_len, &mut notes)),
            1 => (0x86dd, self.ipv6(&l4, payload_len, &mut notes)),
            _ => {
                let any = self.rng.next_u64() as u16;
                let t = self.rng.pick(&[0x0806u16, 0x88cc, 0x8847, any]);
                notes.push_str(&format!("ethertype {t:#06x}"));
                let mut body = l4.bytes.clone();
                body.extend(self.rng.bytes(payload_len));
                (t, body)
            }
        };
        // An IP packet behind the other family's EtherType, now and then.
        let ethertype = if family < 2 && self.odd(3) {
            notes.push_str(" (behind the other ethertype)");
            if ethertype == 0x0800 {
                0x86dd
            } else {
                0x0800
            }
        } else {
            ethertype
        };
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.append(&mut l3);
        let r = &mut self.rng;
        let trailer = match r.weighted(&[60, 15, 25]) {
            0 => 0,
            _ if self.short => r.range(1, 8),
            1 => r.range(1, 8),
            _ => r.range(9, 64),
        };
        if trailer > 0 {
            notes.push_str(&format!(" trailer={trailer}"));
            // Half the time the trailer repeats the L4 header: a parser that reads past the
            // datagram then finds ports there.
            if r.chance(50) && !l4.bytes.is_empty() {
                f.extend(l4.bytes.iter().cycle().take(trailer));
            } else {
                f.extend(r.bytes(trailer));
            }
        }
        match self.sizes.min_frame {
            Some(min) if f.len() < min => {
                let fill = self.rng.range(min, self.sizes.max_frame) - f.len();
                f.extend(self.rng.bytes(fill));
                notes.push_str(&format!(" padded to {}", f.len()));
            }
            _ => {}
        }
        f.truncate(self.sizes.max_frame);
        Sample {
            frame: f,
            gso,
            direction,
            notes,
        }
    }

    /// An L4 header (TCP, UDP, or none for another protocol), without payload.
    fn l4_header(&mut self, notes: &mut String) -> L4 {
        let kind = if self.clean {
            self.rng.below(2)
        } else {
            self.rng.weighted(&[42, 42, 16])
        };
        // The data offset, and whether the options it announces are in the packet.
        let (doff, options) = match self.choose(&[60, 20, 10, 10]) {
            0 if self.rng.chance(85) => (5, true),
            0 | 1 => (self.rng.range(6, 15), true),
            2 => (self.rng.range(6, 15), false),
            _ => (self.rng.range(0, 4), false),
        };
        let r = &mut self.rng;
        let src = r.pick(&PORTS);
        let dst = r.pick(&PORTS);
        match kind {
            0 => {
                let mut h = Vec::new();
                h.extend_from_slice(&src.to_be_bytes());
                h.extend_from_slice(&dst.to_be_bytes());
                h.extend(r.bytes(8));
                h.push((doff as u8) << 4);
                h.extend(r.bytes(7));
                if options && doff > 5 {
                    h.extend(r.bytes((doff - 5) * 4));
                }
                let missing = if options { "" } else { " (options missing)" };
                notes.push_str(&format!("tcp {src}->{dst} doff={doff}{missing} "));
                L4 { proto: 6, bytes: h }
            }
            1 => {
                let mut h = Vec::new();
                h.extend_from_slice(&src.to_be_bytes());
                h.extend_from_slice(&dst.to_be_bytes());
                h.extend(r.bytes(4)); // length (not checked) and checksum
                notes.push_str(&format!("udp {src}->{dst} "));
                L4 { proto: 17, bytes: h }
            }
            _ => {
                let any = r.next_u64() as u8;
                let proto = r.pick(&[1u8, 58, 50, 59, 0, 43, 44, 60, 51, 132, any]);
                notes.push_str(&format!("proto {proto} "));
                L4 { proto, bytes: vec![] }
            }
        }
    }

    /// An IPv4 packet: header (maybe malformed), options, `l4`, payload.
    fn ipv4(&mut self, l4: &L4, payload_len: usize, notes: &mut String) -> Vec<u8> {
        let ihl = match self.choose(&[70, 20, 10]) {
            0 if self.rng.chance(85) => 5,
            0 | 1 => self.rng.range(6, 15),
            _ => self.rng.range(0, 4),
        };
        let options = if ihl > 5 { (ihl - 5) * 4 } else { 0 };
        let total = 20 + options + l4.bytes.len() + payload_len;
        let total_field = self.length_field(total, 20 + options, notes, "total");
        let version = if self.odd(4) { self.rng.below(16) } else { 4 };
        let frag: u16 = match self.choose(&[75, 10, 15]) {
            0 => self.rng.pick(&[0, 0x4000]),
            1 => 0x2000,
            _ => self.rng.range(1, 0x1fff) as u16 | self.rng.pick(&[0, 0x2000]),
        };
        let r = &mut self.rng;
        notes.push_str(&format!("v4 ihl={ihl} frag={frag:#06x}"));
        if version != 4 {
            notes.push_str(&format!(" version={version}"));
        }
        let mut h = vec![((version as u8) << 4) | ihl as u8, 0];
        h.extend_from_slice(&total_field.to_be_bytes());
        h.extend(r.bytes(2));
        h.extend_from_slice(&frag.to_be_bytes());
        h.push(64);
        h.push(l4.proto);
        h.extend(r.bytes(2));
        for _ in 0..2 {
            h.extend_from_slice(&[198, 18 + r.below(2) as u8, r.below(4) as u8, r.below(256) as u8]);
        }
        h.extend(r.bytes(options));
        h.extend_from_slice(&l4.bytes);
        h.extend(r.bytes(payload_len));
        h
    }

    /// An IPv6 packet: header (maybe malformed), extension headers (maybe past the bound of
    /// eight, maybe a Jumbo Payload option), `l4`, payload.
    fn ipv6(&mut self, l4: &L4, payload_len: usize, notes: &mut String) -> Vec<u8> {
        let count = match self.rng.weighted(&[50, 30, 10, 4, 6]) {
            0 => 0,
            1 => self.rng.range(1, 3),
            2 => self.rng.range(4, 7),
            3 => 8,
            _ if self.clean => 8,
            _ => self.rng.range(9, 10),
        };
        let jumbo = self.odd(6);
        let (clean, short) = (self.clean, self.short);
        let r = &mut self.rng;
        let mut kinds: Vec<u8> = (0..count)
            .map(|_| {
                if clean {
                    r.pick(&[0u8, 43, 60, 51])
                } else {
                    r.pick(&[0u8, 43, 60, 51, 44])
                }
            })
            .collect();
        if jumbo {
            kinds.insert(0, 0);
        }
        notes.push_str(&format!("v6 ext={kinds:?}"));
        let mut exts = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(l4.proto);
            let mut h = vec![next];
            match kind {
                44 => {
                    let offset = if r.chance(60) { 0 } else { r.range(1, 0x1fff) };
                    let field = ((offset as u16) << 3) | r.below(2) as u16;
                    h.push(0);
                    h.extend_from_slice(&field.to_be_bytes());
                    h.extend(r.bytes(4));
                    if offset != 0 {
                        notes.push_str(&format!(" frag@{offset}"));
                    }
                }
                51 => {
                    let len = if short { r.range(1, 2) } else { r.range(1, 10) };
                    h.push(len as u8);
                    h.extend(r.bytes((len + 2) * 4 - 2));
                }
                0 if jumbo && i == 0 => {
                    // A hop-by-hop header with Pad1s, then a Jumbo Payload option (mostly of the
                    // right length, saying mostly more than 65535), then padding.
                    let pad1 = r.pick(&[0, 0, 1, 3, 7, 8, 9]);
                    let option_len = if r.chance(80) { 4 } else { r.range(0, 8) };
                    let value = match r.weighted(&[60, 25, 15]) {
                        0 => r.range(65536, 1 << 20) as u32,
                        1 => r.range(0, 65535) as u32,
                        _ => r.next_u64() as u32,
                    };
                    let mut body = vec![0u8; pad1];
                    body.push(0xc2);
                    body.push(option_len as u8);
                    body.extend(value.to_be_bytes().iter().cycle().take(option_len));
                    while !(body.len() + 2).is_multiple_of(8) {
                        body.push(0);
                    }
                    h.push(((body.len() + 2) / 8 - 1) as u8);
                    h.extend(body);
                    notes.push_str(&format!(" jumbo(pad1={pad1},len={option_len},{value})"));
                }
                _ => {
                    let units = match r.weighted(&[50, 40, 10]) {
                        _ if short => r.range(0, 1),
                        0 => 0,
                        1 => r.range(1, 3),
                        _ => r.range(4, 20),
                    };
                    h.push(units as u8);
                    // Options: PadN over the whole body (or anything, when routing).
                    let body = (units + 1) * 8 - 2;
                    if r.chance(50) {
                        h.push(1);
                        h.push((body - 2) as u8);
                        h.extend(std::iter::repeat_n(0, body - 2));
                    } else {
                        h.extend(r.bytes(body));
                    }
                }
            }
            exts.extend(h);
        }
        let payload = exts.len() + l4.bytes.len() + payload_len;
        let payload_field = if jumbo && self.rng.chance(85) {
            0
        } else {
            self.length_field(payload, 0, notes, "payload")
        };
        let version = if self.odd(4) { self.rng.below(16) } else { 6 };
        let r = &mut self.rng;
        if version != 6 {
            notes.push_str(&format!(" version={version}"));
        }
        let first = kinds.first().copied().unwrap_or(l4.proto);
        let mut h = vec![(version as u8) << 4, 0, 0, 0];
        h.extend_from_slice(&payload_field.to_be_bytes());
        h.push(first);
        h.push(64);
        for _ in 0..2 {
            h.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            h.extend_from_slice(&(r.below(1024) as u16).to_be_bytes());
        }
        h.extend(exts);
        h.extend_from_slice(&l4.bytes);
        h.extend(r.bytes(payload_len));
        h
    }
}

struct L4 {
    proto: u8,
    bytes: Vec<u8>,
}

impl Generator {
    /// An IP length field for a packet of `len` bytes (IPv4 total length, IPv6 payload length):
    /// mostly right, else 0, a little more or less, below `header` (IPv4), or anything.
    fn length_field(&mut self, len: usize, header: usize, notes: &mut String, name: &str) -> u16 {
        let kind = self.choose(&[55, 8, 12, 15, 5, 5]);
        let r = &mut self.rng;
        let field = match kind {
            0 => return len as u16,
            1 => 0,
            2 => len + r.range(1, 64),
            3 => len.saturating_sub(r.range(1, 64)),
            4 => r.below(header.max(1) + 8),
            _ => r.below(65536),
        };
        notes.push_str(&format!("{name}={field} (of {len}) "));
        field as u16
    }
}
