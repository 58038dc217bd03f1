//! The Prometheus export (`metrics`, `serve`): the pinned state, read afresh for each scrape under
//! the shared lock, as metric families in the text exposition format (0.0.4, which Prometheus,
//! node_exporter's textfile collector and promtool read). Nothing is kept between scrapes.
//!
//! Per port: `portwatch_port_{bytes,packets}_total{port,proto,direction}`, the live counters plus
//! what resets drained (the `drained` map), so they never go down. Per remote (opt-in, because
//! remote IPs are unbounded): the top N per port, or per prefix, the rest as `remote="other"`,
//! capped; these restart from zero after a reset. Health: loaded, attachments, map use, the
//! statistics, and the programs' own run time when the kernel's `bpf_stats_enabled` is on.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use portwatch_common::{Counters, Direction, NotCounted, PortKey, Tier, TierSizes, LAYOUT_VERSION};
use prometheus::{core::Collector, Counter, Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::{
    attach,
    filter::Filter,
    maps, memory, output,
    pinned::Pinned,
    report::{By, Group, Grouped, SortBy, View},
};

/// The per-remote series asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PerRemote {
    /// The top N remote IPs of each port, protocol and direction.
    TopIps(usize),
    /// Every remote prefix (IPv4 /prefix4, IPv6 /prefix6) of each port, protocol and direction.
    Prefixes { prefix4: u8, prefix6: u8 },
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    pub per_remote: Option<PerRemote>,
    /// The most per-remote series (the `other` ones included); what does not fit is folded into
    /// its port's `other`.
    pub max_series: usize,
}

/// The default cap on per-remote series.
pub(crate) const DEFAULT_MAX_SERIES: usize = 10_000;

/// `Content-Type` of the text format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where `/proc/sys/kernel/bpf_stats_enabled` says whether programs' run time is counted.
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

struct Families {
    registry: prometheus::Registry,
}

impl Families {
    fn add<C: Collector + Clone + 'static>(&self, c: C) -> C {
        self.registry
            .register(Box::new(c.clone()))
            .expect("each metric name is registered once");
        c
    }

    fn gauge(&self, name: &str, help: &str, value: i64) {
        self.add(IntGauge::new(name, help).expect("a valid name")).set(value);
    }

    fn counter(&self, name: &str, help: &str, value: u64) {
        self.add(IntCounter::new(name, help).expect("a valid name"))
            .inc_by(value);
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("a valid name"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid name"))
    }
}

/// The metrics of `pinned` (`None`: nothing is loaded), as the text exposition format; `serve`
/// gives the number of its reads of the maps, this one included (scrapes that arrive during a read
/// share it, so it can be lower than the scrapes answered).
pub(crate) fn render(pinned: Option<&mut Pinned>, options: &Options, served_reads: Option<u64>) -> Result<String> {
    let f = Families {
        registry: prometheus::Registry::new(),
    };
    if let Some(reads) = served_reads {
        f.counter(
            "portwatch_serve_reads_total",
            "Times serve read the pinned state for a scrape (scrapes that arrive during a read get its answer)",
            reads,
        );
    }
    let layout = LAYOUT_VERSION.to_string();
    f.gauge_vec(
        "portwatch_info",
        "portwatch's version and pinned layout version",
        &["version", "layout"],
    )
    .with_label_values(&[env!("CARGO_PKG_VERSION"), &layout])
    .set(1);
    f.gauge(
        "portwatch_loaded",
        "Whether portwatch is loaded at the pin path (1) or not (0)",
        i64::from(pinned.is_some()),
    );
    if let Some(pinned) = pinned {
        loaded(&f, pinned, options)?;
    }
    let mut text = vec![];
    prometheus::TextEncoder::new()
        .encode(&f.registry.gather(), &mut text)
        .context("encoding the metrics")?;
    Ok(String::from_utf8(text).expect("the text format is UTF-8"))
}

fn labels_of(key: &PortKey) -> [String; 3] {
    [
        key.port.to_string(),
        output::proto_name(key.proto).to_string(),
        key.direction().name().to_string(),
    ]
}

fn loaded(f: &Families, pinned: &mut Pinned, options: &Options) -> Result<()> {
    // One pass over both generations: per-port sums, the active generation's entries, and the
    // per-remote grouping when asked for.
    let view = options.per_remote.map(|p| View {
        by: match p {
            PerRemote::TopIps(_) => By::IpPort,
            PerRemote::Prefixes { .. } => By::CidrPort,
        },
        prefix4: match p {
            PerRemote::Prefixes { prefix4, .. } => prefix4,
            _ => 32,
        },
        prefix6: match p {
            PerRemote::Prefixes { prefix6, .. } => prefix6,
            _ => 128,
        },
        filter: Filter::default(),
        sort: SortBy::Bytes,
        limit: 0,
    });
    let mut per_port: BTreeMap<PortKey, Counters> = BTreeMap::new();
    let mut grouped = Grouped::default();
    let active = pinned.active_generation()?;
    // Per tier: the active generation's entries, and what both counted since the last reset.
    let mut entries = [0u64; 4];
    let mut per_tier = [Counters::default(); 4];
    for generation in [0, 1] {
        pinned.generation(generation)?.for_each(|key, value| {
            let Some(tier) = key.tier() else { return };
            entries[tier as usize] += u64::from(generation == active);
            per_tier[tier as usize] += value;
            *per_port.entry(key.port_key()).or_default() += value;
            if let Some(view) = &view {
                view.add(&mut grouped, &key, value);
            }
        })?;
    }
    for entry in pinned.drained()?.iter() {
        let (key, value) = entry.context("reading the drained totals")?;
        *per_port.entry(key).or_default() += value;
    }

    let port_labels = ["port", "proto", "direction"];
    let bytes = f.counter_vec(
        "portwatch_port_bytes_total",
        "L3 bytes counted per watched port, protocol and direction, since load (resets do not lower it)",
        &port_labels,
    );
    let packets = f.counter_vec(
        "portwatch_port_packets_total",
        "Wire packets counted per watched port, protocol and direction, since load (resets do not lower it)",
        &port_labels,
    );
    for (key, c) in &per_port {
        let labels = labels_of(key);
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        bytes.with_label_values(&labels).inc_by(c.bytes);
        packets.with_label_values(&labels).inc_by(c.packets);
    }
    if let Some(per_remote) = options.per_remote {
        remotes(f, &grouped.finish(), per_remote, options.max_series);
    }

    let attached = f.gauge_vec(
        "portwatch_attached",
        "An attachment of portwatch's programs: interface, network namespace (empty: portwatch's own), direction, mode",
        &["interface", "netns", "direction", "mode"],
    );
    for entry in pinned.attachments()?.iter() {
        let (key, record) = entry.context("reading the attachment records")?;
        attached
            .with_label_values(&[
                &attach::display_name(&key, &record),
                &attach::recorded_netns(&record),
                key.direction().name(),
                record.mode().name(),
            ])
            .set(1);
    }
    f.gauge(
        "portwatch_map_entries",
        "Remote-IP keys in the per-IP map the program writes now",
        entries[Tier::Ip as usize] as i64,
    );
    f.gauge(
        "portwatch_map_max_entries",
        "Remote-IP keys the per-IP map holds; past it, new remote IPs are counted under their prefix",
        i64::from(pinned.meta.max_entries),
    );
    tiers(f, &entries, &per_tier, pinned.meta.sizes());
    f.gauge(
        "portwatch_maps_memory_bytes",
        "Kernel memory of every pinned map, in bytes, as the kernel counts it (memlock, as bpftool map show prints it)",
        memory::pinned(&pinned.pin)?.0 as i64,
    );
    let estimates = f.gauge_vec(
        "portwatch_overflow_sources_estimate",
        "Distinct remote addresses counted past the per-IP map since the last reset, per watched port, protocol \
         and direction (HyperLogLog, standard error 1.6%)",
        &port_labels,
    );
    for (port, sketch) in pinned.sources()? {
        let labels = labels_of(&port);
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        estimates.with_label_values(&labels).set(sketch.estimate() as i64);
    }

    let stats = maps::read_stats(pinned.stats()?)?;
    f.counter(
        "portwatch_map_full_packets_total",
        "Packets of new remote IPs that found the per-IP map full (counted past it: under a prefix or a port)",
        stats.map_full_packets,
    );
    f.counter(
        "portwatch_map_full_bytes_total",
        "L3 bytes of those packets",
        stats.map_full_bytes,
    );
    f.counter(
        "portwatch_unwatched_packets_total",
        "TCP and UDP packets of ports that are not watched",
        stats.unwatched_packets,
    );
    let not_counted = f.counter_vec(
        "portwatch_not_counted_packets_total",
        "Packets the program saw and counted under no port, by reason",
        &["reason"],
    );
    for reason in NotCounted::ALL {
        not_counted
            .with_label_values(&[reason.name()])
            .inc_by(stats.not_counted(reason));
    }
    programs(f, pinned)
}

/// Per tier (`ip`, `prefix`, `wide-prefix`, `port`): what it counted since the last reset, its
/// keys in the active generation and (but the per-port overflow's) how many it holds.
fn tiers(f: &Families, entries: &[u64; 4], counted: &[Counters; 4], sizes: TierSizes) {
    let bytes = f.counter_vec(
        "portwatch_tier_bytes_total",
        "L3 bytes counted per tier since the last reset: per remote IP, per prefix (/24 or /48), per wide prefix \
         (/16 or /32), per port only",
        &["tier"],
    );
    let packets = f.counter_vec(
        "portwatch_tier_packets_total",
        "Wire packets counted per tier since the last reset",
        &["tier"],
    );
    let keys = f.gauge_vec(
        "portwatch_tier_entries",
        "Keys per tier in the generation the program writes now",
        &["tier"],
    );
    let max = f.gauge_vec("portwatch_tier_max_entries", "Keys a tier holds", &["tier"]);
    for tier in Tier::ALL {
        let i = tier as usize;
        bytes.with_label_values(&[tier.name()]).inc_by(counted[i].bytes);
        packets.with_label_values(&[tier.name()]).inc_by(counted[i].packets);
        keys.with_label_values(&[tier.name()]).set(entries[i] as i64);
        let held = match tier {
            Tier::Ip => Some(sizes.ip),
            Tier::Prefix => Some(sizes.prefix),
            Tier::WidePrefix => Some(sizes.wide_prefix),
            Tier::Port => None,
        };
        if let Some(held) = held {
            max.with_label_values(&[tier.name()]).set(i64::from(held));
        }
    }
}

/// The programs' own cost, when the kernel counts it (`sysctl kernel.bpf_stats_enabled=1`).
fn programs(f: &Families, pinned: &mut Pinned) -> Result<()> {
    let enabled = std::fs::read_to_string(BPF_STATS).is_ok_and(|v| v.trim() == "1");
    if !enabled {
        return Ok(());
    }
    let seconds = f.add(
        prometheus::CounterVec::new(
            Opts::new(
                "portwatch_program_run_seconds_total",
                "Time the program has run, per direction (while kernel.bpf_stats_enabled is 1)",
            ),
            &["direction"],
        )
        .expect("a valid name"),
    );
    let runs = f.counter_vec(
        "portwatch_program_runs_total",
        "Times the program has run, per direction (while kernel.bpf_stats_enabled is 1)",
        &["direction"],
    );
    for direction in Direction::ALL {
        let info = pinned.program(direction)?.info()?;
        let seconds: Counter = seconds.with_label_values(&[direction.name()]);
        seconds.inc_by(info.run_time().as_secs_f64());
        runs.with_label_values(&[direction.name()]).inc_by(info.run_count());
    }
    Ok(())
}

/// One per-remote series: its port, the remote's label and the counts.
struct Series {
    port: PortKey,
    remote: String,
    counters: Counters,
}

/// `portwatch_remote_{bytes,packets}_total{remote,port,proto,direction}`: per port, the remotes as
/// asked, the rest as `other`; at most `max_series` series, the smallest remotes folded into
/// their port's `other` first (`portwatch_series_dropped` counts them).
fn remotes(f: &Families, grouped: &Grouped, per_remote: PerRemote, max_series: usize) {
    let mut by_port: BTreeMap<PortKey, Vec<(String, Counters)>> = BTreeMap::new();
    // The per-port overflow has no remote to name: it is its port's `other` from the start.
    let mut other: BTreeMap<PortKey, Counters> = BTreeMap::new();
    for (group, counters) in grouped.iter() {
        let (port, remote) = match group {
            Group::AnyRemotePort { port, proto, direction } => {
                *other.entry(PortKey::new(*port, *proto, *direction)).or_default() += *counters;
                continue;
            }
            Group::PrefixPort {
                cidr,
                port,
                proto,
                direction,
            } => (PortKey::new(*port, *proto, *direction), cidr.to_string()),
            Group::IpPort {
                ip,
                port,
                proto,
                direction,
            } => (PortKey::new(*port, *proto, *direction), output::format_ip(ip)),
            Group::CidrPort {
                cidr,
                port,
                proto,
                direction,
            } => (PortKey::new(*port, *proto, *direction), cidr.to_string()),
            _ => unreachable!("per-remote views group by remote and port"),
        };
        by_port.entry(port).or_default().push((remote, *counters));
    }
    // Per port: the largest first (by bytes, then the remote for a stable order).
    let mut named: Vec<Series> = vec![];
    for (port, mut remotes) in by_port {
        remotes.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then_with(|| a.0.cmp(&b.0)));
        let keep = match per_remote {
            PerRemote::TopIps(n) => n,
            PerRemote::Prefixes { .. } => usize::MAX,
        };
        for (i, (remote, counters)) in remotes.into_iter().enumerate() {
            if i < keep {
                named.push(Series { port, remote, counters });
            } else {
                *other.entry(port).or_default() += counters;
            }
        }
    }
    // The cap: drop the smallest named series until they and the `other` series they need fit.
    named.sort_by(|a, b| {
        b.counters
            .bytes
            .cmp(&a.counters.bytes)
            .then_with(|| a.remote.cmp(&b.remote))
    });
    // others_after[k]: the `other` series needed when the first k named series are kept (the
    // ports of those folded, and of what was past the top N already).
    let mut ports: std::collections::BTreeSet<PortKey> = other.keys().copied().collect();
    let mut others_after = vec![0; named.len() + 1];
    others_after[named.len()] = ports.len();
    for k in (0..named.len()).rev() {
        ports.insert(named[k].port);
        others_after[k] = ports.len();
    }
    let kept = (0..=named.len())
        .rev()
        .find(|&k| k + others_after[k] <= max_series)
        .unwrap_or(0);
    let dropped = named.len() - kept;
    for s in named.drain(kept..) {
        *other.entry(s.port).or_default() += s.counters;
    }
    // With a cap below the number of ports, even the `other` series cannot all fit: the largest
    // stay, the rest are dropped (and counted).
    let mut others: Vec<(PortKey, Counters)> = other.into_iter().collect();
    others.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then_with(|| a.0.cmp(&b.0)));
    let room = max_series - kept;
    let dropped_others = others.len().saturating_sub(room);
    others.truncate(room);

    let labels = ["remote", "port", "proto", "direction"];
    let bytes = f.counter_vec(
        "portwatch_remote_bytes_total",
        "L3 bytes per remote IP (or prefix) and watched port since the last reset; remote=\"other\" holds the rest",
        &labels,
    );
    let packets = f.counter_vec(
        "portwatch_remote_packets_total",
        "Wire packets per remote IP (or prefix) and watched port since the last reset; remote=\"other\" holds the rest",
        &labels,
    );
    let series = named
        .iter()
        .map(|s| (s.port, s.remote.as_str(), s.counters))
        .chain(others.iter().map(|(port, c)| (*port, "other", *c)));
    for (port, remote, counters) in series {
        let [p, proto, direction] = labels_of(&port);
        let values = [remote, p.as_str(), proto.as_str(), direction.as_str()];
        bytes.with_label_values(&values).inc_by(counters.bytes);
        packets.with_label_values(&values).inc_by(counters.packets);
    }
    f.gauge(
        "portwatch_series_dropped",
        "Per-remote series folded into remote=\"other\" (or left out) to stay within --max-series",
        (dropped + dropped_others) as i64,
    );
}
