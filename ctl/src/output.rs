//! The printers. Every output is typed data first (a `Report`, a `Serialize` struct); this module
//! turns it into text: a report row becomes typed cells once (`cells`), and the table, the CSV, the
//! JSON line and the live screen each format those cells their way.

use std::{fmt::Write as _, io, net::Ipv6Addr};

use portwatch_common::{Counters, Tier, IPPROTO_TCP};
use serde::{Serialize, Serializer};

use crate::{
    cidr::Cidr,
    generation::Key,
    report::{By, Group, Report, Row, View},
    sources,
    threshold::{self, Outcome},
};

/// `1.5 MiB` style, binary units; exact figures are printed beside it where it matters.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `n` with its digits in groups of three: `432,345,088`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A monitoring plugin's output (`alert`): `PORTWATCH STATE - summary | 'label'=value[UOM];warn;crit;min;`
/// on one line, numbers in the C locale. The summary cannot hold a `|` (the performance data's
/// separator) nor a line break: they are replaced.
pub(crate) fn plugin_line(outcome: &Outcome) -> String {
    let summary: String = outcome
        .summary
        .chars()
        .map(|c| match c {
            '|' => '/',
            '\n' | '\r' => ' ',
            c => c,
        })
        .collect();
    let mut line = format!("PORTWATCH {} - {}", outcome.state.word(), summary.trim());
    for (i, perf) in outcome.perf.iter().enumerate() {
        line.push_str(if i == 0 { " | " } else { " " });
        // A quote in a label is written twice; `=` cannot be in one (portwatch's labels have none).
        let label = perf.label.replace('\'', "''");
        let range = |r: &Option<threshold::Range>| r.as_ref().map(|r| r.to_string()).unwrap_or_default();
        let min = perf.min.map(|m| threshold::number(m, 6)).unwrap_or_default();
        let _ = write!(
            line,
            "'{label}'={}{};{};{};{min};",
            threshold::number(perf.value, 3),
            perf.uom,
            range(&perf.warning),
            range(&perf.critical),
        );
    }
    line
}

/// A document on stdout, pretty-printed (`status --json`, `ports list --json`).
pub(crate) fn print_json(value: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("portwatch's outputs always serialize")
    );
}

/// Seconds since the Unix epoch, for the `time` of a JSON report.
pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

pub(crate) fn format_ip(ip: &[u8; 16]) -> String {
    let v6 = Ipv6Addr::from(*ip);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => v6.to_string(),
    }
}

pub(crate) fn proto_name(proto: u8) -> &'static str {
    if proto == IPPROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

/// A column of a report: its JSON field and CSV header (`key`), its table title.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Column {
    Ip,
    Cidr,
    Port,
    Proto,
    Direction,
    Bytes,
    Packets,
    BytesPerSec,
    PacketsPerSec,
}

impl Column {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Column::Ip => "ip",
            Column::Cidr => "cidr",
            Column::Port => "port",
            Column::Proto => "proto",
            Column::Direction => "direction",
            Column::Bytes => "bytes",
            Column::Packets => "packets",
            Column::BytesPerSec => "bytes_per_sec",
            Column::PacketsPerSec => "packets_per_sec",
        }
    }

    pub(crate) fn title(self) -> &'static str {
        match self {
            Column::Ip => "IP",
            Column::Cidr => "CIDR",
            Column::Port => "PORT",
            Column::Proto => "PROTO",
            Column::Direction => "DIRECTION",
            Column::Bytes => "BYTES",
            Column::Packets => "PACKETS",
            Column::BytesPerSec => "BYTES/S",
            Column::PacketsPerSec => "PKTS/S",
        }
    }

    /// What a row is (left-aligned), as opposed to its figures (right-aligned).
    pub(crate) fn identifies(self) -> bool {
        matches!(
            self,
            Column::Ip | Column::Cidr | Column::Port | Column::Proto | Column::Direction
        )
    }

    /// Its width on the live screen: the longest value it can hold.
    pub(crate) fn screen_width(self) -> u16 {
        match self {
            Column::Ip => 39,
            Column::Cidr => 43,
            Column::Port | Column::Proto => 6,
            Column::Direction => 10,
            Column::Bytes | Column::BytesPerSec => 14,
            Column::Packets => 12,
            Column::PacketsPerSec => 10,
        }
    }
}

/// The columns of a report grouped `by`, with the rate columns when `rates`.
pub(crate) fn columns(by: By, rates: bool) -> Vec<Column> {
    let mut columns = match by {
        By::Ip => vec![Column::Ip],
        By::IpPort => vec![Column::Ip, Column::Port, Column::Proto, Column::Direction],
        By::Port => vec![Column::Port],
        By::Cidr => vec![Column::Cidr],
        By::CidrPort => vec![Column::Cidr, Column::Port, Column::Proto, Column::Direction],
    };
    columns.extend([Column::Bytes, Column::Packets]);
    if rates {
        columns.extend([Column::BytesPerSec, Column::PacketsPerSec]);
    }
    columns
}

/// One row's value in one column, typed: each printer formats it its way.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Cell {
    Text(String),
    /// The remote of a row counted past the per-IP map (`Group::tier`), where an address or the
    /// view's prefix would be: a prefix tier's prefix, or (`None`) any remote (the per-port
    /// overflow).
    PastPerIp(Option<Cidr>),
    Port(u16),
    Bytes(u64),
    Packets(u64),
    /// Bytes per second; `None` before a second reading (the live screen's first).
    ByteRate(Option<f64>),
    PacketRate(Option<f64>),
}

/// The one way a row becomes cells, for every printer.
pub(crate) fn cells(row: &Row, columns: &[Column]) -> Vec<Cell> {
    columns.iter().map(|c| cell(row, *c)).collect()
}

fn cell(row: &Row, column: Column) -> Cell {
    let text = |s: String| Cell::Text(s);
    match (column, &row.group) {
        (Column::Ip, Group::Ip(ip) | Group::IpPort { ip, .. }) => text(format_ip(ip)),
        (Column::Ip, Group::Prefix(cidr) | Group::PrefixPort { cidr, .. }) => Cell::PastPerIp(Some(*cidr)),
        (Column::Ip | Column::Cidr, Group::AnyRemotePort { .. }) => Cell::PastPerIp(None),
        (Column::Cidr, Group::Cidr(cidr) | Group::CidrPort { cidr, .. }) => text(cidr.to_string()),
        (
            Column::Port,
            Group::IpPort { port, .. }
            | Group::Port(port)
            | Group::CidrPort { port, .. }
            | Group::PrefixPort { port, .. }
            | Group::AnyRemotePort { port, .. },
        ) => Cell::Port(*port),
        (
            Column::Proto,
            Group::IpPort { proto, .. }
            | Group::CidrPort { proto, .. }
            | Group::PrefixPort { proto, .. }
            | Group::AnyRemotePort { proto, .. },
        ) => text(proto_name(*proto).to_string()),
        (
            Column::Direction,
            Group::IpPort { direction, .. }
            | Group::CidrPort { direction, .. }
            | Group::PrefixPort { direction, .. }
            | Group::AnyRemotePort { direction, .. },
        ) => text(direction.name().to_string()),
        (Column::Bytes, _) => Cell::Bytes(row.counters.bytes),
        (Column::Packets, _) => Cell::Packets(row.counters.packets),
        (Column::BytesPerSec, _) => Cell::ByteRate(row.rate.map(|r| r.bytes)),
        (Column::PacketsPerSec, _) => Cell::PacketRate(row.rate.map(|r| r.packets)),
        (column, group) => unreachable!("no {column:?} column in a row of {group:?}"),
    }
}

impl Cell {
    /// As the table and the live screen show it: human units unless `exact`, `-` for a rate not
    /// measured yet.
    pub(crate) fn text(&self, exact: bool) -> String {
        let bytes = |b: u64| if exact { b.to_string() } else { human_bytes(b) };
        match self {
            Cell::Text(s) => s.clone(),
            Cell::PastPerIp(Some(cidr)) => format!("{cidr} {MARK}"),
            Cell::PastPerIp(None) => format!("{MARK} (any)"),
            Cell::Port(p) => p.to_string(),
            Cell::Bytes(b) => bytes(*b),
            Cell::Packets(p) => p.to_string(),
            Cell::ByteRate(Some(b)) if exact => format!("{b:.0}/s"),
            Cell::ByteRate(Some(b)) => format!("{}/s", human_bytes(*b as u64)),
            Cell::PacketRate(Some(p)) => format!("{p:.0}"),
            Cell::ByteRate(None) | Cell::PacketRate(None) => "-".into(),
        }
    }

    /// As CSV holds it: exact figures, rates to a tenth.
    fn csv(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::PastPerIp(Some(cidr)) => cidr.to_string(),
            Cell::PastPerIp(None) => MARK.to_string(),
            Cell::Port(p) => p.to_string(),
            Cell::Bytes(n) | Cell::Packets(n) => n.to_string(),
            Cell::ByteRate(Some(r)) | Cell::PacketRate(Some(r)) => format!("{r:.1}"),
            Cell::ByteRate(None) | Cell::PacketRate(None) => String::new(),
        }
    }
}

/// As JSON holds it: strings, exact integers, rates as numbers (`null` if not measured).
impl Serialize for Cell {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Cell::Text(s) => serializer.serialize_str(s),
            Cell::PastPerIp(cidr) => cidr.map(|c| c.to_string()).serialize(serializer),
            Cell::Port(p) => serializer.serialize_u16(*p),
            Cell::Bytes(n) | Cell::Packets(n) => serializer.serialize_u64(*n),
            Cell::ByteRate(r) | Cell::PacketRate(r) => r.serialize(serializer),
        }
    }
}

/// Bytes and packets as JSON objects hold them.
#[derive(Serialize)]
pub(crate) struct Figures {
    bytes: u64,
    packets: u64,
}

impl From<Counters> for Figures {
    fn from(c: Counters) -> Figures {
        Figures {
            bytes: c.bytes,
            packets: c.packets,
        }
    }
}

/// The marker of a row counted past the per-IP map, in a table.
const MARK: &str = "*";

/// `by_tier` in a JSON report: what was counted per address, per prefix, per wide prefix and per
/// port alone.
#[derive(Serialize)]
struct ByTier {
    ip: Figures,
    prefix: Figures,
    #[serde(rename = "wide-prefix")]
    wide_prefix: Figures,
    port: Figures,
}

impl From<&Report> for ByTier {
    fn from(report: &Report) -> ByTier {
        let of = |tier| Figures::from(report.by_tier.of(tier));
        ByTier {
            ip: of(Tier::Ip),
            prefix: of(Tier::Prefix),
            wide_prefix: of(Tier::WidePrefix),
            port: of(Tier::Port),
        }
    }
}

/// `sources` in a JSON report: per port, protocol and direction, the distinct remote addresses
/// counted past the per-IP map, estimated, with the estimate's standard error.
#[derive(Serialize)]
struct SourceEstimates {
    standard_error: f64,
    ports: Vec<SourceEstimate>,
}

#[derive(Serialize)]
struct SourceEstimate {
    port: u16,
    proto: &'static str,
    direction: &'static str,
    estimate: u64,
}

impl From<&Report> for SourceEstimates {
    fn from(report: &Report) -> SourceEstimates {
        SourceEstimates {
            standard_error: sources::STANDARD_ERROR,
            ports: report
                .sources
                .iter()
                .map(|(port, estimate)| SourceEstimate {
                    port: port.port,
                    proto: proto_name(port.proto),
                    direction: port.direction().name(),
                    estimate: *estimate,
                })
                .collect(),
        }
    }
}

/// What a JSON report says about itself before its rows.
pub(crate) struct Envelope {
    /// Unix time of the output.
    pub time: u64,
    /// Whether the rows are what a reset zeroed.
    pub reset: bool,
    /// The reset's id (unique: a recovery finds its record by it; a reader can drop a repeat).
    pub reset_id: Option<String>,
    /// `history top`: the buckets the answer read.
    pub history: Option<HistoryWindow>,
}

impl Envelope {
    /// A reading made now, not a reset (`top`; `history top` with the buckets it read).
    pub(crate) fn reading(history: Option<HistoryWindow>) -> Envelope {
        Envelope {
            time: unix_time(),
            reset: false,
            reset_id: None,
            history,
        }
    }
}

/// Which buckets of the history store answered (`history top --json`'s `history`).
#[derive(Serialize)]
pub(crate) struct HistoryWindow {
    /// `5-minute`, `hourly`, `daily` or `monthly`.
    pub granularity: &'static str,
    /// The first bucket's start and the last one's end (Unix time).
    pub from: i64,
    pub to: i64,
    /// Retention had removed the window's start: the answer starts here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut: Option<i64>,
    /// Traffic of remotes a bucket's cap summed together (in `totals`, in no row).
    pub other: Figures,
}

impl HistoryWindow {
    pub(crate) fn new(granularity: &'static str, from: i64, to: i64, cut: Option<i64>, other: Counters) -> Self {
        HistoryWindow {
            granularity,
            from,
            to,
            cut,
            other: other.into(),
        }
    }
}

fn json(w: &mut (impl io::Write + ?Sized), value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(w, value).map_err(io::Error::from)
}

/// One JSON object on one line (so `>> file.jsonl` keeps one record per line), written as it goes:
/// a million-row reset needs no document in memory.
pub(crate) fn write_json(report: &Report, envelope: &Envelope, w: &mut (impl io::Write + ?Sized)) -> io::Result<()> {
    write!(w, "{{\"time\":{},", envelope.time)?;
    if envelope.reset {
        w.write_all(b"\"reset\":true,")?;
    }
    if let Some(id) = &envelope.reset_id {
        write!(w, "\"reset_id\":\"{id}\",")?;
    }
    w.write_all(b"\"rows\":[")?;
    let columns = columns(report.by, report.interval.is_some());
    for (i, row) in report.rows.iter().enumerate() {
        w.write_all(if i == 0 { b"{" } else { b",{" })?;
        for (j, (column, cell)) in columns.iter().zip(cells(row, &columns)).enumerate() {
            if j > 0 {
                w.write_all(b",")?;
            }
            match (&cell, row.group.tier()) {
                // A row counted past the per-IP map says its tier, and names its prefix `cidr`
                // (no `ip`), or no remote at all (the per-port overflow).
                (Cell::PastPerIp(Some(cidr)), Some(tier)) => {
                    write!(w, "\"cidr\":\"{cidr}\",\"tier\":\"{}\"", tier.name())?
                }
                (Cell::PastPerIp(_), tier) => write!(w, "\"tier\":\"{}\"", tier.unwrap_or(Tier::Port).name())?,
                _ => {
                    write!(w, "\"{}\":", column.key())?;
                    json(w, &cell)?;
                }
            }
        }
        w.write_all(b"}")?;
    }
    w.write_all(b"],\"totals\":")?;
    json(w, &Figures::from(report.totals))?;
    w.write_all(b",\"by_tier\":")?;
    json(w, &ByTier::from(report))?;
    w.write_all(b",\"overflow\":")?;
    json(w, &Figures::from(report.overflow))?;
    if !report.sources.is_empty() {
        w.write_all(b",\"sources\":")?;
        json(w, &SourceEstimates::from(report))?;
    }
    if let Some(secs) = report.interval {
        w.write_all(b",\"interval_secs\":")?;
        json(w, &secs)?;
    }
    if let Some(history) = &envelope.history {
        w.write_all(b",\"history\":")?;
        json(w, history)?;
    }
    w.write_all(b"}\n")
}

/// How a reset's record is written: one JSON line with the reset's id (`--json`, and the drains of
/// `unload`/`apply --reload`), CSV, or a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecordFormat {
    Json,
    Csv,
    Table { exact: bool },
}

/// A reset's record of `entries` (sorted by key): every key a row of its own (a reset reports at
/// the finest grain), in `format`.
pub(crate) fn write_record(
    entries: &[(Key, Counters)],
    reset_id: &str,
    format: RecordFormat,
    w: &mut dyn io::Write,
) -> io::Result<()> {
    let view = View::every_key();
    let report = Report::new(&view, &view.group_all(entries), None);
    match format {
        RecordFormat::Json => {
            let envelope = Envelope {
                time: unix_time(),
                reset: true,
                reset_id: Some(reset_id.to_string()),
                history: None,
            };
            write_json(&report, &envelope, w)
        }
        RecordFormat::Csv => w.write_all(csv(&report).as_bytes()),
        RecordFormat::Table { exact } => w.write_all(table(&report, exact).as_bytes()),
    }
}

/// A header line and one line per row, the same columns as the JSON rows.
pub(crate) fn csv(report: &Report) -> String {
    csv_with(report, true, None)
}

/// `csv`, with or without the header line, and with a leading `time` column when given (a stream
/// of reports says when each was read).
pub(crate) fn csv_with(report: &Report, header: bool, time: Option<u64>) -> String {
    let columns = columns(report.by, report.interval.is_some());
    let mut out = String::new();
    if header {
        let keys: Vec<&str> = time
            .map(|_| "time")
            .into_iter()
            .chain(columns.iter().map(|c| c.key()))
            .collect();
        out += &(keys.join(",") + "\n");
    }
    for row in &report.rows {
        let fields: Vec<String> = time
            .map(|t| t.to_string())
            .into_iter()
            .chain(cells(row, &columns).iter().map(Cell::csv))
            .collect();
        out += &(fields.join(",") + "\n");
    }
    out
}

/// An aligned table with human units (exact bytes with `exact`) and the summary line.
pub(crate) fn table(report: &Report, exact: bool) -> String {
    let columns = columns(report.by, report.interval.is_some());
    let mut lines: Vec<Vec<String>> = vec![columns.iter().map(|c| c.title().to_string()).collect()];
    for row in &report.rows {
        lines.push(cells(row, &columns).iter().map(|c| c.text(exact)).collect());
    }
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for line in &lines {
        let aligned: Vec<String> = line
            .iter()
            .zip(&columns)
            .zip(&widths)
            .map(|((text, column), &w)| {
                if column.identifies() {
                    format!("{text:<w$}")
                } else {
                    format!("{text:>w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", aligned.join("  ").trim_end());
    }
    if report.rows.is_empty() {
        let _ = writeln!(out, "(no traffic counted)");
    }
    if report.rows.iter().any(|r| r.group.tier().is_some()) {
        let _ = writeln!(out, "{}", FOOTNOTE);
    }
    let _ = writeln!(out, "{}", summary(report));
    out
}

/// Under a table with marked rows.
pub(crate) const FOOTNOTE: &str =
    "* counted past the per-IP map, which was full: under its prefix (a /24 or /48, or a \
     /16 or /32 once those were full too), or, as (any), under its port alone";

/// The line under a table (and over the live screen): totals with exact bytes, how many rows,
/// and the overflow traffic.
pub(crate) fn summary(report: &Report) -> String {
    let shown = if report.total_rows > report.rows.len() {
        format!("top {} of {} rows", report.rows.len(), report.total_rows)
    } else if report.total_rows == 1 {
        "1 row".to_string()
    } else {
        format!("{} rows", report.total_rows)
    };
    let figure = |c: Counters| format!("{} ({} bytes)", human_bytes(c.bytes), c.bytes);
    let mut line = format!(
        "total: {} ({} bytes), {} packets; {shown}",
        human_bytes(report.totals.bytes),
        report.totals.bytes,
        report.totals.packets,
    );
    let past = report.by_tier.past_per_ip();
    if past != Counters::default() {
        let tiers = &report.by_tier;
        let _ = write!(
            line,
            "; per IP {}, per prefix {}, per port only {}",
            figure(tiers.of(Tier::Ip)),
            figure(tiers.of(Tier::Prefix) + tiers.of(Tier::WidePrefix)),
            figure(tiers.of(Tier::Port))
        );
        let sources: u64 = report.sources.iter().map(|(_, n)| n).sum();
        if !report.sources.is_empty() {
            let _ = write!(
                line,
                "; about {sources} distinct sources past the per-IP map (standard error {:.1}%)",
                sources::STANDARD_ERROR * 100.0
            );
        }
    }
    if report.overflow != Counters::default() {
        let _ = write!(
            line,
            "; unattributed (no tier had room): {}, {} packets",
            figure(report.overflow),
            report.overflow.packets
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::{human_bytes, thousands};

    #[test]
    fn binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn thousands_are_grouped_by_three_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(78_867_800), "78,867,800");
        assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
    }
}
