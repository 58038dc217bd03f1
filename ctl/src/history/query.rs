//! Which buckets answer a window, and what they hold.
//!
//! A window is answered from one granularity: the finest that still holds the window's start (its
//! retention has not removed it) and needs at most `MAX_BUCKETS` buckets for it, so that a month
//! is read from 30 daily buckets, not 8,640 five-minute ones. The window is widened to whole
//! buckets of that granularity, and the answer says so.

use anyhow::Result;
use portwatch_common::Counters;
use rusqlite::params;

use super::{
    store::{decode, record_instant, Store, Stored},
    Granularity,
};
use crate::filter::Filter;

/// Buckets one answer reads at most, unless only a coarser granularity's buckets are gone.
pub(crate) const MAX_BUCKETS: i64 = 100;

/// The buckets that answer a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub granularity: Granularity,
    /// The first bucket's start, and the end of the last (Unix time).
    pub from: i64,
    pub to: i64,
    /// The asked window started before the oldest bucket the store holds at this granularity
    /// while older records were ingested: retention cut it; the answer starts here.
    pub cut: Option<i64>,
}

/// Plans `[since, until)` (none: from the oldest record, to the newest); `granularity` forces one.
pub(crate) fn plan(
    store: &Store,
    since: Option<i64>,
    until: Option<i64>,
    granularity: Option<Granularity>,
) -> Result<Option<Plan>> {
    let (oldest, newest): (Option<i64>, Option<i64>) =
        store
            .conn()
            .query_row("SELECT min(time), max(time) FROM records", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
    let (Some(oldest), Some(newest)) = (oldest, newest) else {
        return Ok(None);
    };
    let since = since.unwrap_or(record_instant(oldest));
    let until = until.unwrap_or(record_instant(newest) + 1).max(since + 1);
    let candidates: Vec<Granularity> = match granularity {
        Some(g) => vec![g],
        None => Granularity::ALL.to_vec(),
    };
    // Past the loop: the finest granularity the retention did not cut, else the coarsest.
    let (mut fallback, mut coarsest) = (None, None);
    for g in candidates {
        let first: Option<i64> = store.conn().query_row(
            "SELECT min(bucket) FROM traffic WHERE gran = ?1",
            params![g as i64],
            |r| r.get(0),
        )?;
        let from = g.bucket(since);
        let to = g.next(g.bucket(until - 1));
        // What is older than the first bucket was never there, or was expired.
        let data_from = g.bucket(record_instant(oldest));
        let cut = match first {
            Some(first) if first > from.max(data_from) => Some(first),
            None if record_instant(newest) >= from => Some(g.next(g.bucket(record_instant(newest)))),
            _ => None,
        };
        let buckets = match g {
            Granularity::FiveMinutes => (to - from) / 300,
            Granularity::Hour => (to - from) / 3600,
            Granularity::Day => (to - from) / 86400,
            Granularity::Month => (to - from) / (28 * 86400),
        };
        let plan = Plan {
            granularity: g,
            from: cut.map_or(from, |c| c.max(from)),
            to,
            cut,
        };
        if granularity.is_some() || (cut.is_none() && buckets <= MAX_BUCKETS) {
            return Ok(Some(plan));
        }
        if cut.is_none() {
            fallback.get_or_insert(plan);
        }
        coarsest = Some(plan);
    }
    Ok(fallback.or(coarsest))
}

/// Every row the plan's buckets hold that `filter` keeps, summed per key over the buckets.
pub(crate) fn totals(store: &Store, plan: &Plan, filter: &Filter) -> Result<Vec<(Stored, Counters)>> {
    let mut statement = store.conn().prepare_cached(
        "SELECT port, proto, direction, kind, remote, sum(bytes), sum(packets) FROM traffic
         WHERE gran = ?1 AND bucket >= ?2 AND bucket < ?3
         GROUP BY port, proto, direction, kind, remote",
    )?;
    let mut rows = statement.query(params![plan.granularity as i64, plan.from, plan.to])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let stored = stored_at(store, row, 0)?;
        if keeps(filter, &stored) {
            out.push((stored, counters(row.get(5)?, row.get(6)?)));
        }
    }
    Ok(out)
}

/// Per bucket of the plan, the traffic `filter` keeps (every bucket, empty ones too).
pub(crate) fn periods(store: &Store, plan: &Plan, filter: &Filter) -> Result<Vec<(i64, Counters)>> {
    let mut per_bucket = std::collections::BTreeMap::new();
    let mut start = plan.from;
    while start < plan.to {
        per_bucket.insert(start, Counters::default());
        start = plan.granularity.next(start);
    }
    let mut statement = store.conn().prepare_cached(
        "SELECT bucket, port, proto, direction, kind, remote, bytes, packets FROM traffic
         WHERE gran = ?1 AND bucket >= ?2 AND bucket < ?3",
    )?;
    let mut rows = statement.query(params![plan.granularity as i64, plan.from, plan.to])?;
    while let Some(row) = rows.next()? {
        let stored = stored_at(store, row, 1)?;
        if keeps(filter, &stored) {
            *per_bucket.entry(row.get::<_, i64>(0)?).or_default() += counters(row.get(6)?, row.get(7)?);
        }
    }
    Ok(per_bucket.into_iter().collect())
}

/// The row's `Stored`, from its columns `port, proto, direction, kind, remote` starting at `at`.
fn stored_at(store: &Store, row: &rusqlite::Row, at: usize) -> Result<Stored> {
    decode(
        row.get(at + 3)?,
        row.get_ref(at + 4)?.as_str()?,
        row.get(at)?,
        row.get(at + 1)?,
        row.get(at + 2)?,
    )
    .ok_or_else(|| anyhow::anyhow!("{}: a row the store cannot read", store.path.display()))
}

fn counters(bytes: i64, packets: i64) -> Counters {
    Counters {
        bytes: bytes as u64,
        packets: packets as u64,
    }
}

/// The cap's `other` rows have no remote: an `--ip` filter drops them, as it drops the per-port
/// rows.
fn keeps(filter: &Filter, stored: &Stored) -> bool {
    match stored {
        Stored::Key(key) => filter.matches(key),
        Stored::Other(port) => filter.matches(&crate::generation::Key::any_remote(*port)),
    }
}

/// The newest 5-minute bucket, and the seconds of traffic it holds.
pub(crate) struct LastPeriod {
    pub plan: Plan,
    /// The time since the last record before the bucket (300 s with resets every 5 minutes; 300
    /// when there is none).
    pub secs: i64,
    /// The newest record's time.
    pub newest: i64,
}

/// The history's last period: what `alert --history` measures.
pub(crate) fn last_period(store: &Store) -> Result<Option<LastPeriod>> {
    let newest: Option<i64> = store
        .conn()
        .query_row("SELECT max(time) FROM records", [], |r| r.get(0))?;
    let Some(newest) = newest else { return Ok(None) };
    let g = Granularity::FiveMinutes;
    let from = g.bucket(record_instant(newest));
    // The last record put in an earlier bucket.
    let before: Option<i64> = store.conn().query_row(
        "SELECT max(time) FROM records WHERE time < ?1",
        params![from + 150],
        |r| r.get(0),
    )?;
    let secs = before.map_or(300, |b| newest - b).clamp(1, 3600);
    Ok(Some(LastPeriod {
        plan: Plan {
            granularity: g,
            from,
            to: g.next(from),
            cut: None,
        },
        secs,
        newest,
    }))
}
