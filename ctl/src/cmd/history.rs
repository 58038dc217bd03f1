//! `portwatch history`: ingest reset records into the store, and ask it for traffic per period
//! (`--hours`, `--days`, `--months`) or for the top remotes of a window (`history top`).

use std::io::Write;

use anyhow::{Context, Result};
use chrono::{Local, NaiveDate, NaiveDateTime, TimeZone, Utc};
use portwatch_common::Counters;
use serde::Serialize;

use crate::{
    cli::{HistoryArgs, HistoryCommand, HistoryTopArgs, IngestArgs, PeriodArgs, WindowArgs},
    error::Error,
    history::{
        self, parse_keep,
        query::{self, Plan},
        store::{Settings, Store, Stored},
        Granularity, Retention, DEFAULT_CAP,
    },
    output::{self, human_bytes, Envelope, HistoryWindow},
    report::{Report, View},
};

pub(in crate::cmd) fn run(args: &HistoryArgs) -> Result<()> {
    match &args.command {
        Some(HistoryCommand::Ingest(ingest)) => run_ingest(ingest),
        Some(HistoryCommand::Top(top)) => run_top(top),
        None => run_periods(&args.periods),
    }
}

fn run_ingest(args: &IngestArgs) -> Result<()> {
    let config = history::store::configured(&args.store)?;
    let mut retention = Retention::configured(config.retention.as_ref())
        .map_err(|e| Error::Config(format!("{}: history.retention: {e}", args.store.config.display())))?;
    for (i, flag) in [
        &args.keep_five_minutes,
        &args.keep_hours,
        &args.keep_days,
        &args.keep_months,
    ]
    .into_iter()
    .enumerate()
    {
        if let Some(text) = flag {
            retention.0[i] = parse_keep(text).map_err(Error::Config)?;
        }
    }
    let settings = Settings {
        retention,
        cap: args.cap.or(config.cap).unwrap_or(DEFAULT_CAP),
    };
    let mut store = Store::open(&history::store::db_path(&args.store, &config), true)?;
    for path in &args.records {
        let done = store.ingest(path, &settings)?;
        if !args.quiet {
            let mut line = format!(
                "{}: {} record{} ({} rows) added, {} already in the store",
                path.display(),
                done.records,
                if done.records == 1 { "" } else { "s" },
                done.rows,
                done.known
            );
            if done.torn {
                line += "; its last line is not complete yet (left for the next ingest)";
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// `WHEN` of `--since`/`--until`: a duration back from now, a date, or a date and time.
fn parse_when(text: &str, utc: bool, now: i64) -> Result<i64> {
    let text = text.trim();
    if let Ok(back) = humantime::parse_duration(text) {
        return Ok(now - back.as_secs() as i64);
    }
    let naive = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map(|d| d.and_time(chrono::NaiveTime::MIN))
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M"))
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M"))
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S"))
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| {
            Error::Config(format!(
                "{text:?}: not a time; give a duration back from now (24h, 7d), a date (2026-12-01) \
                 or a date and time (2026-12-01 10:00)"
            ))
        })?;
    if utc {
        return Ok(naive.and_utc().timestamp());
    }
    Local
        .from_local_datetime(&naive)
        .earliest()
        .map(|t| t.timestamp())
        .ok_or_else(|| Error::Config(format!("{text:?}: no such local time (a daylight-saving gap)")).into())
}

/// The store and the plan of a window question; `None` when the store holds no record.
fn open_window(window: &WindowArgs, granularity: Option<Granularity>) -> Result<(Store, Option<Plan>)> {
    let store = history::store::open_store(&window.store)?;
    let now = output::unix_time() as i64;
    let since = window
        .since
        .as_deref()
        .map(|w| parse_when(w, window.utc, now))
        .transpose()?;
    let until = window
        .until
        .as_deref()
        .map(|w| parse_when(w, window.utc, now))
        .transpose()?;
    if let (Some(s), Some(u)) = (since, until) {
        if u <= s {
            return Err(Error::Config("--until is not after --since".into()).into());
        }
    }
    let plan = query::plan(&store, since, until, granularity)?;
    Ok((store, plan))
}

/// `t` as `pattern` writes it, in local time or (`utc`) UTC.
fn format_at(t: i64, pattern: &str, utc: bool) -> String {
    if utc {
        Utc.timestamp_opt(t, 0).single().map(|d| d.format(pattern).to_string())
    } else {
        Local
            .timestamp_opt(t, 0)
            .single()
            .map(|d| d.format(pattern).to_string())
    }
    .unwrap_or_else(|| t.to_string())
}

/// A bucket's start as its granularity names it; daily and monthly buckets are local days.
fn format_time(t: i64, granularity: Granularity, utc: bool) -> String {
    let pattern = match granularity {
        Granularity::FiveMinutes | Granularity::Hour => "%Y-%m-%d %H:%M",
        Granularity::Day => "%Y-%m-%d",
        Granularity::Month => "%Y-%m",
    };
    format_at(
        t,
        pattern,
        utc && matches!(granularity, Granularity::FiveMinutes | Granularity::Hour),
    )
}

/// The line that says which buckets answered.
fn describe(plan: &Plan, utc: bool) -> String {
    let at = |t| format_at(t, "%Y-%m-%d %H:%M", utc) + if utc { " UTC" } else { "" };
    let mut line = format!(
        "{} buckets from {} to {}",
        plan.granularity.name(),
        at(plan.from),
        at(plan.to)
    );
    if let Some(cut) = plan.cut {
        line += &format!(
            "; retention has removed this granularity's buckets before {} (coarser ones may go further back)",
            at(cut)
        );
    }
    line
}

/// What `history` answers from a store without records: in JSON, the periods' shape, empty.
fn nothing_yet(json: bool) -> Result<()> {
    if json {
        println!("{{\"periods\":[],\"totals\":{{\"bytes\":0,\"packets\":0}}}}");
    } else {
        println!("{NO_RECORDS}");
    }
    Ok(())
}

const NO_RECORDS: &str = "(no records in the history store yet: `portwatch history ingest RECORD`)";

#[derive(Serialize)]
struct PeriodsJson<'a> {
    granularity: &'static str,
    from: i64,
    to: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cut: Option<i64>,
    periods: Vec<PeriodJson>,
    totals: &'a output::Figures,
}

#[derive(Serialize)]
struct PeriodJson {
    start: i64,
    label: String,
    bytes: u64,
    packets: u64,
}

fn run_periods(args: &PeriodArgs) -> Result<()> {
    let granularity = if args.hours {
        Granularity::Hour
    } else if args.months {
        Granularity::Month
    } else if args.five_minutes {
        Granularity::FiveMinutes
    } else {
        Granularity::Day
    };
    let window = &args.window;
    let (store, plan) = open_window(window, Some(granularity))?;
    let Some(plan) = plan else {
        return nothing_yet(window.json);
    };
    let periods = query::periods(&store, &plan, &window.filter())?;
    let total = periods.iter().fold(Counters::default(), |a, (_, c)| a + *c);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if window.json {
        let json = PeriodsJson {
            granularity: plan.granularity.name(),
            from: plan.from,
            to: plan.to,
            cut: plan.cut,
            periods: periods
                .iter()
                .map(|(start, c)| PeriodJson {
                    start: *start,
                    label: format_time(*start, plan.granularity, window.utc),
                    bytes: c.bytes,
                    packets: c.packets,
                })
                .collect(),
            totals: &total.into(),
        };
        serde_json::to_writer(&mut out, &json)?;
        writeln!(out)?;
    } else {
        out.write_all(chart(&periods, plan.granularity, window.utc, window.exact).as_bytes())?;
        writeln!(
            out,
            "total: {} ({} bytes), {} packets; {}",
            human_bytes(total.bytes),
            total.bytes,
            total.packets,
            describe(&plan, window.utc)
        )?;
    }
    out.flush().context("writing to stdout")
}

/// One line per period: its start, bytes, packets and a bar (vnstat's `-hg`), the bars scaled to
/// the largest period.
fn chart(periods: &[(i64, Counters)], granularity: Granularity, utc: bool, exact: bool) -> String {
    const WIDTH: u64 = 40;
    let max = periods.iter().map(|(_, c)| c.bytes).max().unwrap_or(0);
    let lines: Vec<[String; 4]> = periods
        .iter()
        .map(|(start, c)| {
            let bar = if max == 0 {
                0
            } else {
                (c.bytes as u128 * WIDTH as u128).div_ceil(max as u128) as usize
            };
            [
                format_time(*start, granularity, utc),
                if exact {
                    c.bytes.to_string()
                } else {
                    human_bytes(c.bytes)
                },
                c.packets.to_string(),
                "#".repeat(bar),
            ]
        })
        .collect();
    let title = match granularity {
        Granularity::FiveMinutes => "5 minutes",
        Granularity::Hour => "hour",
        Granularity::Day => "day",
        Granularity::Month => "month",
    };
    let header = [title.to_string(), "bytes".into(), "packets".into(), String::new()];
    let width = |i: usize| {
        lines
            .iter()
            .map(|l| l[i].len())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let mut out = String::new();
    for line in std::iter::once(&header).chain(&lines) {
        out += format!("{:<w0$}  {:>w1$}  {:>w2$}  {}", line[0], line[1], line[2], line[3]).trim_end();
        out.push('\n');
    }
    out
}

fn run_top(args: &HistoryTopArgs) -> Result<()> {
    let window = &args.window;
    let (store, plan) = open_window(window, None)?;
    // No records yet (no plan): `top`'s shapes with no rows, for scripts; the table says why.
    let mut keys = vec![];
    let mut other = Counters::default();
    if let Some(plan) = &plan {
        for (stored, counters) in query::totals(&store, plan, &window.filter())? {
            match stored {
                Stored::Key(key) => keys.push((key, counters)),
                Stored::Other(_) => other += counters,
            }
        }
    }
    let view = View::from(args);
    let mut report = Report::new(&view, &view.group_all(&keys), None);
    report.totals += other;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if window.json {
        let history = plan
            .as_ref()
            .map(|plan| HistoryWindow::new(plan.granularity.name(), plan.from, plan.to, plan.cut, other));
        output::write_json(&report, &Envelope::reading(history), &mut out)?;
    } else if args.csv {
        out.write_all(output::csv(&report).as_bytes())?;
    } else if let Some(plan) = &plan {
        out.write_all(output::table(&report, window.exact).as_bytes())?;
        if other != Counters::default() {
            writeln!(
                out,
                "of which {} ({} bytes), {} packets from remotes past a bucket's cap (in no row)",
                human_bytes(other.bytes),
                other.bytes,
                other.packets
            )?;
        }
        writeln!(out, "{}", describe(plan, window.utc))?;
    } else {
        writeln!(out, "{NO_RECORDS}")?;
    }
    out.flush().context("writing to stdout")
}
