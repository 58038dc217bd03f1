//! The pinned reset journal (`maps/journal`, `maps/journal_entries`): what a reset in progress has
//! done, so that the next command that takes the lock can finish or roll back one that a crash
//! interrupted. The protocol that writes it is `reset`; this is its storage.

use std::{os::fd::AsFd, path::PathBuf};

use anyhow::{Context, Result};
use aya::maps::IterableMap;
use portwatch_common::{
    CounterKey, Counters, Direction, Journal, JournalKey, JournalKind, JournalState, PortKey, Tier, JOURNAL_FILTER_LEN,
    JOURNAL_OUTPUT_FILE, JOURNAL_PATH_LEN,
};

use crate::{filter::Filter, generation::Key, pinned::Pinned};

pub(crate) fn read(pinned: &mut Pinned) -> Result<Journal> {
    pinned.journal()?.get(&0, 0).context("reading the reset journal")
}

pub(crate) fn state(journal: &Journal) -> Result<JournalState> {
    JournalState::from_u32(journal.state)
        .with_context(|| format!("the reset journal is in an unknown state ({})", journal.state))
}

/// Moves the journal to `state` (one map update: atomic).
pub(crate) fn set_state(pinned: &mut Pinned, journal: &mut Journal, state: JournalState) -> Result<()> {
    journal.state = state as u32;
    pinned
        .journal()?
        .set(0, *journal, 0)
        .with_context(|| format!("writing the reset journal ({})", state.name()))
}

/// The output file a journal names, if it names one.
pub(crate) fn path(journal: &Journal) -> Option<PathBuf> {
    (journal.output_kind == JOURNAL_OUTPUT_FILE).then(|| {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(std::ffi::OsStr::from_bytes(until_nul(&journal.path)))
    })
}

pub(crate) fn set_path(journal: &mut Journal, path: &std::path::Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    anyhow::ensure!(
        bytes.len() < JOURNAL_PATH_LEN,
        "{}: a reset's output path is at most {} bytes",
        path.display(),
        JOURNAL_PATH_LEN - 1
    );
    journal.path = [0; JOURNAL_PATH_LEN];
    journal.path[..bytes.len()].copy_from_slice(bytes);
    journal.output_kind = JOURNAL_OUTPUT_FILE;
    Ok(())
}

fn until_nul(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())]
}

/// The reset's selection as text (`port=443/tcp ip=198.18.0.0/15 direction=ingress`), so that
/// recovery removes exactly what the reset selected.
pub(crate) fn set_filter(journal: &mut Journal, filter: &Filter) -> Result<()> {
    let mut words: Vec<String> = filter.ports.iter().map(|p| format!("port={p}")).collect();
    words.extend(filter.cidrs.iter().map(|c| format!("ip={c}")));
    words.extend(filter.direction.map(|d| format!("direction={}", d.name())));
    let text = words.join(" ");
    anyhow::ensure!(
        text.len() < JOURNAL_FILTER_LEN,
        "a reset selects at most {} bytes of --port and --ip (this one: {})",
        JOURNAL_FILTER_LEN - 1,
        text.len()
    );
    journal.filter = [0; JOURNAL_FILTER_LEN];
    journal.filter[..text.len()].copy_from_slice(text.as_bytes());
    Ok(())
}

pub(crate) fn filter(journal: &Journal) -> Result<Filter> {
    let text = std::str::from_utf8(until_nul(&journal.filter)).context("the reset journal's filter")?;
    let mut filter = Filter::default();
    for word in text.split_whitespace() {
        let bad = || anyhow::anyhow!("the reset journal's filter has {word:?}");
        match word.split_once('=').ok_or_else(bad)? {
            ("port", spec) => filter.ports.push(spec.parse().map_err(|_| bad())?),
            ("ip", cidr) => filter.cidrs.push(cidr.parse().map_err(|_| bad())?),
            ("direction", d) => {
                filter.direction = Some(Direction::ALL.into_iter().find(|x| x.name() == d).ok_or_else(bad)?)
            }
            _ => return Err(bad()),
        }
    }
    Ok(filter)
}

/// An entry's key in `journal_entries`: a count's key (`Stale`, `Subtract`) or a port's
/// (`Drained`), as bpffs-layout.md lays them out. The one place that encodes and decodes them.
trait Entry: Copy {
    fn encode(&self, kind: JournalKind) -> JournalKey;
    fn decode(key: &JournalKey) -> Self;
}

/// A count's key with the tier whose map it is in (the overflow key is the per-IP map's).
impl Entry for Key {
    fn encode(&self, kind: JournalKind) -> JournalKey {
        JournalKey::new(kind, self.tier().unwrap_or(Tier::Ip), self.counter_key())
    }
    fn decode(key: &JournalKey) -> Key {
        Key::of_tier(Tier::from_u8(key.tier).unwrap_or(Tier::Ip), key.key)
    }
}

/// A port's drained total: its port, protocol and direction in the key's fields, no address.
impl Entry for PortKey {
    fn encode(&self, kind: JournalKind) -> JournalKey {
        let key = CounterKey {
            remote_ip: [0; 4],
            port: self.port,
            proto: self.proto,
            direction: self.direction,
        };
        JournalKey::new(kind, Tier::Ip, key)
    }
    fn decode(key: &JournalKey) -> PortKey {
        PortKey::of(&key.key)
    }
}

/// Writes `entries` as `kind` (replacing what the journal holds of those keys).
fn put<K: Entry>(pinned: &mut Pinned, kind: JournalKind, entries: &[(K, Counters)]) -> Result<()> {
    let map = pinned.journal_entries()?;
    let keys: Vec<JournalKey> = entries.iter().map(|(k, _)| k.encode(kind)).collect();
    let values: Vec<Counters> = entries.iter().map(|(_, v)| *v).collect();
    match crate::sys::bpf::update_batch(map.map().fd().as_fd(), &keys, &values) {
        Ok(()) => Ok(()),
        Err(e) if crate::sys::bpf::batch_unsupported(&e) => keys
            .iter()
            .zip(values)
            .try_for_each(|(key, value)| map.insert(key, value, 0))
            .context("writing the reset journal"),
        Err(e) => Err(e).context("writing the reset journal"),
    }
}

/// The journal's entries of `kind`, sorted by key.
fn get<K: Entry + Ord>(pinned: &mut Pinned, kind: JournalKind) -> Result<Vec<(K, Counters)>> {
    let mut out = vec![];
    for entry in pinned.journal_entries()?.iter() {
        let (key, value) = entry.context("reading the reset journal")?;
        if key.kind == kind as u8 {
            out.push((K::decode(&key), value));
        }
    }
    out.sort_by_key(|(k, _)| *k);
    Ok(out)
}

/// Writes counts as `Stale` or `Subtract` entries.
pub(crate) fn put_counts(pinned: &mut Pinned, kind: JournalKind, entries: &[(Key, Counters)]) -> Result<()> {
    debug_assert!(kind != JournalKind::Drained, "drained totals are ports' (put_drained)");
    put(pinned, kind, entries)
}

/// The `Stale` or `Subtract` entries.
pub(crate) fn counts(pinned: &mut Pinned, kind: JournalKind) -> Result<Vec<(Key, Counters)>> {
    get(pinned, kind)
}

/// Writes the drained totals the reset will set once committed.
pub(crate) fn put_drained(pinned: &mut Pinned, totals: &[(PortKey, Counters)]) -> Result<()> {
    put(pinned, JournalKind::Drained, totals)
}

/// The drained totals journaled.
pub(crate) fn drained(pinned: &mut Pinned) -> Result<Vec<(PortKey, Counters)>> {
    get(pinned, JournalKind::Drained)
}

/// Empties `journal_entries` (left over by a reset that ended, or by one rolled back).
pub(crate) fn clear(pinned: &mut Pinned) -> Result<()> {
    let map = pinned.journal_entries()?;
    let keys: Vec<JournalKey> = map
        .keys()
        .collect::<Result<_, _>>()
        .context("reading the reset journal")?;
    crate::sys::bpf::remove_all_if_present(map.map().fd().as_fd(), &keys).context("emptying the reset journal")
}

/// A fresh reset id: 64 random bits (never 0), printed as 16 hex digits.
pub(crate) fn new_id() -> u64 {
    let id = crate::sys::random_u64().unwrap_or_else(|| {
        // No getrandom: the time in nanoseconds and the process id.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (now.as_nanos() as u64) ^ ((std::process::id() as u64) << 40)
    });
    id.max(1)
}

pub(crate) fn id_text(id: u64) -> String {
    format!("{id:016x}")
}
