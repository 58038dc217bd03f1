//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`. Checksums are left zero: the program under
//! test never reads them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

#[derive(Clone, Debug)]
pub enum Ip {
    V4 { src: Ipv4Addr, dst: Ipv4Addr },
    V6 { src: Ipv6Addr, dst: Ipv6Addr },
}

/// One IPv6 extension header: its type (0, 43, 44, 51, 60) and its body after the first two bytes
/// (next header, length), which `build` fills in.
#[derive(Clone, Debug)]
pub struct ExtHeader {
    pub kind: u8,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub ip: Ip,
    /// 6 (TCP), 17 (UDP) or anything else.
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload_len: usize,
    /// TPIDs of in-packet VLAN tags, outermost first.
    pub vlan_tpids: Vec<u16>,
    /// IPv4 options, a multiple of 4 bytes.
    pub ipv4_options: Vec<u8>,
    /// IPv4 flags+fragment offset field (host order).
    pub ipv4_frag: u16,
    /// Overrides the IHL nibble (to build malformed headers).
    pub ipv4_ihl: Option<u8>,
    /// Overrides the IP length field: the IPv4 total length or the IPv6 payload length (to build
    /// a datagram shorter or longer than what follows its header, or one of length 0).
    pub ip_len: Option<u16>,
    pub ipv6_ext: Vec<ExtHeader>,
    /// TCP data offset override (in 32-bit words).
    pub tcp_doff: Option<u8>,
    /// Ethernet padding after the IP packet.
    pub trailer: usize,
    /// Cut the frame to this many bytes.
    pub truncate: Option<usize>,
    /// Overrides the innermost EtherType (to build a frame that is not IP).
    pub ethertype: Option<u16>,
}

impl Packet {
    fn new(ip: Ip, proto: u8, src_port: u16, dst_port: u16) -> Self {
        Packet {
            ip,
            proto,
            src_port,
            dst_port,
            payload_len: 100,
            vlan_tpids: vec![],
            ipv4_options: vec![],
            ipv4_frag: 0,
            ipv4_ihl: None,
            ip_len: None,
            ipv6_ext: vec![],
            tcp_doff: None,
            trailer: 0,
            truncate: None,
            ethertype: None,
        }
    }
    pub fn tcp4(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Self {
        Self::new(
            Ip::V4 {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
            },
            6,
            src_port,
            dst_port,
        )
    }
    pub fn udp4(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Self {
        Self::new(
            Ip::V4 {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
            },
            17,
            src_port,
            dst_port,
        )
    }
    pub fn tcp6(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Self {
        Self::new(
            Ip::V6 {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
            },
            6,
            src_port,
            dst_port,
        )
    }
    pub fn udp6(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Self {
        Self::new(
            Ip::V6 {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
            },
            17,
            src_port,
            dst_port,
        )
    }
    pub fn payload(mut self, len: usize) -> Self {
        self.payload_len = len;
        self
    }
    pub fn proto(mut self, proto: u8) -> Self {
        self.proto = proto;
        self
    }
    pub fn vlan(mut self, tpid: u16) -> Self {
        self.vlan_tpids.push(tpid);
        self
    }
    pub fn ipv4_options(mut self, len: usize) -> Self {
        assert!(len.is_multiple_of(4));
        // NOP options followed by end-of-list.
        self.ipv4_options = vec![1; len];
        if len > 0 {
            self.ipv4_options[len - 1] = 0;
        }
        self
    }
    pub fn ipv4_fragment(mut self, offset_units: u16, more_fragments: bool) -> Self {
        self.ipv4_frag = offset_units | if more_fragments { 0x2000 } else { 0 };
        self
    }
    pub fn ipv4_ihl(mut self, ihl: u8) -> Self {
        self.ipv4_ihl = Some(ihl);
        self
    }
    /// Sets the IP length field (IPv4 total length, IPv6 payload length) to `len` whatever the
    /// packet holds.
    pub fn ip_len(mut self, len: u16) -> Self {
        self.ip_len = Some(len);
        self
    }
    /// An extension header of type `kind` with this body (the bytes after next header and
    /// length; its length field is computed from it, so it should make a whole header).
    pub fn ext_raw(mut self, kind: u8, body: Vec<u8>) -> Self {
        self.ipv6_ext.push(ExtHeader { kind, body });
        self
    }
    /// A hop-by-hop header holding `pad1` Pad1 options, then a Jumbo Payload option (RFC 2675:
    /// type 0xC2) of `option_len` bytes (4 when well formed) saying `jumbo`, padded with PadN to
    /// a multiple of 8 bytes.
    pub fn jumbo(self, pad1: usize, option_len: u8, jumbo: u32) -> Self {
        let mut body = vec![0u8; pad1];
        body.extend_from_slice(&[0xc2, option_len]);
        let value = jumbo.to_be_bytes();
        body.extend((0..option_len as usize).map(|i| value.get(i).copied().unwrap_or(0)));
        pad_options(&mut body);
        self.ext_raw(0, body)
    }
    /// A hop-by-hop, routing or destination-options header of `8 * units` bytes.
    pub fn ext(mut self, kind: u8, units: usize) -> Self {
        let body = match kind {
            51 => vec![0; units * 8 - 2], // AH: (len + 2) * 4 bytes; build() computes len
            _ => vec![0; units * 8 - 2],
        };
        self.ipv6_ext.push(ExtHeader { kind, body });
        self
    }
    /// An IPv6 fragment header.
    pub fn ipv6_fragment(mut self, offset_units: u16, more_fragments: bool) -> Self {
        let field = (offset_units << 3) | more_fragments as u16;
        let mut body = vec![0u8; 6];
        body[0..2].copy_from_slice(&field.to_be_bytes());
        body[2..6].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        self.ipv6_ext.push(ExtHeader { kind: 44, body });
        self
    }
    pub fn tcp_doff(mut self, doff: u8) -> Self {
        self.tcp_doff = Some(doff);
        self
    }
    pub fn trailer(mut self, len: usize) -> Self {
        self.trailer = len;
        self
    }
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ethertype = Some(ethertype);
        self
    }
    pub fn truncate(mut self, len: usize) -> Self {
        self.truncate = Some(len);
        self
    }

    fn l4_header_len(&self) -> usize {
        match self.proto {
            6 => 20,
            17 => 8,
            _ => 0,
        }
    }

    /// Offset of the L3 header in the frame.
    pub fn l3_offset(&self) -> usize {
        14 + 4 * self.vlan_tpids.len()
    }

    /// L3 bytes of the packet (IP header, extension headers or options, L4 header, payload).
    pub fn l3_len(&self) -> usize {
        let l3 = match self.ip {
            Ip::V4 { .. } => 20 + self.ipv4_options.len(),
            Ip::V6 { .. } => 40 + self.ipv6_ext.iter().map(|e| e.body.len() + 2).sum::<usize>(),
        };
        l3 + self.l4_header_len() + self.payload_len
    }

    /// Bytes of headers from L3 through L4 (what each GSO segment repeats).
    pub fn headers_len(&self) -> usize {
        self.l3_len() - self.payload_len
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst MAC (locally administered)
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src MAC
        let ethertype = self.ethertype.unwrap_or(match self.ip {
            Ip::V4 { .. } => ETH_P_IP,
            Ip::V6 { .. } => ETH_P_IPV6,
        });
        for (i, tpid) in self.vlan_tpids.iter().enumerate() {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(100 + i as u16).to_be_bytes()); // TCI: VLAN id
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        let l3_len = self.l3_len();
        match &self.ip {
            Ip::V4 { src, dst } => {
                let ihl = self.ipv4_ihl.unwrap_or(((20 + self.ipv4_options.len()) / 4) as u8);
                f.push(0x40 | ihl);
                f.push(0);
                f.extend_from_slice(&self.ip_len.unwrap_or(l3_len as u16).to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]);
                f.extend_from_slice(&self.ipv4_frag.to_be_bytes());
                f.push(64);
                f.push(self.proto);
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                f.extend_from_slice(&self.ipv4_options);
            }
            Ip::V6 { src, dst } => {
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&self.ip_len.unwrap_or((l3_len - 40) as u16).to_be_bytes());
                let first = self.ipv6_ext.first().map(|e| e.kind).unwrap_or(self.proto);
                f.push(first);
                f.push(64);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                for (i, ext) in self.ipv6_ext.iter().enumerate() {
                    let next = self.ipv6_ext.get(i + 1).map(|e| e.kind).unwrap_or(self.proto);
                    let total = ext.body.len() + 2;
                    let len_field = match ext.kind {
                        44 => 0,
                        51 => total / 4 - 2,
                        _ => total / 8 - 1,
                    };
                    f.push(next);
                    f.push(len_field as u8);
                    f.extend_from_slice(&ext.body);
                }
            }
        }
        match self.proto {
            6 => {
                f.extend_from_slice(&self.src_port.to_be_bytes());
                f.extend_from_slice(&self.dst_port.to_be_bytes());
                f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
                f.push(self.tcp_doff.unwrap_or(5) << 4);
                f.push(0x18); // PSH, ACK
                f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
            }
            17 => {
                f.extend_from_slice(&self.src_port.to_be_bytes());
                f.extend_from_slice(&self.dst_port.to_be_bytes());
                f.extend_from_slice(&((8 + self.payload_len) as u16).to_be_bytes());
                f.extend_from_slice(&[0, 0]);
            }
            _ => {}
        }
        f.extend(std::iter::repeat_n(0xab, self.payload_len + self.trailer));
        if let Some(len) = self.truncate {
            f.truncate(len);
        }
        f
    }
}

/// Pads hop-by-hop or destination options (the bytes after next header and length) with a PadN
/// option, or a Pad1, so that the header is a multiple of 8 bytes.
fn pad_options(body: &mut Vec<u8>) {
    let missing = (8 - (body.len() + 2) % 8) % 8;
    match missing {
        0 => {}
        1 => body.push(0),
        n => {
            body.extend_from_slice(&[1, (n - 2) as u8]);
            body.extend(std::iter::repeat_n(0, n - 2));
        }
    }
}
