//! Which counters a command is about: watched ports (with their protocols), remote-IP prefixes and
//! a direction. `top` shows what its filter matches; `reset` zeroes what its filter matches.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use portwatch_common::{proto_bit, Direction};

use crate::{
    generation::{Key, Remote},
    ports::PortSpec,
};

/// `addr` with every bit past the first `len` cleared.
pub(crate) fn mask(mut addr: [u8; 16], len: u8) -> [u8; 16] {
    for (i, b) in addr.iter_mut().enumerate() {
        let bits = (len as i32 - 8 * i as i32).clamp(0, 8) as u32;
        *b &= if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    addr
}

/// An IPv4 or IPv6 prefix, stored as an IPv6 prefix (IPv4 mapped: `len` counts the 96 bits of
/// `::ffff:0:0/96`), as counter keys store addresses. Host bits are always zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Cidr {
    addr: [u8; 16],
    len: u8,
}

impl Cidr {
    /// The prefix of `ip` (16 bytes, IPv4 mapped) that holds it: `/prefix4` of an IPv4 address,
    /// `/prefix6` of an IPv6 one.
    pub(crate) fn of(ip: [u8; 16], prefix4: u8, prefix6: u8) -> Cidr {
        let len = if Ipv6Addr::from(ip).to_ipv4_mapped().is_some() {
            96 + prefix4
        } else {
            prefix6
        };
        Cidr {
            addr: mask(ip, len),
            len,
        }
    }

    pub(crate) fn contains(&self, ip: &[u8; 16]) -> bool {
        mask(*ip, self.len) == self.addr
    }
}

/// `198.18.0.0/24`, `2001:db8::/64`: the syntax `FromStr` reads.
impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = Ipv6Addr::from(self.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) if self.len >= 96 => write!(f, "{v4}/{}", self.len - 96),
            _ => write!(f, "{v6}/{}", self.len),
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (
                ip,
                Some(
                    len.parse::<u8>()
                        .map_err(|_| format!("{s}: {len:?} is not a prefix length"))?,
                ),
            ),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s}: not an IP address or CIDR (198.18.0.0/15, 2001:db8::/32)"))?;
        let (addr, len) = match ip {
            IpAddr::V4(v4) => {
                let len = len.unwrap_or(32);
                if len > 32 {
                    return Err(format!("{s}: an IPv4 prefix is at most /32"));
                }
                (v4.to_ipv6_mapped().octets(), 96 + len)
            }
            IpAddr::V6(v6) => {
                let len = len.unwrap_or(128);
                if len > 128 {
                    return Err(format!("{s}: an IPv6 prefix is at most /128"));
                }
                (v6.octets(), len)
            }
        };
        Ok(Cidr {
            addr: mask(addr, len),
            len,
        })
    }
}

/// A counter matches when it matches every condition given: one of `ports` (with its protocol),
/// one of `cidrs`, and `direction`. No condition matches everything.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    pub ports: Vec<PortSpec>,
    pub cidrs: Vec<Cidr>,
    pub direction: Option<Direction>,
}

impl Filter {
    pub(crate) fn matches_direction(&self, direction: Direction) -> bool {
        self.direction.is_none_or(|d| d == direction)
    }

    /// Whether the count of `key` is one this filter is about. An overflow count holds traffic
    /// of unknown remote IP, port and protocol: only a filter without a port or IP condition can
    /// say it matches.
    pub(crate) fn matches(&self, key: &Key) -> bool {
        if !self.matches_direction(key.direction) {
            return false;
        }
        let ip = match &key.remote {
            Remote::Overflow => return self.ports.is_empty() && self.cidrs.is_empty(),
            Remote::Ip(ip) => ip,
        };
        let bit = proto_bit(key.proto);
        let port_ok = self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|s| s.ports().contains(&key.port) && s.protocols & bit != 0);
        port_ok && (self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(ip)))
    }
}

#[cfg(test)]
mod tests {
    use portwatch_common::{IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    fn ip(s: &str) -> [u8; 16] {
        match s.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    #[test]
    fn cidrs_match_by_prefix() {
        let c: Cidr = "198.18.0.0/15".parse().unwrap();
        assert!(c.contains(&ip("198.18.7.7")) && c.contains(&ip("198.19.255.1")));
        assert!(!c.contains(&ip("198.20.0.1")) && !c.contains(&ip("2001:db8::1")));
        let c: Cidr = "198.18.3.9/24".parse().unwrap();
        assert_eq!(c, "198.18.3.0/24".parse().unwrap(), "host bits are masked");
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains(&ip("2001:db8:ffff::1")) && !c.contains(&ip("2001:db9::1")));
        let c: Cidr = "198.18.0.7".parse().unwrap();
        assert!(c.contains(&ip("198.18.0.7")) && !c.contains(&ip("198.18.0.8")));
        for bad in ["198.18.0.0/33", "2001:db8::/129", "nope", "1.2.3.4/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_print_as_they_parse() {
        for text in ["198.18.0.0/15", "0.0.0.0/0", "2001:db8::/32", "::/0", "2001:db8::7/128"] {
            assert_eq!(text.parse::<Cidr>().unwrap().to_string(), text);
        }
        assert_eq!(Cidr::of(ip("198.18.3.9"), 24, 64).to_string(), "198.18.3.0/24");
        assert_eq!(
            Cidr::of(ip("2001:db8:0:1:2::9"), 24, 64).to_string(),
            "2001:db8:0:1::/64"
        );
    }

    #[test]
    fn a_filter_matches_every_condition_given() {
        let key = |ip_: &str, port, proto, direction| Key::ip(ip(ip_), port, proto, direction);
        let k = key("198.18.0.7", 443, IPPROTO_TCP, Direction::Ingress);
        assert!(Filter::default().matches(&k));
        let f = Filter {
            ports: vec!["443/tcp".parse().unwrap()],
            cidrs: vec!["198.18.0.0/16".parse().unwrap()],
            direction: Some(Direction::Ingress),
        };
        assert!(f.matches(&k));
        assert!(
            !f.matches(&key("198.18.0.7", 443, IPPROTO_UDP, Direction::Ingress)),
            "protocol"
        );
        assert!(
            !f.matches(&key("198.18.0.7", 444, IPPROTO_TCP, Direction::Ingress)),
            "port"
        );
        assert!(
            !f.matches(&key("198.19.0.7", 443, IPPROTO_TCP, Direction::Ingress)),
            "prefix"
        );
        assert!(
            !f.matches(&key("198.18.0.7", 443, IPPROTO_TCP, Direction::Egress)),
            "direction"
        );
        // Overflow traffic has no port or IP: only filters without those conditions match it.
        let overflow = Key::overflow(Direction::Egress);
        assert!(Filter::default().matches(&overflow));
        assert!(!f.matches(&overflow));
        let only_egress = Filter {
            direction: Some(Direction::Egress),
            ..Filter::default()
        };
        assert!(only_egress.matches(&overflow) && !only_egress.matches(&Key::overflow(Direction::Ingress)));
    }
}
