//! Headers to a small classified record. Nothing here touches a map.
//!
//! Headers are read straight from the linear part of the skb, and with `bpf_skb_load_bytes` when
//! they are not in it (see `load`). Every header read is bounded by the IP datagram's own length
//! (IPv4 total length, IPv6 payload length or Jumbo Payload length), not only by the frame: bytes
//! after the datagram (Ethernet padding, a trailer) are never taken for a header.

use aya_ebpf::programs::TcContext;
use portwatch_common::NotCounted as Reason;

/// A TCP or UDP packet, reduced to what accounting needs.
pub struct Flow {
    /// Addresses as `CounterKey::remote_ip` holds them (network-order bytes in four words).
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// L3 bytes as the wire carries them: the datagram's length, plus, for a GSO/GRO
    /// super-packet, the headers each further segment repeats.
    pub bytes: u64,
    /// Wire packets: `max(gso_segs, 1)`.
    pub packets: u64,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags walked (802.1ad outer + 802.1Q inner is the common case).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up (`Reason::HeaderLimit`).
const MAX_IPV6_EXT_HEADERS: usize = 8;
/// Hop-by-hop options looked at for a Jumbo Payload option before giving up
/// (`Reason::HeaderLimit`).
const MAX_HOP_OPTIONS: usize = 8;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// Hop-by-hop option types (RFC 8200 4.2, RFC 2675).
const OPT_PAD1: u8 = 0;
const OPT_JUMBO: u8 = 0xc2;
/// A Jumbo Payload length must be above what the 16-bit payload length can say (RFC 2675).
const IPV6_MAX_PAYLOAD: usize = 65535;

use portwatch_common::{IPPROTO_TCP, IPPROTO_UDP, IPV4_MAPPED_WORD};

/// Reads a `T` at `offset` from the start of the frame. Headers in the linear part of the skb (the
/// usual case) are read directly; one that is not is copied with `bpf_skb_load_bytes`, which also
/// reads paged data, so a header split across fragments is read, not misclassified. Bounded by
/// the frame only: headers inside the datagram are read with `load_within`.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Reason> {
    // Every offset the parser computes is below this bound (VLAN tags, IPv4 options or eight
    // IPv6 extension headers of at most 2 KiB each); it also keeps the verifier's range finite.
    if offset > MAX_HEADER_OFFSET {
        return Err(Reason::HeaderLimit);
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() <= end {
        // SAFETY: inside [data, data_end), checked above. Headers are read with the alignment the
        // stack gives them; the kernel allows unaligned packet reads on the architectures it JITs
        // for, and the verifier rejects the program otherwise.
        return Ok(unsafe { ((start + offset) as *const T).read() });
    }
    ctx.load::<T>(offset).map_err(|_| Reason::Truncated)
}

/// Reads a `T` at `offset` that must end by `end`, the end of the IP datagram (itself checked to
/// be inside the frame): a header that runs past the datagram is cut short, whatever the frame
/// holds after it.
#[inline(always)]
fn load_within<T: Copy>(ctx: &TcContext, offset: usize, end: usize) -> Result<T, Reason> {
    if offset + core::mem::size_of::<T>() > end {
        return Err(Reason::Truncated);
    }
    load(ctx, offset)
}

const MAX_HEADER_OFFSET: usize = 22 + 60 + MAX_IPV6_EXT_HEADERS * 2048;

/// Headers are loaded as arrays of network-order `u32` words: word loads and shifts are a few
/// instructions where byte arrays cost the BPF backend byte-by-byte copies.
#[inline(always)]
fn word(w: u32) -> u32 {
    u32::from_be(w)
}

/// The L3 header: addresses, protocol, where L4 starts and where the datagram ends.
struct L3 {
    src: [u32; 4],
    dst: [u32; 4],
    proto: u8,
    l4_offset: usize,
    /// Offset of the end of the IP datagram in the frame (at most `skb->len`): every later header
    /// must end by it.
    end: usize,
}

/// Classifies one frame. The checks run in one fixed order and the first that fails gives the
/// reason; the numbers in the comments are the steps of that order as bpffs-layout.md ("What is
/// parsed") lists them. The principle: a header is checked whole before anything it says is used,
/// and the IP length is settled before any header it covers is read.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Flow, Reason> {
    // 1-3.
    let (ethertype, l3_offset) = parse_ethernet(ctx)?;
    let frame_end = ctx.len() as usize;
    // SAFETY: ctx.skb.skb is the program's context pointer; the verifier rewrites these field reads.
    let (gso_segs, gso_size) = unsafe { ((*ctx.skb.skb).gso_segs, (*ctx.skb.skb).gso_size) };
    // `skb_is_gso()`: only a GSO/GRO super-packet may leave the IP length to the skb (BIG TCP).
    let gso = gso_size != 0;
    let l3 = match ethertype {
        ETH_P_IP => parse_ipv4(ctx, l3_offset, frame_end, gso)?,
        ETH_P_IPV6 => parse_ipv6(ctx, l3_offset, frame_end, gso)?,
        _ => return Err(Reason::NonIp),
    };
    // 12-15. The L4 header must lie inside the datagram: bytes after it (Ethernet padding, a
    // trailer) are not a header even when the frame holds them.
    let (src_port, dst_port, l4_header_len) = match l3.proto {
        IPPROTO_TCP => {
            // 13. Ports (word 0) and data offset (top nibble of word 3); a TCP header is at
            // least 20 bytes, and as long as its data offset says.
            let tcp: [u32; 5] = load_within(ctx, l3.l4_offset, l3.end)?;
            let doff = (word(tcp[3]) >> 28) as usize;
            // 14.
            if doff < 5 {
                return Err(Reason::Malformed);
            }
            // 15.
            if l3.l4_offset + doff * 4 > l3.end {
                return Err(Reason::Truncated);
            }
            let ports = word(tcp[0]);
            ((ports >> 16) as u16, ports as u16, doff * 4)
        }
        IPPROTO_UDP => {
            // 13. The UDP length field is not checked: what is counted is the IP length, and a
            // first fragment's UDP length is that of the whole datagram.
            let udp: [u32; 2] = load_within(ctx, l3.l4_offset, l3.end)?;
            let ports = word(udp[0]);
            ((ports >> 16) as u16, ports as u16, 8)
        }
        // 12.
        _ => return Err(Reason::UnknownL4),
    };

    // The length the IP header claims (checked to fit in the frame), not skb->len: that would
    // include the Ethernet padding of short frames, which IP removes and nftables, iptables and
    // NetFlow do not count.
    let datagram_len = (l3.end - l3_offset) as u64;
    let headers_len = (l3.l4_offset - l3_offset + l4_header_len) as u64;
    let gso_segs = gso_segs as u64;
    let (bytes, packets) = if gso_segs > 1 {
        // A GSO/GRO super-packet carries its headers once; on the wire each segment has its own
        // copy of them (IP options and IPv6 extension headers included).
        (datagram_len + (gso_segs - 1) * headers_len, gso_segs)
    } else {
        (datagram_len, 1)
    };
    Ok(Flow {
        src: l3.src,
        dst: l3.dst,
        src_port,
        dst_port,
        proto: l3.proto,
        bytes,
        packets,
    })
}

/// Returns the ethertype after any in-packet VLAN tags, and the offset of the L3 header.
/// (A tag the NIC or veth moved to `skb->vlan_tci` is not in the packet and needs no walking.)
#[inline(always)]
fn parse_ethernet(ctx: &TcContext) -> Result<(u16, usize), Reason> {
    // The EtherType is always there: the kernel hands a TC program at least an Ethernet header.
    let mut ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            return Ok((ethertype, offset));
        }
        // 1. A tag is TCI (2 bytes) then the next ethertype (2 bytes), where the ethertype was; one
        // cut short is truncated.
        ethertype = u16::from_be(load::<u16>(ctx, offset + 2)?);
        offset += 4;
    }
    // 2. A third tag is not read.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Err(Reason::HeaderLimit);
    }
    Ok((ethertype, offset))
}

/// IPv4 (steps 4-10): the header is checked as the kernel's `ip_rcv_core` checks it before the
/// fragment offset or the protocol is looked at.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext, offset: usize, frame_end: usize, gso: bool) -> Result<L3, Reason> {
    // 4.
    let ip: [u32; 5] = load(ctx, offset)?;
    let w0 = word(ip[0]);
    // 5.
    if w0 >> 28 != 4 {
        return Err(Reason::Malformed);
    }
    // 6.
    let header_len = ((w0 >> 24) & 0x0f) as usize * 4;
    if header_len < 20 {
        return Err(Reason::Malformed);
    }
    let total_len = (w0 & 0xffff) as usize;
    let end = if total_len == 0 {
        // 7. Only a GSO super-packet (BIG TCP) leaves the length to the skb.
        if !gso {
            return Err(Reason::Malformed);
        }
        frame_end
    } else {
        // 8.
        if total_len < header_len {
            return Err(Reason::Malformed);
        }
        offset + total_len
    };
    // 9. The datagram, and its header with the options, inside the frame.
    if end > frame_end || offset + header_len > end {
        return Err(Reason::Truncated);
    }
    // 10.
    if word(ip[1]) & 0x1fff != 0 {
        return Err(Reason::Fragment);
    }
    let proto = (word(ip[2]) >> 16) as u8;
    // IPv4-mapped IPv6: ::ffff:a.b.c.d
    let src = [0, 0, IPV4_MAPPED_WORD, ip[3]];
    let dst = [0, 0, IPV4_MAPPED_WORD, ip[4]];
    Ok(L3 {
        src,
        dst,
        proto,
        l4_offset: offset + header_len,
        end,
    })
}

/// IPv6 (steps 4-11): the datagram's length first (payload length, GSO, or the Jumbo Payload
/// option), then the extension headers inside it.
#[inline(always)]
fn parse_ipv6(ctx: &TcContext, offset: usize, frame_end: usize, gso: bool) -> Result<L3, Reason> {
    // 4.
    let ip: [u32; 10] = load(ctx, offset)?;
    // 5.
    if word(ip[0]) >> 28 != 6 {
        return Err(Reason::Malformed);
    }
    let w1 = word(ip[1]);
    let payload_len = (w1 >> 16) as usize;
    let mut next = (w1 >> 8) as u8;
    let end = if payload_len != 0 {
        offset + 40 + payload_len
    } else if gso {
        // 7. A BIG TCP super-packet: the skb says how long it is.
        frame_end
    } else {
        // 8. A jumbogram, or malformed.
        jumbogram_end(ctx, offset, next, frame_end)?
    };
    // 6, 8d.
    if end > frame_end {
        return Err(Reason::Truncated);
    }
    // 9-10. Each extension header whole inside the datagram before its next header or fragment
    // offset counts: one cut short is truncated, whatever it says.
    let mut l4_offset = offset + 40;
    let mut walked = 0;
    while walked < MAX_IPV6_EXT_HEADERS {
        let (len, fragment_offset) = match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h: [u8; 2] = load_within(ctx, l4_offset, end)?;
                next = h[0];
                ((h[1] as usize + 1) * 8, 0)
            }
            NEXTHDR_AUTH => {
                let h: [u8; 2] = load_within(ctx, l4_offset, end)?;
                next = h[0];
                ((h[1] as usize + 2) * 4, 0)
            }
            NEXTHDR_FRAGMENT => {
                let h: [u32; 2] = load_within(ctx, l4_offset, end)?;
                let w = word(h[0]);
                next = (w >> 24) as u8;
                (8, (w & 0xffff) >> 3)
            }
            _ => break,
        };
        if l4_offset + len > end {
            return Err(Reason::Truncated);
        }
        if fragment_offset != 0 {
            return Err(Reason::Fragment);
        }
        l4_offset += len;
        walked += 1;
    }
    // 11. A ninth extension header is not read.
    if walked == MAX_IPV6_EXT_HEADERS && is_ipv6_ext_header(next) {
        return Err(Reason::HeaderLimit);
    }
    let src = [ip[2], ip[3], ip[4], ip[5]];
    let dst = [ip[6], ip[7], ip[8], ip[9]];
    Ok(L3 {
        src,
        dst,
        proto: next,
        l4_offset,
        end,
    })
}

/// Step 8: the end of an IPv6 datagram whose payload length is 0 and which is not GSO. RFC 2675
/// allows that only with a Jumbo Payload option, in a hop-by-hop header right after the IPv6
/// header; anything else is malformed. The options are looked at in order, at most
/// `MAX_HOP_OPTIONS` of them. Not checked: the option's alignment, and RFC 2675's other rules (no
/// Jumbo Payload option when the payload length is not 0, no fragment header in a jumbogram).
#[inline(always)]
fn jumbogram_end(ctx: &TcContext, offset: usize, next: u8, frame_end: usize) -> Result<usize, Reason> {
    // 8a.
    if next != NEXTHDR_HOP {
        return Err(Reason::Malformed);
    }
    // 8b. The hop-by-hop header, whole, inside the frame (the datagram's length is what it is
    // read for).
    let hop = offset + 40;
    let h: [u8; 2] = load(ctx, hop)?;
    let hop_end = hop + (h[1] as usize + 1) * 8;
    if hop_end > frame_end {
        return Err(Reason::Truncated);
    }
    // 8c. Type-length-value options after the two bytes of next header and length.
    let mut at = hop + 2;
    for _ in 0..MAX_HOP_OPTIONS {
        if at >= hop_end {
            return Err(Reason::Malformed);
        }
        // Read as the byte pair ending at the option's type (`at - 1` is inside the header): a
        // one-byte packet read compiles to `data + offset < data_end`, which the verifier does not
        // take as a bound.
        let kind = load::<[u8; 2]>(ctx, at - 1)?[1];
        if kind == OPT_PAD1 {
            at += 1;
            continue;
        }
        if at + 2 > hop_end {
            return Err(Reason::Malformed);
        }
        let len = load::<[u8; 2]>(ctx, at)?[1];
        let option_end = at + 2 + len as usize;
        if option_end > hop_end {
            return Err(Reason::Malformed);
        }
        if kind == OPT_JUMBO {
            if len != 4 {
                return Err(Reason::Malformed);
            }
            let jumbo = u32::from_be(load::<u32>(ctx, at + 2)?) as usize;
            if jumbo <= IPV6_MAX_PAYLOAD {
                return Err(Reason::Malformed);
            }
            return Ok(offset + 40 + jumbo);
        }
        at = option_end;
    }
    if at >= hop_end {
        Err(Reason::Malformed)
    } else {
        Err(Reason::HeaderLimit)
    }
}

#[inline(always)]
fn is_ipv6_ext_header(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
    )
}
