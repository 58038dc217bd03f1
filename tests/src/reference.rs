//! A reference classifier for the hostile-packet tests: bpffs-layout.md's "What is parsed" list,
//! step by step, in plain Rust. It is written from that list, not from `ctl-ebpf/src/parse.rs`,
//! and in another shape: the IP datagram is cut out of the frame as a slice of its own length, so
//! "inside the datagram" is a slice bound here (`get` returning `None`) where the kernel program
//! compares offsets.

use portwatch::generation::Key;
use portwatch_common::{Counters, Direction, NotCounted, IPPROTO_TCP, IPPROTO_UDP};

/// Where the program must put a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Counted under `key`, with these bytes and packets.
    Counted { key: Key, counters: Counters },
    /// TCP or UDP on a port/protocol that is not watched.
    Unwatched,
    /// Not counted, for this reason.
    NotCounted(NotCounted),
}

/// The two skb fields the program reads besides the packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gso {
    pub segs: u32,
    pub size: u32,
}

/// The datagram, once its length is settled: `bytes` is exactly the IP datagram.
struct Datagram<'a> {
    bytes: &'a [u8],
    /// Where the L4 header starts in `bytes`.
    l4: usize,
    proto: u8,
    /// Addresses as 16 bytes, IPv4 mapped (`::ffff:a.b.c.d`).
    src: [u8; 16],
    dst: [u8; 16],
}

const VLAN_TPIDS: [u16; 2] = [0x8100, 0x88a8];
const EXTENSION_HEADERS: [u8; 5] = [0, 43, 44, 51, 60];

fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]))
}

fn mapped(v4: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..].copy_from_slice(v4);
    a
}

/// Classifies `frame` as the program of `direction` must, with `watched(port, proto)` saying
/// whether a port/protocol is watched. `frame` has at least the 14 bytes of an Ethernet header.
pub fn classify(frame: &[u8], gso: Gso, direction: Direction, watched: impl Fn(u16, u8) -> bool) -> Outcome {
    match parse(frame, gso) {
        Err(reason) => Outcome::NotCounted(reason),
        Ok((d, src_port, dst_port, l4_len)) => {
            let (remote, port) = match direction {
                Direction::Ingress => (d.src, dst_port),
                Direction::Egress => (d.dst, src_port),
            };
            if !watched(port, d.proto) {
                return Outcome::Unwatched;
            }
            let segs = u64::from(gso.segs.max(1));
            let headers = (d.l4 + l4_len) as u64;
            let counters = Counters {
                bytes: d.bytes.len() as u64 + (segs - 1) * headers,
                packets: segs,
            };
            Outcome::Counted {
                key: Key::ip(remote, port, d.proto, direction),
                counters,
            }
        }
    }
}

/// The datagram, its ports and its L4 header's length, or why not.
fn parse(frame: &[u8], gso: Gso) -> Result<(Datagram<'_>, u16, u16, usize), NotCounted> {
    use NotCounted::*;
    // 1-3: VLAN tags, then the EtherType.
    let mut type_at = 12;
    let mut ethertype = be16(frame, type_at).expect("a frame holds an Ethernet header");
    let mut tags = 0;
    while VLAN_TPIDS.contains(&ethertype) {
        if tags == 2 {
            return Err(HeaderLimit);
        }
        type_at += 4;
        tags += 1;
        ethertype = be16(frame, type_at).ok_or(Truncated)?;
    }
    let l3 = &frame[type_at + 2..];
    let is_gso = gso.size != 0;
    let d = match ethertype {
        0x0800 => ipv4(l3, is_gso)?,
        0x86dd => ipv6(l3, is_gso)?,
        _ => return Err(NonIp),
    };
    // 12-15.
    let (ports_at, l4_len) = match d.proto {
        IPPROTO_TCP => {
            let tcp = d.bytes.get(d.l4..d.l4 + 20).ok_or(Truncated)?;
            let doff = usize::from(tcp[12] >> 4);
            if doff < 5 {
                return Err(Malformed);
            }
            if d.bytes.len() < d.l4 + doff * 4 {
                return Err(Truncated);
            }
            (d.l4, doff * 4)
        }
        IPPROTO_UDP => {
            d.bytes.get(d.l4..d.l4 + 8).ok_or(Truncated)?;
            (d.l4, 8)
        }
        _ => return Err(UnknownL4),
    };
    let src_port = be16(d.bytes, ports_at).unwrap();
    let dst_port = be16(d.bytes, ports_at + 2).unwrap();
    Ok((d, src_port, dst_port, l4_len))
}

/// Steps 4-10 for IPv4; `l3` is the frame from the IPv4 header on.
fn ipv4(l3: &[u8], is_gso: bool) -> Result<Datagram<'_>, NotCounted> {
    use NotCounted::*;
    if l3.len() < 20 {
        return Err(Truncated);
    }
    if l3[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let ihl = usize::from(l3[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(Malformed);
    }
    let len = match usize::from(be16(l3, 2).unwrap()) {
        0 if is_gso => l3.len(),
        0 => return Err(Malformed),
        total if total < ihl => return Err(Malformed),
        total => total,
    };
    if len > l3.len() || ihl > len {
        return Err(Truncated);
    }
    let bytes = &l3[..len];
    if be16(bytes, 6).unwrap() & 0x1fff != 0 {
        return Err(Fragment);
    }
    Ok(Datagram {
        bytes,
        l4: ihl,
        proto: bytes[9],
        src: mapped(&bytes[12..16]),
        dst: mapped(&bytes[16..20]),
    })
}

/// Steps 4-11 for IPv6; `l3` is the frame from the IPv6 header on.
fn ipv6(l3: &[u8], is_gso: bool) -> Result<Datagram<'_>, NotCounted> {
    use NotCounted::*;
    if l3.len() < 40 {
        return Err(Truncated);
    }
    if l3[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let len = match usize::from(be16(l3, 4).unwrap()) {
        0 if is_gso => l3.len(),
        0 => 40 + jumbo_payload(l3)?,
        payload => 40 + payload,
    };
    if len > l3.len() {
        return Err(Truncated);
    }
    let bytes = &l3[..len];
    let mut next = bytes[6];
    let mut at = 40;
    let mut walked = 0;
    while EXTENSION_HEADERS.contains(&next) {
        if walked == 8 {
            return Err(HeaderLimit);
        }
        let fixed = if next == 44 { 8 } else { 2 };
        let head = bytes.get(at..at + fixed).ok_or(Truncated)?;
        let header_len = match next {
            44 => 8,
            51 => (usize::from(head[1]) + 2) * 4,
            _ => (usize::from(head[1]) + 1) * 8,
        };
        if at + header_len > bytes.len() {
            return Err(Truncated);
        }
        if next == 44 && be16(head, 2).unwrap() >> 3 != 0 {
            return Err(Fragment);
        }
        next = head[0];
        at += header_len;
        walked += 1;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&bytes[8..24]);
    dst.copy_from_slice(&bytes[24..40]);
    Ok(Datagram {
        bytes,
        l4: at,
        proto: next,
        src,
        dst,
    })
}

/// Step 8: the Jumbo Payload length of an IPv6 packet whose payload length is 0 and which is not
/// GSO.
fn jumbo_payload(l3: &[u8]) -> Result<usize, NotCounted> {
    use NotCounted::*;
    if l3[6] != 0 {
        return Err(Malformed);
    }
    let units = *l3.get(41).ok_or(Truncated)?;
    let hop = l3.get(40..40 + (usize::from(units) + 1) * 8).ok_or(Truncated)?;
    let options = &hop[2..];
    let mut i = 0;
    let mut looked_at = 0;
    loop {
        if i >= options.len() {
            return Err(Malformed);
        }
        if looked_at == 8 {
            return Err(HeaderLimit);
        }
        looked_at += 1;
        if options[i] == 0 {
            i += 1;
            continue;
        }
        let len = usize::from(*options.get(i + 1).ok_or(Malformed)?);
        let value = options.get(i + 2..i + 2 + len).ok_or(Malformed)?;
        if options[i] == 0xc2 {
            if len != 4 {
                return Err(Malformed);
            }
            let jumbo = u32::from_be_bytes([value[0], value[1], value[2], value[3]]) as usize;
            if jumbo <= 65535 {
                return Err(Malformed);
            }
            return Ok(jumbo);
        }
        i += 2 + len;
    }
}
