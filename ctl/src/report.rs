//! Counters to rows: grouping (`--by`), filtering, ranking (`--sort`, `-n`) and rates, which
//! `top` and `reset` share. Printing the rows is `output`'s.

use anyhow::Result;
use portwatch_common::{Counters, Direction, PortKey, Tier};

use crate::{
    filter::{Cidr, Filter},
    generation::{Key, Remote},
    pinned::Pinned,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// One row per remote IP, summed over ports, protocols and directions
    Ip,
    /// One row per remote IP, port, protocol and direction
    IpPort,
    /// One row per watched port
    Port,
    /// One row per prefix of remote IPs (--prefix4, --prefix6)
    Cidr,
    /// One row per prefix of remote IPs, port, protocol and direction
    CidrPort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    Bytes,
    Packets,
}

/// What to show, from which counters.
#[derive(Clone, Debug)]
pub struct View {
    pub by: By,
    pub prefix4: u8,
    pub prefix6: u8,
    pub filter: Filter,
    pub sort: SortBy,
    /// Rows shown; 0 shows all.
    pub limit: usize,
}

/// A row's identity under a grouping; its order is the tie-break of the sort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Ip([u8; 16]),
    IpPort {
        ip: [u8; 16],
        port: u16,
        proto: u8,
        direction: Direction,
    },
    Port(u16),
    Cidr(Cidr),
    CidrPort {
        cidr: Cidr,
        port: u16,
        proto: u8,
        direction: Direction,
    },
    /// `--by ip`: a prefix tier's count (the per-IP map was full): a prefix, not an address.
    Prefix(Cidr),
    /// `--by ip-port`: likewise, on a port.
    PrefixPort {
        cidr: Cidr,
        port: u16,
        proto: u8,
        direction: Direction,
    },
    /// `--by ip-port`, `--by cidr-port`: the per-port overflow, of any remote.
    AnyRemotePort {
        port: u16,
        proto: u8,
        direction: Direction,
    },
}

impl Group {
    /// The tier a row's counts were kept in, when it is not an address's or a chosen prefix's:
    /// the rows a table marks.
    pub fn tier(&self) -> Option<Tier> {
        match self {
            Group::Prefix(cidr) | Group::PrefixPort { cidr, .. } => cidr.tier(),
            Group::AnyRemotePort { .. } => Some(Tier::Port),
            _ => None,
        }
    }
}

/// Bytes and packets per tier (`Tier as usize`): how much of what a view shows was counted per
/// address, per prefix, per wide prefix and per port alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierTotals(pub [Counters; 4]);

impl TierTotals {
    pub fn of(&self, tier: Tier) -> Counters {
        self.0[tier as usize]
    }

    /// What was counted past the per-IP map (every tier but `Tier::Ip`).
    pub fn past_per_ip(&self) -> Counters {
        self.0[1..].iter().fold(Counters::default(), |acc, c| acc + *c)
    }

    pub fn all(&self) -> Counters {
        self.0.iter().fold(Counters::default(), |acc, c| acc + *c)
    }
}

/// Counters grouped under a view, and the overflow traffic it cannot attribute.
///
/// Entries are appended, then sorted and summed per group: a million groups cost a sort of a
/// flat array rather than a million scattered hash-table inserts (a third of the time, a third of
/// the memory). Every `RUN` appended entries are sorted as they come, and the array is merged
/// whenever it has grown by a quarter (at least 64k entries): that work overlaps the kernel copying
/// out the next chunks, a merge finds sorted runs and only merges them, and what is left after the
/// last chunk is small. Few groups stay few entries.
#[derive(Clone, Debug, Default)]
pub struct Grouped {
    /// Sorted by group with one entry per group up to `merged`; then sorted runs up to `run`;
    /// then appended entries.
    groups: Vec<(Group, Counters)>,
    merged: usize,
    run: usize,
    pub overflow: Counters,
    /// Everything the view's filter kept, per tier (rows and what has no row under the view).
    pub by_tier: TierTotals,
    /// The distinct-source estimates of the ports the filter keeps (`View::read` only).
    pub sources: Vec<(PortKey, u64)>,
}

impl Grouped {
    const RUN: usize = 8192;

    fn push(&mut self, group: Group, value: Counters) {
        self.groups.push((group, value));
        if self.groups.len() - self.run >= Self::RUN {
            self.groups[self.run..].sort_unstable_by_key(|(g, _)| *g);
            self.run = self.groups.len();
        }
        if self.groups.len() - self.merged >= (self.merged / 4).max(1 << 16) {
            self.merge();
        }
    }

    fn merge(&mut self) {
        crate::generation::sum_sorted(&mut self.groups);
        self.merged = self.groups.len();
        self.run = self.merged;
    }

    /// Merges what was appended; the reading methods below need it done.
    pub fn finish(mut self) -> Grouped {
        self.merge();
        self
    }

    fn merged(&self) -> &[(Group, Counters)] {
        assert_eq!(self.merged, self.groups.len(), "Grouped read before finish()");
        &self.groups
    }

    /// One entry per group, sorted by group.
    pub fn iter(&self) -> impl Iterator<Item = &(Group, Counters)> {
        self.merged().iter()
    }

    pub fn len(&self) -> usize {
        self.merged().len()
    }

    pub fn get(&self, group: &Group) -> Option<Counters> {
        let groups = self.merged();
        groups.binary_search_by(|(g, _)| g.cmp(group)).ok().map(|i| groups[i].1)
    }
}

impl View {
    /// Every key a row of its own, nothing filtered, all rows: how `reset` reports what it zeroed.
    pub fn every_key() -> View {
        View {
            by: By::IpPort,
            prefix4: 32,
            prefix6: 128,
            filter: Filter::default(),
            sort: SortBy::Bytes,
            limit: 0,
        }
    }

    /// The row of the count of remote address `ip` under `key`.
    fn group(&self, ip: [u8; 16], key: &Key) -> Group {
        match self.by {
            By::Ip => Group::Ip(ip),
            By::IpPort => Group::IpPort {
                ip,
                port: key.port,
                proto: key.proto,
                direction: key.direction,
            },
            By::Port => Group::Port(key.port),
            By::Cidr => Group::Cidr(Cidr::of(ip, self.prefix4, self.prefix6)),
            By::CidrPort => Group::CidrPort {
                cidr: Cidr::of(ip, self.prefix4, self.prefix6),
                port: key.port,
                proto: key.proto,
                direction: key.direction,
            },
        }
    }

    /// The row of a prefix tier's count of `cidr` under `key`: under a prefix grouping, its
    /// prefix (the view's, or the tier's when that is coarser: its counts cannot be split).
    fn group_prefix(&self, cidr: Cidr, key: &Key) -> Option<Group> {
        let at_most = cidr.at_most(self.prefix4, self.prefix6);
        Some(match self.by {
            By::Ip => Group::Prefix(cidr),
            By::IpPort => Group::PrefixPort {
                cidr,
                port: key.port,
                proto: key.proto,
                direction: key.direction,
            },
            By::Port => Group::Port(key.port),
            By::Cidr => Group::Cidr(at_most),
            By::CidrPort => Group::CidrPort {
                cidr: at_most,
                port: key.port,
                proto: key.proto,
                direction: key.direction,
            },
        })
    }

    /// The row of a per-port overflow count: none when the view groups by remote alone (it is in
    /// the totals, per port only).
    fn group_any_remote(&self, key: &Key) -> Option<Group> {
        match self.by {
            By::Ip | By::Cidr => None,
            By::Port => Some(Group::Port(key.port)),
            By::IpPort | By::CidrPort => Some(Group::AnyRemotePort {
                port: key.port,
                proto: key.proto,
                direction: key.direction,
            }),
        }
    }

    /// Adds one count; overflow counts are kept apart (they have no IP, port or protocol), for
    /// the view's direction whatever its other conditions.
    pub fn add(&self, grouped: &mut Grouped, key: &Key, value: Counters) {
        let group = match key.remote {
            Remote::Overflow => {
                if self.filter.matches_direction(key.direction) {
                    grouped.overflow += value;
                }
                return;
            }
            // A port slot that only holds distinct-source registers has no count: no row.
            _ if !self.filter.matches(key) || value == Counters::default() => return,
            Remote::Ip(ip) => Some(self.group(ip, key)),
            Remote::Prefix(cidr) => self.group_prefix(cidr, key),
            Remote::AnyRemote => self.group_any_remote(key),
        };
        if let Some(tier) = key.tier() {
            grouped.by_tier.0[tier as usize] += value;
        }
        if let Some(group) = group {
            grouped.push(group, value);
        }
    }

    /// Both generations of the pinned counters, grouped, in one pass; with the distinct-source
    /// estimates of the ports the filter keeps.
    pub fn read(&self, pinned: &mut Pinned) -> Result<Grouped> {
        let mut grouped = Grouped::default();
        pinned.for_each_count(|key, value| self.add(&mut grouped, &key, value))?;
        grouped.sources = pinned
            .sources()?
            .into_iter()
            .filter(|(port, _)| self.filter.matches(&Key::any_remote(*port)))
            .map(|(port, sketch)| (port, sketch.estimate()))
            .filter(|(_, estimate)| *estimate > 0)
            .collect();
        Ok(grouped.finish())
    }

    pub fn group_all<'a>(&self, counters: impl IntoIterator<Item = &'a (Key, Counters)>) -> Grouped {
        let mut out = Grouped::default();
        for (key, value) in counters {
            self.add(&mut out, key, *value);
        }
        out.finish()
    }
}

/// Per-second rates over an interval.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rate {
    pub bytes: f64,
    pub packets: f64,
}

pub struct Row {
    pub group: Group,
    pub counters: Counters,
    pub rate: Option<Rate>,
}

/// What a printer needs: the rows to show (sorted, limited), and totals over all rows.
pub struct Report {
    pub by: By,
    pub rows: Vec<Row>,
    /// Everything the filters kept (every row, not only those shown, and what has no row under
    /// the view: per-port overflow under `--by ip`), plus the overflow traffic when no `--port`
    /// filter excludes it: the figure the table adds up to.
    pub totals: Counters,
    pub overflow: Counters,
    /// The totals but the overflow, per tier.
    pub by_tier: TierTotals,
    /// The distinct remote addresses counted past the per-IP map, estimated, per port, protocol
    /// and direction the filters kept (filled in by the readers that ask for it: `top`).
    pub sources: Vec<(PortKey, u64)>,
    pub interval: Option<f64>,
    /// Rows before `-n` cut the list.
    pub total_rows: usize,
}

impl Report {
    /// `now`, and `before` read `interval` seconds earlier for rates (sorted by rate then).
    pub fn new(view: &View, now: &Grouped, before: Option<(&Grouped, f64)>) -> Report {
        let row = |(group, counters): &(Group, Counters)| {
            let rate = before.map(|(b, secs)| {
                let old = b.get(group).unwrap_or_default();
                // A reset between the reads leaves the new figure below the old: no negative rates.
                Rate {
                    bytes: counters.bytes.saturating_sub(old.bytes) as f64 / secs,
                    packets: counters.packets.saturating_sub(old.packets) as f64 / secs,
                }
            });
            Row {
                group: *group,
                counters: *counters,
                rate,
            }
        };
        let metric = |r: &Row| -> f64 {
            match (view.sort, r.rate) {
                (SortBy::Bytes, Some(rate)) => rate.bytes,
                (SortBy::Packets, Some(rate)) => rate.packets,
                (SortBy::Bytes, None) => r.counters.bytes as f64,
                (SortBy::Packets, None) => r.counters.packets as f64,
            }
        };
        let order = |a: &Row, b: &Row| metric(b).total_cmp(&metric(a)).then_with(|| a.group.cmp(&b.group));
        let mut totals = now.by_tier.all();
        let mut rows: Vec<Row> = Vec::new();
        // With -n, keep at most 2n candidates and cut back to n when full: a million groups cost a
        // pass, not a sort, and no row list as large as the map.
        // Once n rows are kept, a row that sorts below the n-th cannot make it in.
        let keep = if view.limit > 0 { view.limit } else { usize::MAX };
        let mut cut = f64::NEG_INFINITY;
        for entry in now.iter() {
            let candidate = row(entry);
            if metric(&candidate) < cut {
                continue;
            }
            rows.push(candidate);
            if rows.len() >= keep.saturating_mul(2) {
                rows.select_nth_unstable_by(keep - 1, order);
                rows.truncate(keep);
                cut = metric(&rows[keep - 1]);
            }
        }
        rows.sort_unstable_by(order);
        rows.truncate(keep);
        // Overflow traffic has no port: it belongs to the totals unless a port filter excludes it.
        if view.filter.ports.is_empty() {
            totals += now.overflow;
        }
        Report {
            by: view.by,
            rows,
            totals,
            overflow: now.overflow,
            by_tier: now.by_tier,
            sources: now.sources.clone(),
            interval: before.map(|(_, s)| s),
            total_rows: now.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use portwatch_common::{IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    fn view(by: By, limit: usize) -> View {
        View {
            by,
            prefix4: 24,
            prefix6: 64,
            filter: Filter::default(),
            sort: SortBy::Bytes,
            limit,
        }
    }

    /// 300,000 counters over 40,000 IPs, each IP on several ports, protocols and directions, in
    /// an order that scatters an IP's entries across the merges `Grouped` does as it grows.
    fn counters() -> Vec<(Key, Counters)> {
        (0..300_000u64)
            .map(|i| {
                let ip = ((i * 7919) % 40_000) as u32;
                let mut octets = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 0];
                octets[14..].copy_from_slice(&(ip as u16).to_be_bytes());
                octets[13] += (ip >> 16) as u8;
                let proto = if i % 3 == 0 { IPPROTO_UDP } else { IPPROTO_TCP };
                let direction = Direction::from_u8((i % 2) as u8);
                let key = Key::ip(octets, 80 + (i % 5) as u16, proto, direction);
                (
                    key,
                    Counters {
                        bytes: i % 1000,
                        packets: 1,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn grouping_sums_like_a_map() {
        let counters = counters();
        for by in [By::Ip, By::IpPort, By::Port, By::Cidr, By::CidrPort] {
            let v = view(by, 0);
            let mut expected: BTreeMap<Group, Counters> = BTreeMap::new();
            for (key, value) in &counters {
                let Remote::Ip(ip) = key.remote else { unreachable!() };
                *expected.entry(v.group(ip, key)).or_default() += *value;
            }
            let got = v.group_all(&counters);
            assert_eq!(got.len(), expected.len(), "{by:?}");
            let got: Vec<_> = got.iter().copied().collect();
            let expected: Vec<_> = expected.into_iter().collect();
            assert!(got == expected, "{by:?}: grouped counters differ");
        }
    }

    #[test]
    fn top_n_is_the_head_of_the_full_order() {
        let counters = counters();
        // Many groups share a byte count: the group breaks ties, and -n must not change the order.
        for by in [By::Ip, By::IpPort, By::Port] {
            let all = Report::new(&view(by, 0), &view(by, 0).group_all(&counters), None);
            for n in [1, 3, 10, 1000] {
                let top = Report::new(&view(by, n), &view(by, n).group_all(&counters), None);
                let head: Vec<_> = all.rows.iter().take(n).map(|r| (r.group, r.counters)).collect();
                let got: Vec<_> = top.rows.iter().map(|r| (r.group, r.counters)).collect();
                assert!(got == head, "{by:?} -n {n}");
                assert_eq!(top.totals, all.totals);
                assert_eq!(top.total_rows, all.total_rows);
            }
        }
    }

    #[test]
    #[should_panic(expected = "before finish")]
    fn reading_an_unfinished_grouping_panics() {
        let mut g = Grouped::default();
        view(By::Ip, 0).add(&mut g, &counters()[0].0, Counters { bytes: 1, packets: 1 });
        let _ = g.len();
    }
}
