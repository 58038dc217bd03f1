//! Headers to a small classified record. Nothing here touches a map.
//!
//! Every read goes through `TcContext::load` (`bpf_skb_load_bytes`), which also works on the
//! non-linear part of an skb, so a header split across fragments is read, not misclassified.

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
    /// L3 bytes of this skb as the wire carries it (see `l3_bytes`).
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

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

use portwatch_common::{IPPROTO_TCP, IPPROTO_UDP, IPV4_MAPPED_WORD};

/// Reads a `T` at `offset` from the start of the frame. Headers in the linear part of the skb (the
/// usual case) are read directly; one that is not is copied with `bpf_skb_load_bytes`, which also
/// reads paged data, so a header split across fragments is read, not misclassified.
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

const MAX_HEADER_OFFSET: usize = 22 + 60 + MAX_IPV6_EXT_HEADERS * 2048;

/// Headers are loaded as arrays of network-order `u32` words: word loads and shifts are a few
/// instructions where byte arrays cost the BPF backend byte-by-byte copies.
#[inline(always)]
fn word(w: u32) -> u32 {
    u32::from_be(w)
}

/// The L3 header: addresses, protocol, where L4 starts and the L3 length the header claims.
struct L3 {
    src: [u32; 4],
    dst: [u32; 4],
    proto: u8,
    l4_offset: usize,
    /// Total length from the IP header (0 when the header does not say: IPv6 jumbo or BIG TCP).
    total_len: usize,
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Flow, Reason> {
    let (ethertype, l3_offset) = parse_ethernet(ctx)?;
    let l3 = match ethertype {
        ETH_P_IP => parse_ipv4(ctx, l3_offset)?,
        ETH_P_IPV6 => parse_ipv6(ctx, l3_offset)?,
        _ => return Err(Reason::NonIp),
    };
    let (src_port, dst_port, l4_header_len) = match l3.proto {
        IPPROTO_TCP => {
            // Ports (word 0) and data offset (top nibble of word 3); a TCP header is at least
            // 20 bytes.
            let tcp: [u32; 5] = load(ctx, l3.l4_offset)?;
            let doff = (word(tcp[3]) >> 28) as usize;
            if doff < 5 {
                return Err(Reason::Malformed);
            }
            let ports = word(tcp[0]);
            ((ports >> 16) as u16, ports as u16, doff * 4)
        }
        IPPROTO_UDP => {
            let udp: [u32; 2] = load(ctx, l3.l4_offset)?;
            let ports = word(udp[0]);
            ((ports >> 16) as u16, ports as u16, 8)
        }
        _ => return Err(Reason::UnknownL4),
    };

    let skb_len = ctx.len() as usize;
    let headers_len = l3.l4_offset - l3_offset + l4_header_len;
    // SAFETY: ctx.skb.skb is the program's context pointer; the verifier rewrites this field read.
    let gso_segs = unsafe { (*ctx.skb.skb).gso_segs } as u64;
    if gso_segs <= 1 && l3.total_len == 0 && ethertype == ETH_P_IP {
        return Err(Reason::Malformed);
    }
    let (bytes, packets) = if gso_segs > 1 {
        // A GSO/GRO super-packet carries its headers once; on the wire each segment has its own
        // copy of them (IP options and IPv6 extension headers included).
        ((skb_len - l3_offset) as u64 + (gso_segs - 1) * headers_len as u64, gso_segs)
    } else {
        // The length the IP header claims, not skb->len: that would include Ethernet padding of
        // short frames, which IP removes and nftables, iptables and NetFlow do not count.
        if l3.total_len > skb_len - l3_offset {
            return Err(Reason::Truncated);
        }
        let len = if l3.total_len == 0 { skb_len - l3_offset } else { l3.total_len };
        (len as u64, 1)
    };
    Ok(Flow { src: l3.src, dst: l3.dst, src_port, dst_port, proto: l3.proto, bytes, packets })
}

/// Returns the ethertype after any in-packet VLAN tags, and the offset of the L3 header.
/// (A tag the NIC or veth moved to `skb->vlan_tci` is not in the packet and needs no walking.)
#[inline(always)]
fn parse_ethernet(ctx: &TcContext) -> Result<(u16, usize), Reason> {
    let mut ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            return Ok((ethertype, offset));
        }
        // A tag is TCI (2 bytes) then the next ethertype (2 bytes), where the ethertype was.
        ethertype = u16::from_be(load::<u16>(ctx, offset + 2)?);
        offset += 4;
    }
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Err(Reason::HeaderLimit);
    }
    Ok((ethertype, offset))
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, offset: usize) -> Result<L3, Reason> {
    let ip: [u32; 5] = load(ctx, offset)?;
    let w0 = word(ip[0]);
    let version = w0 >> 28;
    let header_len = ((w0 >> 24) & 0x0f) as usize * 4;
    let total_len = (w0 & 0xffff) as usize;
    if version != 4 || header_len < 20 {
        return Err(Reason::Malformed);
    }
    // total_len 0 is legal only on a GSO super-packet (BIG TCP); parse() checks the rest.
    if total_len != 0 && total_len < header_len {
        return Err(Reason::Malformed);
    }
    if word(ip[1]) & 0x1fff != 0 {
        return Err(Reason::Fragment);
    }
    let proto = (word(ip[2]) >> 16) as u8;
    // IPv4-mapped IPv6: ::ffff:a.b.c.d
    let src = [0, 0, IPV4_MAPPED_WORD, ip[3]];
    let dst = [0, 0, IPV4_MAPPED_WORD, ip[4]];
    Ok(L3 { src, dst, proto, l4_offset: offset + header_len, total_len })
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, offset: usize) -> Result<L3, Reason> {
    let ip: [u32; 10] = load(ctx, offset)?;
    if word(ip[0]) >> 28 != 6 {
        return Err(Reason::Malformed);
    }
    let w1 = word(ip[1]);
    let payload_len = (w1 >> 16) as usize;
    let mut next = (w1 >> 8) as u8;
    let mut l4_offset = offset + 40;
    let mut walked = 0;
    while walked < MAX_IPV6_EXT_HEADERS {
        let len = match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h: [u8; 2] = load(ctx, l4_offset)?;
                next = h[0];
                (h[1] as usize + 1) * 8
            }
            NEXTHDR_AUTH => {
                let h: [u8; 2] = load(ctx, l4_offset)?;
                next = h[0];
                (h[1] as usize + 2) * 4
            }
            NEXTHDR_FRAGMENT => {
                let h: [u32; 2] = load(ctx, l4_offset)?;
                let w = word(h[0]);
                if (w & 0xffff) >> 3 != 0 {
                    return Err(Reason::Fragment);
                }
                next = (w >> 24) as u8;
                8
            }
            _ => break,
        };
        l4_offset += len;
        walked += 1;
    }
    if walked == MAX_IPV6_EXT_HEADERS && is_ipv6_ext_header(next) {
        return Err(Reason::HeaderLimit);
    }
    let src = [ip[2], ip[3], ip[4], ip[5]];
    let dst = [ip[6], ip[7], ip[8], ip[9]];
    // payload_len 0 means a jumbogram or a BIG TCP super-packet: the header does not say.
    let total_len = if payload_len == 0 { 0 } else { 40 + payload_len };
    Ok(L3 { src, dst, proto: next, l4_offset, total_len })
}

#[inline(always)]
fn is_ipv6_ext_header(next: u8) -> bool {
    matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT)
}
