//! Reading reset records: files of JSON lines as `reset --json` appends them, plain or gzip
//! (logrotate's `compress`), each line one record. A last line without its newline is a record
//! still being written (or cut short by a crash): it is left for the next ingest.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context, Result};
use portwatch_common::{Counters, Direction, PortKey, IPPROTO_TCP, IPPROTO_UDP};
use serde::Deserialize;

use crate::{
    cidr::Cidr,
    generation::{Key, Remote},
    record,
};

/// One reset's record, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    /// `reset_id`, or, for a record without one, `@OFFSET:HASH` (its byte offset in its file and
    /// the FNV-1a hash of its line): the same record read again, or from the rotated copy of its
    /// file, has the same id.
    pub id: String,
    /// When the reset read the counters (Unix time).
    pub time: i64,
    /// Every row: an address, a prefix, a port alone, or the overflow.
    pub rows: Vec<(Key, Counters)>,
}

#[derive(Deserialize)]
struct RecordLine {
    time: i64,
    #[serde(default)]
    reset: bool,
    reset_id: Option<String>,
    rows: Vec<RowLine>,
    #[serde(default)]
    overflow: Option<Figures>,
}

#[derive(Deserialize)]
struct Figures {
    bytes: u64,
    packets: u64,
}

#[derive(Deserialize)]
struct RowLine {
    ip: Option<String>,
    cidr: Option<String>,
    tier: Option<String>,
    port: Option<u16>,
    proto: Option<String>,
    direction: Option<String>,
    bytes: u64,
    packets: u64,
}

/// Parses one line of a record file (`offset`: where it starts in the file, for its id when it has
/// no `reset_id`).
pub(crate) fn parse(line: &[u8], offset: u64) -> Result<Record, String> {
    let parsed: RecordLine =
        serde_json::from_slice(line).map_err(|e| format!("not a reset record (JSON lines of `reset --json`): {e}"))?;
    if !parsed.reset {
        return Err("not a reset record: no \"reset\": true (a `top --json` line?)".into());
    }
    let id = match parsed.reset_id {
        Some(id) if !id.is_empty() => id,
        _ => format!("@{offset}:{:016x}", record::hash(line)),
    };
    let mut rows = Vec::with_capacity(parsed.rows.len() + 1);
    for (i, row) in parsed.rows.iter().enumerate() {
        let key = row_key(row).map_err(|e| format!("row {}: {e}", i + 1))?;
        rows.push((
            key,
            Counters {
                bytes: row.bytes,
                packets: row.packets,
            },
        ));
    }
    if let Some(o) = parsed.overflow.filter(|o| o.bytes != 0 || o.packets != 0) {
        rows.push((
            Key::overflow(Direction::Ingress),
            Counters {
                bytes: o.bytes,
                packets: o.packets,
            },
        ));
    }
    Ok(Record {
        id,
        time: parsed.time,
        rows,
    })
}

fn row_key(row: &RowLine) -> Result<Key, String> {
    let port = row.port.ok_or("no port")?;
    let proto = match row.proto.as_deref() {
        Some("tcp") => IPPROTO_TCP,
        Some("udp") => IPPROTO_UDP,
        other => return Err(format!("proto {other:?}: tcp or udp")),
    };
    let direction = match row.direction.as_deref() {
        Some("ingress") => Direction::Ingress,
        Some("egress") => Direction::Egress,
        other => return Err(format!("direction {other:?}: ingress or egress")),
    };
    let remote = match (&row.ip, &row.cidr, row.tier.as_deref()) {
        (Some(ip), None, None) => {
            let ip: IpAddr = ip.parse().map_err(|_| format!("{ip:?} is not an IP address"))?;
            Remote::Ip(match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            })
        }
        (None, Some(cidr), Some("prefix" | "wide-prefix")) => {
            let cidr: Cidr = cidr.parse()?;
            if cidr.tier().is_none() {
                return Err(format!("{cidr} is no prefix tier's length"));
            }
            Remote::Prefix(cidr)
        }
        (None, None, Some("port")) => return Ok(Key::any_remote(PortKey::new(port, proto, direction))),
        _ => return Err("a row has `ip`, or `cidr` with its `tier`, or `tier`: \"port\"".into()),
    };
    Ok(Key {
        remote,
        port,
        proto,
        direction,
    })
}

/// Where the reading of a plain record file stopped, and what recognises it as the same file:
/// its device and inode, and the hash of its first bytes (up to 4 KiB, never past `offset`). A
/// file replaced by another (rotated, or truncated and rewritten in place by logrotate's
/// `copytruncate`, even one that got the old inode back) is read from its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Resume {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
    pub head: u64,
}

const HEAD_BYTES: u64 = 4096;

/// FNV-1a of the file's first `min(offset, HEAD_BYTES)` bytes, and whether the byte before
/// `offset` ends a line; `None` when the file is shorter than that.
fn head_of(file: &File, offset: u64) -> Result<Option<(u64, bool)>> {
    use std::os::unix::fs::FileExt;
    let len = offset.min(HEAD_BYTES) as usize;
    let mut head = vec![0u8; len];
    if file.read_exact_at(&mut head, 0).is_err() {
        return Ok(None);
    }
    let mut last = [b'\n'];
    if offset > 0 && file.read_exact_at(&mut last, offset - 1).is_err() {
        return Ok(None);
    }
    Ok(Some((record::hash(&head), last[0] == b'\n')))
}

/// A record file, open for reading from an offset.
pub(crate) struct RecordFile {
    lines: Box<dyn BufRead>,
    /// The file itself, for `resume_point`.
    file: File,
    /// Where the next line starts (in the decompressed stream for gzip).
    pub offset: u64,
    pub gzip: bool,
}

/// A line read, and where it started.
pub(crate) enum Next {
    Line {
        offset: u64,
        line: Vec<u8>,
    },
    /// A last line without its newline (being written, or cut short): not a record yet.
    Torn,
    End,
}

impl RecordFile {
    /// Opens `path`; a plain file is read from `resume` (where the last ingest stopped) when it is
    /// still the same file, a gzip file from its start.
    pub(crate) fn open(path: &Path, resume: Option<Resume>) -> Result<RecordFile> {
        use std::os::unix::fs::MetadataExt;
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            anyhow::bail!("{} is not a regular file", path.display());
        }
        let mut magic = [0u8; 2];
        let gzip = file.read(&mut magic)? == 2 && magic == [0x1f, 0x8b];
        file.seek(SeekFrom::Start(0))?;
        let reader = file.try_clone()?;
        if gzip {
            let lines = BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(reader));
            return Ok(RecordFile {
                lines: Box::new(lines),
                file,
                offset: 0,
                gzip,
            });
        }
        let offset = match resume {
            Some(r)
                if (r.dev, r.ino) == (meta.dev(), meta.ino())
                    && r.offset <= meta.len()
                    && head_of(&file, r.offset)? == Some((r.head, true)) =>
            {
                r.offset
            }
            _ => 0,
        };
        let mut reader = reader;
        reader.seek(SeekFrom::Start(offset))?;
        Ok(RecordFile {
            lines: Box::new(BufReader::with_capacity(1 << 20, reader)),
            file,
            offset,
            gzip,
        })
    }

    /// Where the next ingest of this (plain) file starts: after the last whole line read.
    pub(crate) fn resume_point(&self) -> Result<Resume> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata()?;
        let (head, _) = head_of(&self.file, self.offset)?.context("the record file shrank while it was read")?;
        Ok(Resume {
            dev: meta.dev(),
            ino: meta.ino(),
            offset: self.offset,
            head,
        })
    }

    pub(crate) fn next_line(&mut self) -> Result<Next> {
        let mut line = Vec::new();
        let n = self
            .lines
            .read_until(b'\n', &mut line)
            .context("reading the record file")?;
        let offset = self.offset;
        if n == 0 {
            return Ok(Next::End);
        }
        if line.last() != Some(&b'\n') {
            return Ok(Next::Torn);
        }
        self.offset += n as u64;
        line.pop();
        Ok(Next::Line { offset, line })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_row() {
        let line = br#"{"time":1795890761,"reset":true,"reset_id":"00000000000000ab","rows":[{"ip":"198.18.0.7","port":443,"proto":"tcp","direction":"ingress","bytes":100,"packets":2},{"cidr":"198.51.100.0/24","tier":"prefix","port":443,"proto":"udp","direction":"egress","bytes":10,"packets":1},{"tier":"port","port":53,"proto":"udp","direction":"ingress","bytes":5,"packets":1}],"totals":{"bytes":120,"packets":5},"overflow":{"bytes":5,"packets":1}}"#;
        let r = parse(line, 0).unwrap();
        assert_eq!(r.id, "00000000000000ab");
        assert_eq!(r.time, 1795890761);
        assert_eq!(r.rows.len(), 4);
        assert_eq!(r.rows[0].0.port, 443);
        assert!(matches!(r.rows[1].0.remote, Remote::Prefix(_)));
        assert_eq!(r.rows[2].0.remote, Remote::AnyRemote);
        assert!(r.rows[3].0.is_overflow());
    }

    #[test]
    fn no_reset_id_is_keyed_by_offset_and_hash() {
        let line = br#"{"time":1,"reset":true,"rows":[]}"#;
        let a = parse(line, 10).unwrap();
        assert!(a.id.starts_with("@10:"));
        assert_ne!(a.id, parse(line, 11).unwrap().id);
    }

    #[test]
    fn not_a_record() {
        assert!(parse(b"{\"time\":1,\"rows\":[]}", 0)
            .unwrap_err()
            .contains("top --json"));
        assert!(parse(b"hello", 0).is_err());
        assert!(parse(br#"{"time":1,"reset":true,"rows":[{"ip":"x","port":1,"proto":"tcp","direction":"ingress","bytes":1,"packets":1}]}"#, 0).is_err());
    }
}
