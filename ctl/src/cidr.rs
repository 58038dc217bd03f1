//! An IPv4 or IPv6 prefix, as `--ip` takes it, `top --by cidr` groups by, and the prefix tiers
//! count under.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use portwatch_common::{CounterKey, Tier};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: [u8; 16],
    len: u8,
}

impl Cidr {
    /// The prefix of `ip` (16 bytes, IPv4 mapped) that holds it: `/prefix4` of an IPv4 address,
    /// `/prefix6` of an IPv6 one.
    pub fn of(ip: [u8; 16], prefix4: u8, prefix6: u8) -> Cidr {
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

    pub fn contains(&self, ip: &[u8; 16]) -> bool {
        mask(*ip, self.len) == self.addr
    }

    /// Whether every address of `other` is in this prefix.
    pub(crate) fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(&other.addr)
    }

    /// Whether the two prefixes share an address (one covers the other).
    pub(crate) fn overlaps(&self, other: &Cidr) -> bool {
        self.covers(other) || other.covers(self)
    }

    /// The prefix a prefix tier's key names: its (already masked) address, at the length the tier
    /// keeps of its family.
    pub fn of_tier(key: &CounterKey, tier: Tier) -> Cidr {
        Cidr::of(key.remote_ip_octets(), tier.prefix4(), tier.prefix6())
    }

    /// The prefix of the tier it is the length of (`Tier::Prefix` or `Tier::WidePrefix`), if any.
    pub fn tier(&self) -> Option<Tier> {
        [Tier::Prefix, Tier::WidePrefix]
            .into_iter()
            .find(|t| self.len == if self.is_ipv4() { 96 + t.prefix4() } else { t.prefix6() })
    }

    /// Whether it is an IPv4 prefix (stored IPv4-mapped).
    pub fn is_ipv4(&self) -> bool {
        self.len >= 96 && Ipv6Addr::from(self.addr).to_ipv4_mapped().is_some()
    }

    /// Its (masked) address, 16 bytes, IPv4 mapped.
    pub fn addr(&self) -> [u8; 16] {
        self.addr
    }

    /// The prefix `len` bits long (of the 128, IPv4 mapped) holding `addr`.
    pub fn new(addr: [u8; 16], len: u8) -> Cidr {
        let len = len.min(128);
        Cidr {
            addr: mask(addr, len),
            len,
        }
    }

    /// This prefix or, when it is longer, its `/prefix4` (IPv4) or `/prefix6` (IPv6).
    pub(crate) fn at_most(&self, prefix4: u8, prefix6: u8) -> Cidr {
        let limit = if self.is_ipv4() { 96 + prefix4 } else { prefix6 };
        Cidr::new(self.addr, self.len.min(limit))
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

/// Tests' shorthand: an address as the maps store it (IPv4 mapped into IPv6).
#[cfg(test)]
pub(crate) fn ip(s: &str) -> [u8; 16] {
    match s.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn tiers_name_their_prefixes() {
        let key = |s: &str| CounterKey::with_octets(ip(s), 443, 6, portwatch_common::Direction::Ingress);
        let p = Cidr::of_tier(&key("198.51.100.0"), Tier::Prefix);
        assert_eq!(p.to_string(), "198.51.100.0/24");
        assert_eq!(p.tier(), Some(Tier::Prefix));
        let w = Cidr::of_tier(&key("2001:db8::"), Tier::WidePrefix);
        assert_eq!(w.to_string(), "2001:db8::/32");
        assert_eq!(w.tier(), Some(Tier::WidePrefix));
        assert_eq!("198.51.100.7/32".parse::<Cidr>().unwrap().tier(), None);
        assert!(p.covers(&"198.51.100.7/32".parse().unwrap()));
        assert!("198.51.0.0/16".parse::<Cidr>().unwrap().covers(&p));
        assert!(!p.covers(&"198.51.0.0/16".parse().unwrap()));
        assert!(p.overlaps(&"198.51.0.0/16".parse().unwrap()));
        assert_eq!(p.at_most(16, 32).to_string(), "198.51.0.0/16");
        assert_eq!(p.at_most(28, 64).to_string(), "198.51.100.0/24");
    }
}
