//! Which counters a command is about: watched ports (with their protocols), remote-IP prefixes and
//! a direction. `top` shows what its filter matches; `reset` zeroes what its filter matches.

use portwatch_common::{proto_bit, Direction};

pub(crate) use crate::cidr::Cidr;
use crate::{
    generation::{Key, Remote},
    ports::PortSpec,
};

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
    /// say it matches. A prefix tier's count matches an IP condition when one of its prefixes
    /// holds all of the count's prefix; a per-port count (any remote) matches none.
    pub(crate) fn matches(&self, key: &Key) -> bool {
        if !self.matches_direction(key.direction) {
            return false;
        }
        if key.is_overflow() {
            return self.ports.is_empty() && self.cidrs.is_empty();
        }
        self.matches_port(key)
            && (self.cidrs.is_empty()
                || match &key.remote {
                    Remote::Ip(ip) => self.cidrs.iter().any(|c| c.contains(ip)),
                    Remote::Prefix(prefix) => self.cidrs.iter().any(|c| c.covers(prefix)),
                    Remote::AnyRemote | Remote::Overflow => false,
                })
    }

    /// Whether `key`'s port, protocol and direction are the filter's, and its remote may have
    /// addresses in its prefixes without `matches` selecting it: a prefix tier's count wider than
    /// those prefixes, or a per-port count. (What a selective reset by `--ip` leaves, and says.)
    pub(crate) fn overlaps_only(&self, key: &Key) -> bool {
        if self.cidrs.is_empty() || !self.matches_direction(key.direction) || !self.matches_port(key) {
            return false;
        }
        match &key.remote {
            Remote::Prefix(prefix) => {
                !self.cidrs.iter().any(|c| c.covers(prefix)) && self.cidrs.iter().any(|c| c.overlaps(prefix))
            }
            Remote::AnyRemote => true,
            Remote::Ip(_) | Remote::Overflow => false,
        }
    }

    fn matches_port(&self, key: &Key) -> bool {
        let bit = proto_bit(key.proto);
        self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|s| s.ports().contains(&key.port) && s.protocols & bit != 0)
    }
}

#[cfg(test)]
mod tests {
    use portwatch_common::{IPPROTO_TCP, IPPROTO_UDP};

    use super::*;
    use crate::cidr::ip;

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
