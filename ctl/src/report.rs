//! Counters to rows: grouping (`--by`), filtering, sorting, rates, and the three printers (table,
//! JSON, CSV) that `top` and `reset` share.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv6Addr};

use ctl_common::{CounterKey, Counters, DIRECTION_EGRESS, DIRECTION_INGRESS, IPPROTO_TCP, PROTO_TCP, PROTO_UDP};
use serde_json::{json, Map, Value};

use crate::{output::human_bytes, pinned::direction_name, ports::PortSpec};

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
    pub ports: Vec<PortSpec>,
    /// `Some(DIRECTION_*)` keeps one direction.
    pub direction: Option<u8>,
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
        direction: u8,
    },
    Port(u16),
    Cidr {
        addr: [u8; 16],
        len: u8,
    },
}

/// Counters grouped under a view, and the overflow traffic it cannot attribute.
#[derive(Clone, Debug, Default)]
pub struct Grouped {
    pub groups: BTreeMap<Group, Counters>,
    pub overflow: Counters,
}

impl View {
    fn keeps(&self, key: &CounterKey) -> bool {
        if self.direction.is_some_and(|d| d != key.direction) {
            return false;
        }
        if self.ports.is_empty() {
            return true;
        }
        let bit = if key.proto == IPPROTO_TCP { PROTO_TCP } else { PROTO_UDP };
        self.ports
            .iter()
            .any(|s| s.ports().contains(&key.port) && s.protocols & bit != 0)
    }

    fn group(&self, key: &CounterKey) -> Group {
        let ip = key.remote_ip_octets();
        match self.by {
            By::Ip => Group::Ip(ip),
            By::IpPort => Group::IpPort {
                ip,
                port: key.port,
                proto: key.proto,
                direction: key.direction,
            },
            By::Port => Group::Port(key.port),
            By::Cidr => {
                let len = if Ipv6Addr::from(ip).to_ipv4_mapped().is_some() {
                    96 + self.prefix4
                } else {
                    self.prefix6
                };
                let mut addr = ip;
                for (i, b) in addr.iter_mut().enumerate() {
                    let bits = (len as i32 - 8 * i as i32).clamp(0, 8) as u32;
                    *b &= if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
                }
                Group::Cidr { addr, len }
            }
        }
    }

    /// Groups counters; overflow entries are kept apart (they have no IP, port or protocol).
    pub fn group_all(&self, counters: &BTreeMap<CounterKey, Counters>) -> Grouped {
        let mut out = Grouped::default();
        for (key, value) in counters {
            if key.is_overflow() {
                if self.direction.is_none_or(|d| d == key.direction) {
                    out.overflow += *value;
                }
            } else if self.keeps(key) {
                *out.groups.entry(self.group(key)).or_default() += *value;
            }
        }
        out
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
    /// Every row the filters kept (not only those shown), plus the overflow traffic when no
    /// `--port` filter excludes it: the figure the table adds up to.
    pub totals: Counters,
    pub overflow: Counters,
    pub interval: Option<f64>,
    /// Rows before `-n` cut the list.
    pub total_rows: usize,
}

impl Report {
    /// `now`, and `before` read `interval` seconds earlier for rates (sorted by rate then).
    pub fn new(view: &View, now: &Grouped, before: Option<(&Grouped, f64)>) -> Report {
        let mut rows: Vec<Row> = now
            .groups
            .iter()
            .map(|(group, counters)| {
                let rate = before.map(|(b, secs)| {
                    let old = b.groups.get(group).copied().unwrap_or_default();
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
            })
            .collect();
        let metric = |r: &Row| -> f64 {
            match (view.sort, r.rate) {
                (SortBy::Bytes, Some(rate)) => rate.bytes,
                (SortBy::Packets, Some(rate)) => rate.packets,
                (SortBy::Bytes, None) => r.counters.bytes as f64,
                (SortBy::Packets, None) => r.counters.packets as f64,
            }
        };
        rows.sort_by(|a, b| metric(b).total_cmp(&metric(a)).then_with(|| a.group.cmp(&b.group)));
        let mut totals = Counters::default();
        rows.iter().for_each(|r| totals += r.counters);
        if view.ports.is_empty() {
            totals += now.overflow;
        }
        let total_rows = rows.len();
        if view.limit > 0 {
            rows.truncate(view.limit);
        }
        Report {
            by: view.by,
            rows,
            totals,
            overflow: now.overflow,
            interval: before.map(|(_, s)| s),
            total_rows,
        }
    }
}

pub fn format_ip(ip: &[u8; 16]) -> String {
    let v6 = Ipv6Addr::from(*ip);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => v6.to_string(),
    }
}

fn proto_name(proto: u8) -> &'static str {
    if proto == IPPROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

/// The identifying columns of a row, as (name, JSON value).
fn identity(group: &Group) -> Vec<(&'static str, Value)> {
    match group {
        Group::Ip(ip) => vec![("ip", json!(format_ip(ip)))],
        Group::IpPort {
            ip,
            port,
            proto,
            direction,
        } => vec![
            ("ip", json!(format_ip(ip))),
            ("port", json!(port)),
            ("proto", json!(proto_name(*proto))),
            ("direction", json!(direction_name(*direction))),
        ],
        Group::Port(port) => vec![("port", json!(port))],
        Group::Cidr { addr, len } => {
            let v6 = Ipv6Addr::from(*addr);
            let cidr = match v6.to_ipv4_mapped() {
                Some(v4) => format!("{v4}/{}", len - 96),
                None => format!("{v6}/{len}"),
            };
            vec![("cidr", json!(cidr))]
        }
    }
}

fn identity_columns(by: By) -> &'static [&'static str] {
    match by {
        By::Ip => &["ip"],
        By::IpPort => &["ip", "port", "proto", "direction"],
        By::Port => &["port"],
        By::Cidr => &["cidr"],
    }
}

fn counters_json(c: Counters) -> Value {
    json!({ "bytes": c.bytes, "packets": c.packets })
}

impl Report {
    /// One JSON object on one line (so `>> file.jsonl` keeps one record per line).
    pub fn to_json(&self, extra: &[(&str, Value)]) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let mut m = Map::new();
                for (k, v) in identity(&r.group) {
                    m.insert(k.into(), v);
                }
                m.insert("bytes".into(), json!(r.counters.bytes));
                m.insert("packets".into(), json!(r.counters.packets));
                if let Some(rate) = r.rate {
                    m.insert("bytes_per_sec".into(), json!(rate.bytes));
                    m.insert("packets_per_sec".into(), json!(rate.packets));
                }
                Value::Object(m)
            })
            .collect();
        let mut top = Map::new();
        for (k, v) in extra {
            top.insert((*k).into(), v.clone());
        }
        top.insert("rows".into(), Value::Array(rows));
        top.insert("totals".into(), counters_json(self.totals));
        top.insert("overflow".into(), counters_json(self.overflow));
        if let Some(secs) = self.interval {
            top.insert("interval_secs".into(), json!(secs));
        }
        Value::Object(top)
    }

    /// A header line and one line per row, the same columns as the JSON rows.
    pub fn to_csv(&self) -> String {
        let mut cols: Vec<&str> = identity_columns(self.by).to_vec();
        cols.extend(["bytes", "packets"]);
        if self.interval.is_some() {
            cols.extend(["bytes_per_sec", "packets_per_sec"]);
        }
        let mut out = cols.join(",") + "\n";
        for r in &self.rows {
            let mut fields: Vec<String> = identity(&r.group)
                .into_iter()
                .map(|(_, v)| v.as_str().map(String::from).unwrap_or(v.to_string()))
                .collect();
            fields.push(r.counters.bytes.to_string());
            fields.push(r.counters.packets.to_string());
            if let Some(rate) = r.rate {
                fields.push(format!("{:.1}", rate.bytes));
                fields.push(format!("{:.1}", rate.packets));
            }
            out += &(fields.join(",") + "\n");
        }
        out
    }

    /// An aligned table with human units (exact bytes with `exact`) and a totals line.
    pub fn to_table(&self, exact: bool) -> String {
        let bytes = |b: u64| if exact { b.to_string() } else { human_bytes(b) };
        let mut header: Vec<String> = identity_columns(self.by).iter().map(|c| c.to_uppercase()).collect();
        header.extend(["BYTES".into(), "PACKETS".into()]);
        if self.interval.is_some() {
            header.extend(["BYTES/S".into(), "PKTS/S".into()]);
        }
        let mut lines: Vec<Vec<String>> = vec![header];
        for r in &self.rows {
            let mut line: Vec<String> = identity(&r.group)
                .into_iter()
                .map(|(_, v)| v.as_str().map(String::from).unwrap_or(v.to_string()))
                .collect();
            line.push(bytes(r.counters.bytes));
            line.push(r.counters.packets.to_string());
            if let Some(rate) = r.rate {
                line.push(format!(
                    "{}/s",
                    if exact {
                        format!("{:.0}", rate.bytes)
                    } else {
                        human_bytes(rate.bytes as u64)
                    }
                ));
                line.push(format!("{:.0}", rate.packets));
            }
            lines.push(line);
        }
        let ncols = lines[0].len();
        let widths: Vec<usize> = (0..ncols)
            .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
            .collect();
        let idcols = identity_columns(self.by).len();
        let mut out = String::new();
        for l in &lines {
            let cells: Vec<String> = l
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i < idcols {
                        format!("{c:<w$}", w = widths[i])
                    } else {
                        format!("{c:>w$}", w = widths[i])
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        }
        if self.rows.is_empty() {
            let _ = writeln!(out, "(no traffic counted)");
        }
        let shown = if self.total_rows > self.rows.len() {
            format!("top {} of {} rows", self.rows.len(), self.total_rows)
        } else {
            format!("{} rows", self.total_rows)
        };
        let _ = writeln!(
            out,
            "total: {} ({} bytes), {} packets; {shown}; overflow (map full): {} ({} bytes), {} packets",
            human_bytes(self.totals.bytes),
            self.totals.bytes,
            self.totals.packets,
            human_bytes(self.overflow.bytes),
            self.overflow.bytes,
            self.overflow.packets
        );
        out
    }
}

pub fn direction_value(direction: crate::cli::OneDirection) -> u8 {
    match direction {
        crate::cli::OneDirection::Ingress => DIRECTION_INGRESS,
        crate::cli::OneDirection::Egress => DIRECTION_EGRESS,
    }
}
