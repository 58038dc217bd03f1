//! Port SPECs (`443`, `443/tcp`, `8000-8100/udp`, `https`), the port set as a table (one flags
//! byte per port, as the `watched_ports` map holds it) and as ranges.

use std::{fmt, str::FromStr};

use portwatch_common::{PROTO_ALL, PROTO_TCP, PROTO_UDP};
use serde::ser::{Serialize, SerializeStruct, Serializer};

/// A range of ports and the protocols watched on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub first: u16,
    pub last: u16,
    /// `PROTO_TCP`, `PROTO_UDP` or both.
    pub protocols: u8,
}

impl PortSpec {
    pub fn ports(&self) -> std::ops::RangeInclusive<u16> {
        self.first..=self.last
    }

    pub fn protocol_names(&self) -> Vec<&'static str> {
        let mut v = vec![];
        if self.protocols & PROTO_TCP != 0 {
            v.push("tcp");
        }
        if self.protocols & PROTO_UDP != 0 {
            v.push("udp");
        }
        v
    }
}

/// `{"first":..,"last":..,"protocols":[..],"spec":".."}`, as `ports list --json` and `status
/// --json` print each range.
impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("PortSpec", 4)?;
        s.serialize_field("first", &self.first)?;
        s.serialize_field("last", &self.last)?;
        s.serialize_field("protocols", &self.protocol_names())?;
        s.serialize_field("spec", &self.to_string())?;
        s.end()
    }
}

/// Prints in SPEC syntax, so `ports list` output can be given back to `ports set`.
impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)?;
        } else {
            write!(f, "{}-{}", self.first, self.last)?;
        }
        match self.protocols {
            PROTO_TCP => write!(f, "/tcp"),
            PROTO_UDP => write!(f, "/udp"),
            _ => Ok(()),
        }
    }
}

const SERVICES: &str = "/etc/services";

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(
                "an empty port SPEC: give a port (443), a range (8000-8100), a service (https), \
                        optionally with /tcp or /udp"
                    .into(),
            );
        }
        let (base, protocols) = match spec.rsplit_once('/') {
            Some((base, proto)) => match proto.to_ascii_lowercase().as_str() {
                "tcp" => (base, Some(PROTO_TCP)),
                "udp" => (base, Some(PROTO_UDP)),
                _ => return Err(format!("{spec}: the protocol must be tcp or udp, not {proto:?}")),
            },
            None => (spec, None),
        };
        if base.starts_with(|c: char| c.is_ascii_alphabetic()) {
            let (port, listed) = lookup_service(base, std::fs::read_to_string(SERVICES).ok().as_deref())
                .ok_or_else(|| format!("{spec}: not a port number and not a service name in {SERVICES}"))?;
            // A service name watches the protocols /etc/services lists for it, unless narrowed.
            let protocols = match protocols {
                Some(p) if listed & p == 0 => {
                    return Err(format!("{spec}: {SERVICES} does not list {base} for that protocol"))
                }
                Some(p) => p,
                None => listed,
            };
            return Ok(PortSpec {
                first: port,
                last: port,
                protocols,
            });
        }
        let (first, last) = match base.split_once('-') {
            Some((a, b)) if !a.is_empty() => (parse_port(a, spec)?, parse_port(b, spec)?),
            _ => {
                let p = parse_port(base, spec)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!("{spec}: the range starts above its end (write {last}-{first})"));
        }
        Ok(PortSpec {
            first,
            last,
            protocols: protocols.unwrap_or(PROTO_ALL),
        })
    }
}

fn parse_port(text: &str, spec: &str) -> Result<u16, String> {
    let n: u64 = text
        .parse()
        .map_err(|_| format!("{spec}: {text:?} is not a port number (ports are 1 to 65535)"))?;
    match n {
        0 => Err(format!("{spec}: port 0 cannot be watched (ports are 1 to 65535)")),
        1..=65535 => Ok(n as u16),
        _ => Err(format!("{spec}: {n} is out of range (ports are 1 to 65535)")),
    }
}

/// Finds `name` (or an alias) in services(5) text: its port and the protocols listed for it.
fn lookup_service(name: &str, services: Option<&str>) -> Option<(u16, u8)> {
    let mut found: Option<(u16, u8)> = None;
    for line in services?.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let (Some(service), Some(port_proto)) = (fields.next(), fields.next()) else {
            continue;
        };
        if service != name && !fields.any(|alias| alias == name) {
            continue;
        }
        let Some((port, proto)) = port_proto.split_once('/') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        let bit = match proto {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            _ => continue,
        };
        match &mut found {
            Some((p, bits)) if *p == port => *bits |= bit,
            Some(_) => {}
            None => found = Some((port, bit)),
        }
    }
    found.filter(|(port, _)| *port != 0)
}

/// Watches the protocols of `specs` too (`ports add`, `load --port`).
pub fn add(table: &mut [u8], specs: &[PortSpec]) {
    for s in specs {
        s.ports().for_each(|p| table[p as usize] |= s.protocols);
    }
}

/// Stops watching the protocols of `specs` (`ports del`).
pub fn del(table: &mut [u8], specs: &[PortSpec]) {
    for s in specs {
        s.ports().for_each(|p| table[p as usize] &= !s.protocols);
    }
}

/// Watches exactly `specs` (`ports set`).
pub fn set(table: &mut [u8], specs: &[PortSpec]) {
    table.fill(0);
    add(table, specs);
}

/// The port set (one flags byte per port) as maximal runs of equal flags, in port order.
pub fn fold(table: &[u8]) -> Vec<PortSpec> {
    let mut out: Vec<PortSpec> = vec![];
    for (port, &flags) in table.iter().enumerate().skip(1) {
        if flags == 0 {
            continue;
        }
        let port = port as u16;
        match out.last_mut() {
            Some(last) if last.protocols == flags && last.last.checked_add(1) == Some(port) => last.last = port,
            _ => out.push(PortSpec {
                first: port,
                last: port,
                protocols: flags,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<PortSpec, String> {
        s.parse()
    }

    #[test]
    fn accepts_every_documented_form() {
        assert_eq!(
            p("443"),
            Ok(PortSpec {
                first: 443,
                last: 443,
                protocols: PROTO_ALL
            })
        );
        assert_eq!(
            p("443/tcp"),
            Ok(PortSpec {
                first: 443,
                last: 443,
                protocols: PROTO_TCP
            })
        );
        assert_eq!(
            p("53/UDP"),
            Ok(PortSpec {
                first: 53,
                last: 53,
                protocols: PROTO_UDP
            })
        );
        assert_eq!(
            p("8000-8100"),
            Ok(PortSpec {
                first: 8000,
                last: 8100,
                protocols: PROTO_ALL
            })
        );
        assert_eq!(
            p("8000-8100/udp"),
            Ok(PortSpec {
                first: 8000,
                last: 8100,
                protocols: PROTO_UDP
            })
        );
        assert_eq!(
            p("1-65535"),
            Ok(PortSpec {
                first: 1,
                last: 65535,
                protocols: PROTO_ALL
            })
        );
    }

    #[test]
    fn rejects_what_is_not_a_port() {
        for (spec, says) in [
            ("0", "port 0 cannot be watched"),
            ("65536", "out of range"),
            ("-1", "not a port number"),
            ("abc", "not a service name"),
            ("10-5", "starts above its end"),
            ("80/icmp", "must be tcp or udp"),
            ("", "empty port SPEC"),
            ("  ", "empty port SPEC"),
            ("1-", "not a port number"),
            ("0-10", "port 0"),
        ] {
            let err = p(spec).expect_err(spec);
            assert!(err.contains(says), "{spec:?}: {err}");
        }
    }

    #[test]
    fn service_names_use_the_protocols_listed() {
        let services =
            "https\t\t443/tcp\t\t\t\t# TLS\nhttps\t\t443/udp\nhttp 80/tcp www\ndomain 53/tcp\ndomain 53/udp\n";
        assert_eq!(lookup_service("https", Some(services)), Some((443, PROTO_ALL)));
        assert_eq!(lookup_service("www", Some(services)), Some((80, PROTO_TCP)));
        assert_eq!(lookup_service("gopher", Some(services)), None);
    }

    #[test]
    fn folds_runs_of_equal_flags() {
        let mut t = vec![0u8; 65536];
        t[53] = PROTO_UDP;
        t[443] = PROTO_ALL;
        t[8000..=8100].fill(PROTO_TCP);
        t[8101] = PROTO_ALL;
        t[65535] = PROTO_UDP;
        let folded: Vec<String> = fold(&t).iter().map(|s| s.to_string()).collect();
        assert_eq!(folded, ["53/udp", "443", "8000-8100/tcp", "8101", "65535/udp"]);
    }
}
