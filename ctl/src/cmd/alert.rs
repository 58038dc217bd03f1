//! `portwatch alert`: a monitoring-plugin check (Nagios, Icinga, Sensu). It measures, per watched
//! port, protocol and direction, a rate over a period (or the distinct-source estimate), judges it
//! against the `-w`/`-c` ranges (`threshold`), prints one line with performance data and exits
//! 0 OK, 1 WARNING, 2 CRITICAL or 3 UNKNOWN: every failure, bad arguments included, is UNKNOWN.
//!
//! What is judged is a `Period`: per key, the bytes and packets counted over a known duration.
//! `LiveSamples` makes one from two readings of the pinned counters `--interval` apart (it never
//! resets them); another `PeriodSource` (a history store's last period) plugs in beside it.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use portwatch_common::{Counters, PortKey};

use crate::{
    cli::AlertArgs,
    filter::Filter,
    generation::{Key, Remote},
    history, maps, output,
    pinned::{Access, PinPath, Pinned},
    threshold::{self, Outcome, Perf, Quantity, Range, State},
};

/// Per key, the bytes and packets counted over `secs` seconds: what a check judges.
pub(crate) struct Period {
    pub secs: f64,
    pub counts: HashMap<Key, Counters>,
}

/// Where a check's period comes from.
pub(crate) trait PeriodSource {
    /// The counts of the keys `filter` selects over the source's period.
    fn period(&mut self, filter: &Filter) -> Result<Period>;
}

/// Two readings of the live counters, `interval` apart.
struct LiveSamples<'a> {
    pinned: &'a mut Pinned,
    interval: Duration,
}

impl LiveSamples<'_> {
    fn read(&mut self, filter: &Filter) -> Result<HashMap<Key, Counters>> {
        let mut counts: HashMap<Key, Counters> = HashMap::new();
        self.pinned.for_each_count(|key, value| {
            if !key.is_overflow() && filter.matches(&key) {
                *counts.entry(key).or_default() += value;
            }
        })?;
        Ok(counts)
    }
}

impl PeriodSource for LiveSamples<'_> {
    /// A reset between the readings takes counts away: a key that went down (or vanished) shows
    /// one, and the period is measured again, once. (A key counted back above its old figure within
    /// the interval goes unseen; resets run minutes apart, so that takes a reset that zeroed
    /// almost nothing.)
    fn period(&mut self, filter: &Filter) -> Result<Period> {
        for _attempt in 0..2 {
            let before = self.read(filter)?;
            let read_at = Instant::now();
            std::thread::sleep(self.interval);
            let now = self.read(filter)?;
            // The time between the reads, not the time asked for: reading a full map takes a while.
            let secs = read_at.elapsed().as_secs_f64();
            let went_down = before.iter().any(|(key, old)| {
                let new = now.get(key).copied().unwrap_or_default();
                new.bytes < old.bytes || new.packets < old.packets
            });
            if went_down {
                continue;
            }
            let counts = now
                .into_iter()
                .map(|(key, new)| {
                    let old = before.get(&key).copied().unwrap_or_default();
                    let delta = Counters {
                        bytes: new.bytes - old.bytes,
                        packets: new.packets - old.packets,
                    };
                    (key, delta)
                })
                .collect();
            return Ok(Period { secs, counts });
        }
        bail!("a reset ran during both measurements; run the check again")
    }
}

/// The last period of the history store: its newest 5-minute bucket (with resets every 5 minutes,
/// the last reset's record), over the time since the record before the bucket.
struct HistoryPeriod {
    store: history::store::Store,
    max_age: Duration,
}

impl HistoryPeriod {
    fn open(args: &crate::cli::StoreArgs, max_age: Duration) -> Result<HistoryPeriod> {
        Ok(HistoryPeriod {
            store: history::store::open_store(args)?,
            max_age,
        })
    }
}

impl PeriodSource for HistoryPeriod {
    fn period(&mut self, filter: &Filter) -> Result<Period> {
        let Some(last) = history::query::last_period(&self.store)? else {
            bail!("the history store holds no record yet: `portwatch history ingest RECORD`");
        };
        let age = (output::unix_time() as i64 - last.newest).max(0) as u64;
        if age > self.max_age.as_secs() {
            bail!(
                "the newest record in the history store is {} old (--max-age {}): are the resets \
                 (portwatch-reset.timer) and their ingest running?",
                humantime::format_duration(Duration::from_secs(age)),
                humantime::format_duration(self.max_age)
            );
        }
        let mut counts: HashMap<Key, Counters> = HashMap::new();
        for (stored, value) in history::query::totals(&self.store, &last.plan, filter)? {
            let key = match stored {
                history::store::Stored::Key(key) => key,
                // Remotes a bucket's cap summed: the port's, as its per-port traffic is.
                history::store::Stored::Other(port) => Key::any_remote(port),
            };
            if !key.is_overflow() {
                *counts.entry(key).or_default() += value;
            }
        }
        Ok(Period {
            secs: last.secs as f64,
            counts,
        })
    }
}

/// The ports a check of the history measures: those with traffic in the period, and each single
/// port `--port` names (measured at 0 when silent, so that `10:` can say it went silent).
fn history_ports(period: &Period, filter: &Filter) -> Vec<PortKey> {
    let mut ports: std::collections::BTreeSet<PortKey> = period.counts.keys().map(Key::port_key).collect();
    // A silent port is measured in the direction asked for, else at ingress.
    let direction = filter.direction.unwrap_or(portwatch_common::Direction::Ingress);
    for spec in &filter.ports {
        let range = spec.ports();
        if range.start() != range.end() {
            continue;
        }
        for proto in [portwatch_common::IPPROTO_TCP, portwatch_common::IPPROTO_UDP] {
            if spec.protocols & portwatch_common::proto_bit(proto) == 0 {
                continue;
            }
            ports.insert(PortKey::new(*range.start(), proto, direction));
        }
    }
    ports.into_iter().collect()
}

/// What is measured per port, protocol and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subject {
    /// Everything the port counted.
    Port,
    /// The one remote (an IP, or a prefix counted past the per-IP map) that sent or received most.
    HeaviestRemote,
    /// The distinct-source estimate (since the last reset).
    Sources,
}

/// A check as the command line asks for it.
pub(crate) struct Check {
    pub subject: Subject,
    pub quantity: Quantity,
    pub warning: Option<Range>,
    pub critical: Option<Range>,
}

/// One measured port, protocol and direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Measured {
    pub port: PortKey,
    /// `Subject::HeaviestRemote`: the remote measured (none when the port had no traffic).
    pub remote: Option<Remote>,
    /// In the quantity's unit.
    pub value: f64,
    /// The exact bytes or packets of the period behind a rate.
    pub count: Option<u64>,
}

/// Set by whoever prints the check's line first: the check, or its timeout.
static PRINTED: AtomicBool = AtomicBool::new(false);

/// Prints the check's line, unless the timeout printed one already; returns the exit code.
fn print(outcome: &Outcome) -> u8 {
    if PRINTED.swap(true, Ordering::SeqCst) {
        // The timeout's thread is ending the process with its own line.
        loop {
            std::thread::park();
        }
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", output::plugin_line(outcome));
    let _ = out.flush();
    outcome.state.code()
}

/// Arguments clap refused: UNKNOWN, with clap's message.
pub(crate) fn bad_arguments(message: &str) -> u8 {
    print(&Outcome::unknown(format!(
        "bad arguments: {message} (see `portwatch alert --help`)"
    )))
}

/// Runs the check: `prepare` checks the environment (privileges, bpffs) as the dispatcher does for
/// every verb. Never fails: a failure is an UNKNOWN line.
pub(in crate::cmd) fn run(pin: &PinPath, args: &AlertArgs, prepare: impl FnOnce() -> Result<()>) -> u8 {
    if !args.sources && args.timeout <= args.interval {
        return bad_arguments(&format!(
            "the timeout (-t {}) must be longer than the interval (--interval {})",
            args.timeout, args.interval
        ));
    }
    // A read blocked in the kernel cannot be interrupted from this thread: another one ends the
    // process at the deadline, with the one line a monitor expects.
    let timeout = args.timeout;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(timeout));
        if !PRINTED.swap(true, Ordering::SeqCst) {
            let outcome = Outcome::unknown(format!("timed out after {timeout} s (-t)"));
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", output::plugin_line(&outcome));
            let _ = out.flush();
            std::process::exit(State::Unknown.code().into());
        }
    });
    let outcome = check(pin, args, prepare).unwrap_or_else(|e| Outcome::unknown(format!("{e:#}")));
    print(&outcome)
}

fn check(pin: &PinPath, args: &AlertArgs, prepare: impl FnOnce() -> Result<()>) -> Result<Outcome> {
    let check = Check {
        subject: match (args.sources, args.per_remote) {
            (true, _) => Subject::Sources,
            (false, true) => Subject::HeaviestRemote,
            (false, false) => Subject::Port,
        },
        quantity: match (args.sources, args.packets) {
            (true, _) => Quantity::Count,
            (false, true) => Quantity::PacketRate,
            (false, false) => Quantity::ByteRate,
        },
        warning: args.warning.clone(),
        critical: args.critical.clone(),
    };
    for range in check.warning.iter().chain(&check.critical) {
        if let Err(e) = range.check_unit(check.quantity) {
            bail!("bad arguments: {e}");
        }
    }
    prepare()?;
    let filter = Filter::from(args);
    if args.history {
        let period = HistoryPeriod::open(&args.store, args.max_age)?.period(&filter)?;
        let selected = history_ports(&period, &filter);
        if selected.is_empty() {
            bail!(
                "the history store's last period has no traffic of the ports selected (a port that is \
                 silent there is measured only when --port names it)"
            );
        }
        return Ok(judge(&check, measure(&check, &selected, &period), Some(period.secs)));
    }
    let mut pinned = Pinned::open(pin, Access::Read)?;
    let selected = selected_ports(&mut pinned, &filter)?;
    if check.subject == Subject::Sources {
        let estimates: BTreeMap<PortKey, u64> = pinned
            .sources()?
            .into_iter()
            .map(|(port, sketch)| (port, sketch.estimate()))
            .collect();
        let measured = selected
            .iter()
            .map(|port| Measured {
                port: *port,
                remote: None,
                value: estimates.get(port).copied().unwrap_or(0) as f64,
                count: None,
            })
            .collect();
        return Ok(judge(&check, measured, None));
    }
    let mut source = LiveSamples {
        pinned: &mut pinned,
        interval: Duration::from_secs_f64(args.interval),
    };
    let period = source.period(&filter)?;
    Ok(judge(&check, measure(&check, &selected, &period), Some(period.secs)))
}

/// The ports, protocols and directions a check measures: the watched ones (and the directions
/// loaded) that the filter selects, each whether or not it has traffic (a silent port is measured
/// at 0, so that `10:` can say it went silent).
fn selected_ports(pinned: &mut Pinned, filter: &Filter) -> Result<Vec<PortKey>> {
    let table = maps::port_table(pinned.watched_ports()?)?;
    let directions = pinned.meta.directions();
    let mut selected = vec![];
    for (port, flags) in table.iter().enumerate() {
        for proto in [portwatch_common::IPPROTO_TCP, portwatch_common::IPPROTO_UDP] {
            if flags & portwatch_common::proto_bit(proto) == 0 {
                continue;
            }
            for direction in directions.iter() {
                let key = PortKey::new(port as u16, proto, direction);
                if filter.matches(&Key::any_remote(key)) {
                    selected.push(key);
                }
            }
        }
    }
    if selected.is_empty() {
        bail!(
            "no watched port matches the --port and --direction given (see `portwatch ports list`); \
             watch it first: `portwatch ports add SPEC`"
        );
    }
    Ok(selected)
}

/// Per selected port: its total, or its heaviest remote, over the period (keys counted on a port
/// that is no longer watched count too, under that port).
pub(crate) fn measure(check: &Check, selected: &[PortKey], period: &Period) -> Vec<Measured> {
    let amount = |c: &Counters| match check.quantity {
        Quantity::PacketRate => c.packets,
        _ => c.bytes,
    };
    let mut by_port: BTreeMap<PortKey, Measured> = selected
        .iter()
        .map(|port| {
            let zero = Measured {
                port: *port,
                remote: None,
                value: 0.0,
                count: Some(0),
            };
            (*port, zero)
        })
        .collect();
    // In key order, so that the heaviest of remotes that tie is always the same.
    let mut keys: Vec<(&Key, &Counters)> = period.counts.iter().collect();
    keys.sort_unstable_by_key(|(key, _)| **key);
    for (key, counts) in keys {
        let port = PortKey::new(key.port, key.proto, key.direction);
        let entry = by_port.entry(port).or_insert(Measured {
            port,
            remote: None,
            value: 0.0,
            count: Some(0),
        });
        let n = amount(counts);
        match check.subject {
            Subject::HeaviestRemote => {
                // The per-port overflow is many remotes, not one.
                if matches!(key.remote, Remote::Ip(_) | Remote::Prefix(_))
                    && (entry.remote.is_none() || n > entry.count.unwrap_or(0))
                {
                    entry.remote = Some(key.remote);
                    entry.count = Some(n);
                }
            }
            _ => entry.count = Some(entry.count.unwrap_or(0) + n),
        }
    }
    by_port
        .into_values()
        .map(|m| Measured {
            value: m.count.unwrap_or(0) as f64 / period.secs,
            ..m
        })
        .collect()
}

/// The port, protocol and direction as a perfdata label's stem: `443/tcp/ingress`.
fn port_label(port: &PortKey) -> String {
    format!(
        "{}/{}/{}",
        port.port,
        output::proto_name(port.proto),
        port.direction().name()
    )
}

/// What was measured, in words: `443/tcp ingress`, `198.18.0.7 on 443/tcp ingress`.
fn describe(m: &Measured) -> String {
    let port = format!(
        "{}/{} {}",
        m.port.port,
        output::proto_name(m.port.proto),
        m.port.direction().name()
    );
    match m.remote {
        Some(Remote::Ip(ip)) => format!("{} on {port}", output::format_ip(&ip)),
        Some(Remote::Prefix(cidr)) => format!("{cidr} on {port}"),
        _ => port,
    }
}

/// The state of each measured value, the worst named in the summary; perfdata for every one.
pub(crate) fn judge(check: &Check, measured: Vec<Measured>, secs: Option<f64>) -> Outcome {
    let (w, c) = (check.warning.as_ref(), check.critical.as_ref());
    let state_of = |m: &Measured| threshold::state(m.value, w, c);
    let range_of = |state: State| match state {
        State::Critical => c,
        State::Warning => w,
        _ => None,
    };
    // The worst: the highest state, then the furthest past its range, then the highest value.
    let worst = measured
        .iter()
        .max_by(|a, b| {
            let (sa, sb) = (state_of(a), state_of(b));
            let excess = |m: &Measured, s| range_of(s).map_or(0.0, |r| r.excess(m.value));
            sa.cmp(&sb)
                .then(excess(a, sa).total_cmp(&excess(b, sb)))
                .then(a.value.total_cmp(&b.value))
                .then(b.port.cmp(&a.port))
        })
        .expect("a check measures at least one port");
    let state = state_of(worst);
    let alerting = measured.iter().filter(|m| state_of(m) != State::Ok).count();
    let what = match check.subject {
        Subject::Port => "port",
        Subject::HeaviestRemote => "port's heaviest remote",
        Subject::Sources => "port's distinct sources",
    };
    let over = secs
        .map(|s| format!(" over {} s", threshold::number(s, 1)))
        .unwrap_or_default();
    let value = check.quantity.human(worst.value);
    let summary = match range_of(state) {
        Some(range) => {
            let more = match alerting - 1 {
                0 => String::new(),
                n => format!(", and {n} more {what}(s) out of range"),
            };
            format!(
                "{} {value} ({} range {}){more}{over}",
                describe(worst),
                state.word().to_lowercase(),
                range.text()
            )
        }
        None if worst.value == 0.0 && check.subject != Subject::Sources => {
            format!("no traffic on {} {what}(s){over}", measured.len())
        }
        None => format!(
            "{} {what}(s) within thresholds{over}; highest {} {value}",
            measured.len(),
            describe(worst)
        ),
    };
    let summary = if check.subject == Subject::Sources && measured.iter().all(|m| m.value == 0.0) {
        format!(
            "{summary} (no traffic went past the per-IP map since the last reset: the estimate counts only what did)"
        )
    } else {
        summary
    };
    let suffix = match (check.subject, check.quantity) {
        (Subject::Sources, _) => "sources",
        (Subject::HeaviestRemote, Quantity::PacketRate) => "top_remote_pps",
        (Subject::HeaviestRemote, _) => "top_remote_Bps",
        (_, Quantity::PacketRate) => "pps",
        _ => "Bps",
    };
    let mut perf = vec![];
    for m in &measured {
        let stem = port_label(&m.port);
        perf.push(Perf {
            label: format!("{stem}_{suffix}"),
            value: m.value,
            uom: "",
            warning: check.warning.clone(),
            critical: check.critical.clone(),
            min: Some(0.0),
        });
        if let Some(count) = m.count {
            let (label, uom) = match (check.subject, check.quantity) {
                (Subject::HeaviestRemote, Quantity::PacketRate) => ("top_remote_packets", ""),
                (Subject::HeaviestRemote, _) => ("top_remote_bytes", "B"),
                (_, Quantity::PacketRate) => ("packets", ""),
                _ => ("bytes", "B"),
            };
            perf.push(Perf {
                label: format!("{stem}_{label}"),
                value: count as f64,
                uom,
                warning: None,
                critical: None,
                min: Some(0.0),
            });
        }
    }
    if let Some(secs) = secs {
        perf.push(Perf {
            label: "interval".into(),
            value: secs,
            uom: "s",
            warning: None,
            critical: None,
            min: Some(0.0),
        });
    }
    Outcome { state, summary, perf }
}

#[cfg(test)]
mod tests {
    use portwatch_common::{Direction, IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    fn ip(text: &str) -> [u8; 16] {
        crate::cidr::ip(text)
    }

    fn period() -> Period {
        let c = |bytes, packets| Counters { bytes, packets };
        let counts = [
            (
                Key::ip(ip("198.18.0.2"), 443, IPPROTO_TCP, Direction::Ingress),
                c(10_000, 10),
            ),
            (
                Key::ip(ip("198.18.0.3"), 443, IPPROTO_TCP, Direction::Ingress),
                c(30_000, 20),
            ),
            (
                Key::ip(ip("198.18.0.3"), 53, IPPROTO_UDP, Direction::Ingress),
                c(500, 5),
            ),
            (
                Key::any_remote(PortKey::new(443, IPPROTO_TCP, Direction::Ingress)),
                c(50_000, 100),
            ),
        ];
        Period {
            secs: 10.0,
            counts: counts.into_iter().collect(),
        }
    }

    fn check(subject: Subject, quantity: Quantity, w: Option<&str>, c: Option<&str>) -> Check {
        Check {
            subject,
            quantity,
            warning: w.map(|r| r.parse().unwrap()),
            critical: c.map(|r| r.parse().unwrap()),
        }
    }

    fn selected() -> Vec<PortKey> {
        vec![
            PortKey::new(443, IPPROTO_TCP, Direction::Ingress),
            PortKey::new(53, IPPROTO_UDP, Direction::Ingress),
            PortKey::new(8080, IPPROTO_TCP, Direction::Ingress),
        ]
    }

    #[test]
    fn a_port_is_its_total_and_a_silent_port_is_zero() {
        let m = measure(
            &check(Subject::Port, Quantity::ByteRate, None, None),
            &selected(),
            &period(),
        );
        let values: Vec<(u16, f64, Option<u64>)> = m.iter().map(|m| (m.port.port, m.value, m.count)).collect();
        assert_eq!(
            values,
            [
                (53, 50.0, Some(500)),
                (443, 9_000.0, Some(90_000)),
                (8080, 0.0, Some(0))
            ]
        );
        let p = measure(
            &check(Subject::Port, Quantity::PacketRate, None, None),
            &selected(),
            &period(),
        );
        assert_eq!(p[1].count, Some(130));
    }

    #[test]
    fn the_heaviest_remote_is_one_address_not_the_per_port_overflow() {
        let m = measure(
            &check(Subject::HeaviestRemote, Quantity::ByteRate, None, None),
            &selected(),
            &period(),
        );
        assert_eq!(m[1].remote, Some(Remote::Ip(ip("198.18.0.3"))));
        assert_eq!((m[1].value, m[1].count), (3_000.0, Some(30_000)));
        assert_eq!(m[2].remote, None);
    }

    #[test]
    fn the_worst_port_sets_the_state_and_is_named() {
        let c = check(Subject::Port, Quantity::ByteRate, Some("1kB/s"), Some("5kB/s"));
        let outcome = judge(&c, measure(&c, &selected(), &period()), Some(10.0));
        assert_eq!(outcome.state, State::Critical);
        assert!(
            outcome
                .summary
                .starts_with("443/tcp ingress 9.0 kB/s (critical range 5kB/s)"),
            "{}",
            outcome.summary
        );
        let line = output::plugin_line(&outcome);
        assert!(
            line.contains("'443/tcp/ingress_Bps'=9000;1000;5000;0; '443/tcp/ingress_bytes'=90000B;;;0;"),
            "{line}"
        );
        assert!(line.ends_with("'interval'=10s;;;0;"), "{line}");

        // A port gone silent, under a lower bound.
        let c = check(Subject::Port, Quantity::ByteRate, None, Some("10:"));
        let outcome = judge(&c, measure(&c, &selected(), &period()), Some(10.0));
        assert_eq!(outcome.state, State::Critical);
        assert!(
            outcome.summary.starts_with("8080/tcp ingress 0 B/s"),
            "{}",
            outcome.summary
        );

        let c = check(Subject::Port, Quantity::ByteRate, Some("100kB/s"), Some("1MB/s"));
        let outcome = judge(&c, measure(&c, &selected(), &period()), Some(10.0));
        assert_eq!(outcome.state, State::Ok);
        assert!(
            outcome.summary.contains("highest 443/tcp ingress 9.0 kB/s"),
            "{}",
            outcome.summary
        );
    }

    #[test]
    fn a_line_never_holds_a_second_line_or_a_bar() {
        let line = output::plugin_line(&Outcome::unknown("a | b\nc"));
        assert_eq!(line, "PORTWATCH UNKNOWN - a / b c");
    }
}
