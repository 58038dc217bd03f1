//! The SQLite database (`rusqlite`, SQLite bundled; WAL). Schema version 1 (`PRAGMA
//! user_version`):
//!
//! - `records(id, time, rows, bytes, packets)`: every record ingested, by its id (`reset_id`, or
//!   its offset and hash): a record is ingested once.
//! - `files(path, dev, ino, offset, head)`: where the reading of a plain record file stopped, so
//!   that a grown file is read from there on (`ingest::Resume`).
//! - `traffic(gran, bucket, port, proto, direction, kind, remote, bytes, packets)`: the buckets.
//!   `gran` a `Granularity`, `bucket` its start (Unix time), `kind` a `Kind`, `remote` the address
//!   or prefix as text (empty for the kinds without one).
//!
//! Everything an ingest does to a file's records (their rows in every granularity, the cap, the
//! expiry, where the file was read to) is one transaction: killed at any instant, the database
//! holds each record whole or not at all, and the next ingest adds what is missing.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use portwatch_common::{Counters, Direction, PortKey};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    ingest::{self, Next, Record, RecordFile, Resume},
    Granularity, HistoryConfig, Retention,
};
use crate::{
    cidr::Cidr,
    error::Error,
    generation::{Key, Remote},
};

pub(crate) const SCHEMA_VERSION: i64 = 1;

/// A row's kind: what its `remote` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Ip = 0,
    Prefix = 1,
    /// The port alone (`Remote::AnyRemote`).
    Port = 2,
    Overflow = 3,
    /// The remotes a bucket's cap folded together.
    Other = 4,
}

/// A stored row's identity: a `Key`, or the cap's `other` row of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stored {
    Key(Key),
    Other(PortKey),
}

fn encode(key: &Key) -> (Kind, String) {
    match key.remote {
        Remote::Ip(ip) => {
            let v6 = Ipv6Addr::from(ip);
            let text = v6.to_ipv4_mapped().map_or_else(|| v6.to_string(), |v4| v4.to_string());
            (Kind::Ip, text)
        }
        Remote::Prefix(cidr) => (Kind::Prefix, cidr.to_string()),
        Remote::AnyRemote => (Kind::Port, String::new()),
        Remote::Overflow => (Kind::Overflow, String::new()),
    }
}

pub(crate) fn decode(kind: i64, remote: &str, port: i64, proto: i64, direction: i64) -> Option<Stored> {
    let (port, proto) = (u16::try_from(port).ok()?, u8::try_from(proto).ok()?);
    let direction = Direction::from_u8(u8::try_from(direction).ok()?);
    let remote = match kind {
        0 => Remote::Ip(match remote.parse::<IpAddr>().ok()? {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }),
        1 => Remote::Prefix(remote.parse::<Cidr>().ok()?),
        2 => Remote::AnyRemote,
        3 => return Some(Stored::Key(Key::overflow(direction))),
        4 => return Some(Stored::Other(PortKey::new(port, proto, direction))),
        _ => return None,
    };
    Some(Stored::Key(Key {
        remote,
        port,
        proto,
        direction,
    }))
}

/// What an ingest does besides adding: how long buckets are kept, how many remotes a bucket
/// keeps per port.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub retention: Retention,
    pub cap: u32,
}

/// What ingesting one file did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ingested {
    pub records: u64,
    pub rows: u64,
    /// Records already in the store.
    pub known: u64,
    /// A last line without its newline was left for later.
    pub torn: bool,
}

pub(crate) struct Store {
    conn: Connection,
    pub path: PathBuf,
}

fn store_error(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    Error::History(format!("{}: {e}", path.display())).into()
}

impl Store {
    /// Opens the database, creating it (and its directory) when `create` and missing.
    pub(crate) fn open(path: &Path, create: bool) -> Result<Store> {
        if !path.exists() {
            if !create {
                return Err(Error::History(format!(
                    "{}: no history database; run `portwatch history ingest RECORD...` first",
                    path.display()
                ))
                .into());
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| store_error(dir, format!("cannot create it ({e})")))?;
            }
        }
        let flags = if create {
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        } else {
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
        };
        let conn = Connection::open_with_flags(path, flags | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| store_error(path, format!("cannot open the history database ({e})")))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
        };
        store.prepare(create)?;
        Ok(store)
    }

    fn prepare(&mut self, writable: bool) -> Result<()> {
        let path = self.path.clone();
        let bad = |e: rusqlite::Error| {
            store_error(
                &path,
                format!("not a portwatch history database, or a damaged one ({e}); move it away and ingest again"),
            )
        };
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(bad)?;
        let tables: i64 = self
            .conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .map_err(bad)?;
        if version == 0 && tables == 0 {
            if !writable {
                return Err(store_error(&path, "an empty database: ingest records first"));
            }
            self.conn
                .execute_batch(
                    "PRAGMA journal_mode = WAL;
                     BEGIN;
                     CREATE TABLE records (id TEXT PRIMARY KEY, time INTEGER NOT NULL, rows INTEGER NOT NULL,
                         bytes INTEGER NOT NULL, packets INTEGER NOT NULL) WITHOUT ROWID;
                     CREATE TABLE files (path TEXT PRIMARY KEY, dev INTEGER NOT NULL, ino INTEGER NOT NULL,
                         offset INTEGER NOT NULL, head INTEGER NOT NULL) WITHOUT ROWID;
                     CREATE TABLE traffic (gran INTEGER NOT NULL, bucket INTEGER NOT NULL, port INTEGER NOT NULL,
                         proto INTEGER NOT NULL, direction INTEGER NOT NULL, kind INTEGER NOT NULL,
                         remote TEXT NOT NULL, bytes INTEGER NOT NULL, packets INTEGER NOT NULL,
                         PRIMARY KEY (gran, bucket, port, proto, direction, kind, remote)) WITHOUT ROWID;
                     PRAGMA user_version = 1;
                     COMMIT;",
                )
                .map_err(bad)?;
        } else if version != SCHEMA_VERSION {
            return Err(store_error(
                &path,
                format!(
                    "history database of schema version {version}; this portwatch reads version \
                     {SCHEMA_VERSION}: use the portwatch that wrote it, or move it away and ingest again"
                ),
            ));
        } else {
            // A database of this version must have its tables (a damaged one is refused here).
            self.conn
                .query_row("SELECT count(*) FROM records", [], |r| r.get::<_, i64>(0))
                .map_err(bad)?;
        }
        // Durable against a crash of the process (the transaction is in the WAL); a power loss may
        // lose the last ingest, which the next one redoes.
        self.conn.pragma_update(None, "synchronous", "NORMAL").map_err(bad)?;
        Ok(())
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Ingests the records of `path` not in the store yet, in one transaction.
    pub(crate) fn ingest(&mut self, path: &Path, settings: &Settings) -> Result<Ingested> {
        let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let key = key.to_string_lossy().into_owned();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let resume: Option<Resume> = tx
            .query_row(
                "SELECT dev, ino, offset, head FROM files WHERE path = ?1",
                [&key],
                |r| {
                    Ok(Resume {
                        dev: r.get::<_, i64>(0)? as u64,
                        ino: r.get::<_, i64>(1)? as u64,
                        offset: r.get::<_, i64>(2)? as u64,
                        head: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
            .optional()?;
        let mut file = RecordFile::open(path, resume)?;
        let mut done = Ingested::default();
        let mut touched: BTreeSet<(Granularity, i64)> = BTreeSet::new();
        {
            let mut known = tx.prepare_cached("SELECT 1 FROM records WHERE id = ?1")?;
            let mut add_record =
                tx.prepare_cached("INSERT INTO records (id, time, rows, bytes, packets) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            let mut add_row = tx.prepare_cached(
                "INSERT INTO traffic (gran, bucket, port, proto, direction, kind, remote, bytes, packets)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT DO UPDATE SET bytes = bytes + excluded.bytes, packets = packets + excluded.packets",
            )?;
            loop {
                let (offset, line) = match file.next_line()? {
                    Next::Line { offset, line } => (offset, line),
                    Next::Torn => {
                        done.torn = true;
                        break;
                    }
                    Next::End => break,
                };
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let record = ingest::parse(&line, offset).map_err(|e| {
                    Error::History(format!(
                        "{}, byte {offset}: {e}; nothing of this file was ingested",
                        path.display()
                    ))
                })?;
                if known.exists([&record.id])? {
                    done.known += 1;
                    continue;
                }
                let total = record.rows.iter().fold(Counters::default(), |a, (_, c)| a + *c);
                add_record.execute(params![
                    record.id,
                    record.time,
                    record.rows.len() as i64,
                    total.bytes as i64,
                    total.packets as i64
                ])?;
                let rows = rows_of(&record, settings.cap);
                for granularity in Granularity::ALL {
                    let bucket = granularity.bucket(record_instant(record.time));
                    touched.insert((granularity, bucket));
                    for (key, kind, remote, counters) in &rows {
                        add_row.execute(params![
                            granularity as i64,
                            bucket,
                            key.port,
                            key.proto,
                            key.direction as u8,
                            *kind as i64,
                            remote,
                            counters.bytes as i64,
                            counters.packets as i64
                        ])?;
                    }
                }
                done.records += 1;
                done.rows += record.rows.len() as u64;
            }
        }
        for (granularity, bucket) in touched {
            cap_bucket(&tx, granularity, bucket, settings.cap)?;
        }
        if !file.gzip {
            let at = file.resume_point()?;
            tx.execute(
                "INSERT INTO files (path, dev, ino, offset, head) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT DO UPDATE SET dev = excluded.dev, ino = excluded.ino, offset = excluded.offset,
                     head = excluded.head",
                params![key, at.dev as i64, at.ino as i64, at.offset as i64, at.head as i64],
            )?;
        }
        if done.records > 0 {
            expire(&tx, &settings.retention)?;
        }
        tx.commit().context("committing the ingest")?;
        Ok(done)
    }
}

/// The instant a record's traffic is put at: the middle of the 5 minutes before its reset (resets
/// run every 5 minutes; a timer's few seconds of jitter then never moves a record to the next
/// bucket).
pub(crate) fn record_instant(time: i64) -> i64 {
    time - 150
}

/// A row as the store keeps it: its key, its kind and remote as text, its figures.
type Row = (Key, Kind, String, Counters);

/// A record's rows as every granularity's bucket gets them: per port, protocol and direction its
/// `cap` heaviest remotes (by bytes) as rows of their own, the rest summed in the port's `other`
/// row.
fn rows_of(record: &Record, cap: u32) -> Vec<Row> {
    let mut remotes: Vec<(Key, Counters)> = Vec::with_capacity(record.rows.len());
    let mut fixed: Vec<Row> = Vec::new();
    for (key, counters) in &record.rows {
        match key.remote {
            Remote::Ip(_) | Remote::Prefix(_) => remotes.push((*key, *counters)),
            _ => {
                let (kind, remote) = encode(key);
                fixed.push((*key, kind, remote, *counters));
            }
        }
    }
    // Heaviest first within each port.
    remotes.sort_by_key(|(key, counters)| (key.port_key(), std::cmp::Reverse(counters.bytes), *key));
    let mut kept = Vec::with_capacity(remotes.len() + fixed.len());
    let mut run = 0u32;
    let mut last: Option<PortKey> = None;
    for (key, counters) in remotes {
        let port = key.port_key();
        if last != Some(port) {
            run = 0;
            last = Some(port);
        }
        run += 1;
        if run <= cap {
            let (kind, remote) = encode(&key);
            kept.push((key, kind, remote, counters));
        } else {
            let other = Key::any_remote(port);
            match fixed.last_mut() {
                Some((k, Kind::Other, _, c)) if *k == other => *c += counters,
                _ => fixed.push((other, Kind::Other, String::new(), counters)),
            }
        }
    }
    kept.extend(fixed);
    kept
}

/// Folds a bucket's remotes past the `cap` heaviest of their port into the port's `other` row.
fn cap_bucket(tx: &rusqlite::Transaction, granularity: Granularity, bucket: i64, cap: u32) -> Result<()> {
    let over: Vec<(i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT port, proto, direction FROM traffic WHERE gran = ?1 AND bucket = ?2 AND kind <= 1
             GROUP BY port, proto, direction HAVING count(*) > ?3",
        )?
        .query_map(params![granularity as i64, bucket, cap], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (port, proto, direction) in over {
        let folded: Vec<(i64, String, i64, i64)> = tx
            .prepare_cached(
                "SELECT kind, remote, bytes, packets FROM traffic
                 WHERE gran = ?1 AND bucket = ?2 AND port = ?3 AND proto = ?4 AND direction = ?5 AND kind <= 1
                 ORDER BY bytes DESC, kind, remote LIMIT -1 OFFSET ?6",
            )?
            .query_map(params![granularity as i64, bucket, port, proto, direction, cap], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let (mut bytes, mut packets) = (0i64, 0i64);
        let mut delete = tx.prepare_cached(
            "DELETE FROM traffic WHERE gran = ?1 AND bucket = ?2 AND port = ?3 AND proto = ?4 AND direction = ?5
             AND kind = ?6 AND remote = ?7",
        )?;
        for (kind, remote, b, p) in folded {
            delete.execute(params![
                granularity as i64,
                bucket,
                port,
                proto,
                direction,
                kind,
                remote
            ])?;
            bytes += b;
            packets += p;
        }
        tx.prepare_cached(
            "INSERT INTO traffic (gran, bucket, port, proto, direction, kind, remote, bytes, packets)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, '', ?7, ?8)
             ON CONFLICT DO UPDATE SET bytes = bytes + excluded.bytes, packets = packets + excluded.packets",
        )?
        .execute(params![
            granularity as i64,
            bucket,
            port,
            proto,
            direction,
            Kind::Other as i64,
            bytes,
            packets
        ])?;
    }
    Ok(())
}

/// Removes the buckets older than their retention, counted back from the newest record.
fn expire(tx: &rusqlite::Transaction, retention: &Retention) -> Result<()> {
    let newest: Option<i64> = tx.query_row("SELECT max(time) FROM records", [], |r| r.get(0))?;
    let Some(newest) = newest else { return Ok(()) };
    let newest = record_instant(newest);
    for granularity in Granularity::ALL {
        if let Some(keep) = retention.of(granularity) {
            let cutoff = granularity.bucket(newest - keep.as_secs() as i64);
            tx.prepare_cached("DELETE FROM traffic WHERE gran = ?1 AND bucket < ?2")?
                .execute(params![granularity as i64, cutoff])?;
        }
    }
    Ok(())
}

/// The `history:` section of the configuration file `--config` names, when the file exists.
pub(crate) fn configured(args: &crate::cli::StoreArgs) -> Result<HistoryConfig> {
    if !args.config.exists() {
        return Ok(HistoryConfig::default());
    }
    Ok(crate::config::FileConfig::read(&args.config)?
        .history
        .unwrap_or_default())
}

/// The database `--db` names, else the configuration file's, else `DEFAULT_DB`.
pub(crate) fn db_path(args: &crate::cli::StoreArgs, config: &HistoryConfig) -> PathBuf {
    args.db
        .clone()
        .or_else(|| config.db.clone())
        .unwrap_or_else(|| PathBuf::from(super::DEFAULT_DB))
}

/// The store, to read.
pub(crate) fn open_store(args: &crate::cli::StoreArgs) -> anyhow::Result<Store> {
    Store::open(&db_path(args, &configured(args)?), false)
}
