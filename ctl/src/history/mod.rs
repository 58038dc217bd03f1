//! The history store: reset records (the JSON lines `reset --json --output FILE` appends) ingested
//! into an SQLite database, summed into 5-minute, hourly, daily and monthly buckets (vnstat's
//! shape), each kept for its own retention, and queried by `history top` and `history
//! --hours|--days|--months`. The store is built from the records only: it never touches the pinned
//! maps, and never changes a record file. docs/history.md is the operator's side of this.
//!
//! - `store`: the database (schema, one transaction per ingested file, retention, the cap).
//! - `ingest`: reading record files (plain or gzip, a torn last line, where a grown file resumes).
//! - `query`: which buckets answer a window, and what they hold.

pub(crate) mod ingest;
pub(crate) mod query;
pub(crate) mod store;

use std::time::Duration;

pub(crate) use crate::config::{parse_keep, HistoryConfig, RetentionConfig};

/// Where the store is, unless `--db` or `history.db` says otherwise.
pub(crate) const DEFAULT_DB: &str = "/var/lib/portwatch/history.db";

/// A bucket size. Five-minute and hourly buckets start at multiples of their length (Unix time,
/// so the same instant everywhere); daily and monthly buckets start at local midnight, as vnstat's
/// do (the machine's time zone when the record is ingested).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Granularity {
    FiveMinutes = 0,
    Hour = 1,
    Day = 2,
    Month = 3,
}

impl Granularity {
    pub(crate) const ALL: [Granularity; 4] = [
        Granularity::FiveMinutes,
        Granularity::Hour,
        Granularity::Day,
        Granularity::Month,
    ];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Granularity::FiveMinutes => "5-minute",
            Granularity::Hour => "hourly",
            Granularity::Day => "daily",
            Granularity::Month => "monthly",
        }
    }

    /// The start (Unix time) of the bucket holding `t`.
    pub(crate) fn bucket(self, t: i64) -> i64 {
        use chrono::{Datelike, Local, NaiveTime, TimeZone};
        match self {
            Granularity::FiveMinutes => t - t.rem_euclid(300),
            Granularity::Hour => t - t.rem_euclid(3600),
            Granularity::Day | Granularity::Month => {
                let Some(local) = Local.timestamp_opt(t, 0).single() else {
                    return t - t.rem_euclid(86400);
                };
                let mut date = local.date_naive();
                if self == Granularity::Month {
                    date = date.with_day(1).unwrap_or(date);
                }
                local_start(date.and_time(NaiveTime::MIN))
            }
        }
    }

    /// The start of the bucket after the one starting at `start`.
    pub(crate) fn next(self, start: i64) -> i64 {
        use chrono::{Datelike, Local, Months, TimeZone};
        match self {
            Granularity::FiveMinutes => start + 300,
            Granularity::Hour => start + 3600,
            Granularity::Day | Granularity::Month => {
                let Some(local) = Local.timestamp_opt(start, 0).single() else {
                    return start + 86400;
                };
                let date = local.date_naive();
                let next = if self == Granularity::Day {
                    date.succ_opt()
                } else {
                    date.with_day(1).and_then(|d| d.checked_add_months(Months::new(1)))
                };
                next.map_or(start + 86400, |d| local_start(d.and_time(chrono::NaiveTime::MIN)))
            }
        }
    }
}

/// The Unix time of a local date and time; at a gap (a daylight-saving jump over midnight), the
/// first instant after it.
fn local_start(naive: chrono::NaiveDateTime) -> i64 {
    use chrono::{Local, TimeZone};
    match Local.from_local_datetime(&naive) {
        chrono::LocalResult::Single(t) => t.timestamp(),
        chrono::LocalResult::Ambiguous(t, _) => t.timestamp(),
        chrono::LocalResult::None => Local
            .from_local_datetime(&(naive + chrono::Duration::hours(1)))
            .earliest()
            .map_or(naive.and_utc().timestamp(), |t| t.timestamp()),
    }
}

/// How long each granularity's buckets are kept (`None`: for ever), counted back from the newest
/// record in the store (so that ingesting old records never expires what a newer one brought).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retention(pub [Option<Duration>; 4]);

impl Default for Retention {
    fn default() -> Retention {
        const DAY: u64 = 86400;
        Retention([
            Some(Duration::from_secs(2 * DAY)),
            Some(Duration::from_secs(35 * DAY)),
            Some(Duration::from_secs(400 * DAY)),
            None,
        ])
    }
}

impl Retention {
    pub(crate) fn of(&self, granularity: Granularity) -> Option<Duration> {
        self.0[granularity as usize]
    }
}

/// Remotes (addresses and prefixes) kept per bucket and port, protocol and direction; the rest of
/// the bucket's traffic is summed in one `other` row.
pub(crate) const DEFAULT_CAP: u32 = 1000;

impl Retention {
    /// The defaults with what portwatch.yaml's `history: retention:` sets.
    pub(crate) fn configured(config: Option<&RetentionConfig>) -> Result<Retention, String> {
        let mut retention = Retention::default();
        if let Some(config) = config {
            for (i, set) in config.durations()?.into_iter().enumerate() {
                if let Some(keep) = set {
                    retention.0[i] = keep;
                }
            }
        }
        Ok(retention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_contain_their_instants_and_follow_each_other() {
        for t in [0i64, 1_795_890_761, 1_800_000_000, 1_764_547_200] {
            for g in Granularity::ALL {
                let start = g.bucket(t);
                let next = g.next(start);
                assert!(start <= t && t < next, "{g:?} {t}: {start}..{next}");
                assert_eq!(g.bucket(next), next, "{g:?}");
                assert_eq!(g.bucket(next - 1), start, "{g:?}");
            }
        }
    }

    #[test]
    fn keep_durations() {
        assert_eq!(parse_keep("48h"), Ok(Some(Duration::from_secs(48 * 3600))));
        assert_eq!(parse_keep("35d"), Ok(Some(Duration::from_secs(35 * 86400))));
        assert_eq!(parse_keep("forever"), Ok(None));
        assert!(parse_keep("soon").is_err());
    }
}
