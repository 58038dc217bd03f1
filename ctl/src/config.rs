//! The configuration file (`portwatch.yaml`): the state `apply` makes the pinned state match, and
//! what `config show` writes. Parsed with serde into typed structs that refuse unknown fields; an
//! error names the file, line and column. Everything is checked (the file, every field, every
//! interface and network namespace) before any kernel state is touched.
//! `examples/portwatch.yaml` is the annotated reference.

use std::{
    fmt,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use portwatch_common::{Direction, Directions, TierSizes, DEFAULT_MAX_ENTRIES, MAX_ENTRIES_LIMIT, PROTO_ALL};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    attach::{Iface, Mode},
    error::Error,
    netns::NetNs,
    pinned::{PinPath, Pinned, DEFAULT_PIN_PATH},
    ports::{self, PortSpec},
};

/// A larger file is refused: a configuration is a few lines.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The file, as written.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    /// Where the programs, links and maps are pinned (on bpffs); none: `--pin-path`, or its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_path: Option<PathBuf>,
    /// Remote-IP keys each per-IP map holds.
    #[serde(default = "default_max_entries", deserialize_with = "max_entries")]
    pub max_entries: u32,
    /// Keys of the prefix tier (a remote's /24 or /48 past the per-IP map); none: derived from
    /// `max_entries`.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some_entries")]
    pub prefix_entries: Option<u32>,
    /// Keys of the wide prefix tier (a remote's /16 or /32); none: derived from `max_entries`.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some_entries")]
    pub wide_prefix_entries: Option<u32>,
    /// The directions of the program set, and of every interface that does not say.
    #[serde(
        default = "both",
        serialize_with = "serialize_directions",
        deserialize_with = "deserialize_directions"
    )]
    pub direction: Directions,
    /// Port SPECs, as the command line takes them.
    #[serde(default)]
    pub ports: Vec<Spec>,
    #[serde(default)]
    pub interfaces: Vec<InterfaceConfig>,
    /// The history store (`history ingest`, `history`, `history top`); `apply` ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryConfig>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InterfaceConfig {
    pub name: String,
    /// An `ip netns` name or a path (`/proc/PID/ns/net`); none: the namespace portwatch runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Directions to count on it; none: the file's `direction`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_maybe_directions",
        deserialize_with = "deserialize_maybe_directions"
    )]
    pub direction: Option<Directions>,
    #[serde(default, skip_serializing_if = "Mode::is_auto")]
    pub mode: Mode,
}

fn default_max_entries() -> u32 {
    DEFAULT_MAX_ENTRIES
}

fn both() -> Directions {
    Directions::BOTH
}

// The `history:` section (the store's own types are `history`'s).
/// The `history:` section of portwatch.yaml.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryConfig {
    /// The database; none: /var/lib/portwatch/history.db.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionConfig>,
    /// Remotes kept per bucket and port; none: 1,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u32>,
}

/// Durations as `humantime` reads them (`48h`, `35days`), or `forever`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetentionConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub five_minutes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub months: Option<String>,
}

/// `48h`, `35d`, `forever`.
pub(crate) fn parse_keep(text: &str) -> Result<Option<Duration>, String> {
    if text.trim() == "forever" {
        return Ok(None);
    }
    humantime::parse_duration(text.trim())
        .map(Some)
        .map_err(|e| format!("{text:?} is not a duration such as 48h, 35d or forever ({e})"))
}

impl RetentionConfig {
    /// Per granularity (5 minutes, hours, days, months), what the file sets: `None` when it does
    /// not, `Some(None)` for `forever`.
    #[allow(clippy::type_complexity)]
    pub(crate) fn durations(&self) -> Result<[Option<Option<Duration>>; 4], String> {
        let mut out = [None; 4];
        for (i, value) in [&self.five_minutes, &self.hours, &self.days, &self.months]
            .into_iter()
            .enumerate()
        {
            if let Some(text) = value {
                out[i] = Some(parse_keep(text)?);
            }
        }
        Ok(out)
    }
}

/// Checked in the visitor, where serde_yaml still knows the value's line and column.
fn max_entries<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = u32;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a number of entries from 1 to {MAX_ENTRIES_LIMIT}")
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<u32, E> {
            match u32::try_from(n) {
                Ok(n) if (1..=MAX_ENTRIES_LIMIT).contains(&n) => Ok(n),
                _ => Err(E::custom(format!("{n} is not from 1 to {MAX_ENTRIES_LIMIT}"))),
            }
        }
    }
    d.deserialize_u64(Visitor)
}

fn some_entries<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    max_entries(d).map(Some)
}

/// `ingress`, `egress` or `both`, as `--direction` takes them; as a derived enum, so that
/// serde_yaml places an error at the value.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum DirectionsWord {
    Ingress,
    Egress,
    Both,
}

impl From<DirectionsWord> for Directions {
    fn from(word: DirectionsWord) -> Directions {
        match word {
            DirectionsWord::Ingress => Direction::Ingress.into(),
            DirectionsWord::Egress => Direction::Egress.into(),
            DirectionsWord::Both => Directions::BOTH,
        }
    }
}

fn serialize_directions<S: Serializer>(d: &Directions, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

fn deserialize_directions<'de, D: Deserializer<'de>>(d: D) -> Result<Directions, D::Error> {
    DirectionsWord::deserialize(d).map(Directions::from)
}

fn serialize_maybe_directions<S: Serializer>(d: &Option<Directions>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => serialize_directions(d, s),
        None => s.serialize_none(),
    }
}

fn deserialize_maybe_directions<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Directions>, D::Error> {
    deserialize_directions(d).map(Some)
}

/// A port SPEC in the file: `443` (a YAML number) or `"53/udp"`, `8000-8100/tcp`, `https`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Spec(pub PortSpec);

impl<'de> Deserialize<'de> for Spec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Spec, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Spec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port SPEC: 443, 53/udp, 8000-8100/tcp, https")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Spec, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Spec, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Spec, E> {
                v.parse().map(Spec).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A plain port as a number, anything else as its SPEC text.
impl Serialize for Spec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let spec = self.0;
        if spec.first == spec.last && spec.protocols == PROTO_ALL {
            s.serialize_u16(spec.first)
        } else {
            s.serialize_str(&spec.to_string())
        }
    }
}

/// The state a file asks for, checked against the machine: every interface found in its network
/// namespace.
pub(crate) struct Desired {
    pub pin: PinPath,
    pub sizes: TierSizes,
    pub directions: Directions,
    /// One flags byte per port, as the `watched_ports` map holds them.
    pub port_table: Vec<u8>,
    pub attachments: Vec<Wanted>,
}

/// One program on one interface.
#[derive(Clone, Debug)]
pub(crate) struct Wanted {
    pub iface: Iface,
    pub direction: Direction,
    pub mode: Mode,
}

impl Desired {
    /// The state `file` asks for: the file read and checked, the pin path (the file's, or `cli`'s)
    /// on bpffs, every interface found. Nothing of the kernel's is touched before.
    pub(crate) fn from_file(cli: &PinPath, file: &Path) -> Result<Desired> {
        let config = FileConfig::read(file)?;
        let pin = config.pin(cli, file)?;
        crate::pinned::ensure_bpffs(&pin)?;
        config.desired(pin, file)
    }
}

impl FileConfig {
    /// Reads and parses `path`, refusing what is not a configuration file of root's.
    pub(crate) fn read(path: &Path) -> Result<FileConfig> {
        let text = read_checked(path)?;
        FileConfig::parse(&text, path)
    }

    pub(crate) fn parse(text: &str, path: &Path) -> Result<FileConfig> {
        let refuse = |what: String| Error::Config(format!("{}: {what}", path.display()));
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Err(refuse("holds no configuration (see examples/portwatch.yaml)".into()).into());
        }
        serde_yaml::from_str(text)
            .map_err(|e| {
                let message = e.to_string();
                match e.location() {
                    Some(at) => {
                        // The position leads the line; serde_yaml also writes it into the message.
                        let message = message.replace(&format!(" at line {} column {}", at.line(), at.column()), "");
                        Error::Config(format!("{}:{}:{}: {message}", path.display(), at.line(), at.column()))
                    }
                    None => refuse(message),
                }
                .into()
            })
            .and_then(|config: FileConfig| {
                if let Some(retention) = config.history.as_ref().and_then(|h| h.retention.as_ref()) {
                    retention
                        .durations()
                        .map_err(|e| refuse(format!("history.retention: {e}")))?;
                }
                Ok(config)
            })
    }

    /// The pin path: the file's, or `cli`'s (`--pin-path`, `PORTWATCH_PIN_PATH`, or the default)
    /// when the file gives none. Both, and different: refused.
    pub(crate) fn pin(&self, cli: &PinPath, path: &Path) -> Result<PinPath> {
        match &self.pin_path {
            None => Ok(cli.clone()),
            Some(own) if *own == cli.root || cli.root == Path::new(DEFAULT_PIN_PATH) => Ok(PinPath::new(own)),
            Some(own) => Err(Error::Config(format!(
                "{}: pin_path {} and --pin-path (or PORTWATCH_PIN_PATH) {} differ: give one",
                path.display(),
                own.display(),
                cli.root.display()
            ))
            .into()),
        }
    }

    /// Checks the file against the machine (every network namespace and interface exists, none is
    /// listed twice), without touching any kernel state.
    pub(crate) fn desired(&self, pin: PinPath, path: &Path) -> Result<Desired> {
        let refuse = |what: String| -> anyhow::Error { Error::Config(format!("{}: {what}", path.display())).into() };
        let mut port_table = vec![0u8; portwatch_common::PORT_COUNT as usize];
        ports::add(&mut port_table, &self.ports.iter().map(|s| s.0).collect::<Vec<_>>());
        let mut attachments: Vec<Wanted> = vec![];
        let mut seen = std::collections::BTreeSet::new();
        for (n, i) in self.interfaces.iter().enumerate() {
            let at = || format!("{}: interfaces[{n}]", path.display());
            let netns = NetNs::from_arg(i.netns.as_deref()).with_context(at)?;
            let iface = Iface::resolve(&i.name, &netns).with_context(at)?;
            if !seen.insert((netns.inode, iface.index)) {
                return Err(refuse(format!(
                    "interface {}{} is listed twice",
                    i.name,
                    netns.suffix()
                )));
            }
            for direction in i.direction.unwrap_or(self.direction).iter() {
                attachments.push(Wanted {
                    iface: iface.clone(),
                    direction,
                    mode: i.mode,
                });
            }
        }
        let derived = TierSizes::derived(self.max_entries);
        Ok(Desired {
            pin,
            sizes: TierSizes {
                prefix: self.prefix_entries.unwrap_or(derived.prefix),
                wide_prefix: self.wide_prefix_entries.unwrap_or(derived.wide_prefix),
                ..derived
            },
            directions: self.direction,
            port_table,
            attachments,
        })
    }

    /// The file `config show` writes: YAML with a comment on top.
    pub(crate) fn to_yaml(&self) -> String {
        let body = serde_yaml::to_string(self).expect("a configuration always serializes");
        format!(
            "# portwatch's pinned state, as `portwatch config show` wrote it: `portwatch apply -f` takes\n\
             # it, and then finds nothing to change (see examples/portwatch.yaml for every field).\n{body}"
        )
    }

    /// The pinned state as a file: what `apply` would make again. Attachments whose interface (or
    /// network namespace) is gone are left out: `apply` cannot attach there, and removes them.
    pub(crate) fn of_pinned(pinned: &mut Pinned) -> Result<FileConfig> {
        let table = crate::maps::port_table(pinned.watched_ports()?)?;
        let directions = pinned.meta.directions();
        // Per interface (network namespace as recorded, current name): directions and modes.
        let mut by_iface: std::collections::BTreeMap<(String, String), (Directions, Vec<Mode>)> = Default::default();
        for entry in pinned.attachments()?.iter() {
            let (key, record) = entry?;
            let Some(name) = crate::attach::current_name(&key, &record) else {
                continue;
            };
            let slot = by_iface
                .entry((crate::attach::recorded_netns(&record), name))
                .or_insert((Directions::default(), vec![]));
            slot.0 = Directions::from_bits(slot.0.bits() | key.direction().bit());
            slot.1.push(Mode::from(record.mode()));
        }
        let interfaces = by_iface
            .into_iter()
            .map(|((netns, name), (dirs, modes))| InterfaceConfig {
                name,
                netns: (!netns.is_empty()).then_some(netns),
                direction: (dirs != directions).then_some(dirs),
                // Both directions made alike: that mode; otherwise either (auto) keeps them.
                mode: if modes.windows(2).all(|w| w[0] == w[1]) {
                    modes[0]
                } else {
                    Mode::Auto
                },
            })
            .collect();
        let sizes = pinned.meta.sizes();
        let derived = TierSizes::derived(sizes.ip);
        Ok(FileConfig {
            pin_path: Some(pinned.pin.root.clone()),
            max_entries: sizes.ip,
            // Written only when they are not what `max_entries` makes them.
            prefix_entries: (sizes.prefix != derived.prefix).then_some(sizes.prefix),
            wide_prefix_entries: (sizes.wide_prefix != derived.wide_prefix).then_some(sizes.wide_prefix),
            direction: directions,
            ports: ports::fold(&table).into_iter().map(Spec).collect(),
            interfaces,
            history: None,
        })
    }
}

/// The file's text, if it is one: a regular file of at most 1 MiB, text, not empty, that no user
/// but root can change.
fn read_checked(path: &Path) -> Result<String> {
    let refuse = |what: String| -> anyhow::Error { Error::Config(format!("{}: {what}", path.display())).into() };
    let meta = std::fs::metadata(path).map_err(|e| refuse(format!("cannot read it ({e})")))?;
    if meta.is_dir() {
        return Err(refuse("is a directory, not a configuration file".into()));
    }
    if !meta.is_file() {
        return Err(refuse("is not a regular file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(refuse(format!(
            "is {} bytes; a configuration file is at most 1 MiB",
            meta.len()
        )));
    }
    if meta.len() == 0 {
        return Err(refuse("is empty (see examples/portwatch.yaml)".into()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(refuse(format!(
            "can be changed by users other than root (mode {:o}): `chmod go-w {}`",
            mode & 0o7777,
            path.display()
        )));
    }
    if meta.uid() != 0 && mode & 0o200 != 0 {
        return Err(refuse(format!(
            "belongs to uid {}, who can change it: `chown root {}`",
            meta.uid(),
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| refuse(format!("cannot read it ({e})")))?;
    match String::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => Ok(text),
        _ => Err(refuse("is not text (a binary file?)".into())),
    }
}
