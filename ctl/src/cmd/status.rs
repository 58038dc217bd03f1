//! `portwatch status`: loaded or not, the programs, each attachment, the watched ports, how full
//! the counter map is, and the global statistics. One typed `Status` is built, then printed as
//! JSON or for a person.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Result;
use portwatch_common::{
    AttachMode, Counters, Direction, JournalState, NotCounted, PortKey, Stats, Tier, ATTACH_FLAG_PENDING,
    LAYOUT_VERSION,
};
use serde::{Serialize, Serializer};

use crate::{
    attach::{self, Live, Observed},
    error::Error,
    journal, lifecycle, maps,
    memory::{self, MapMemory},
    output::{self, human_bytes},
    pinned::{Access, PinPath, Pinned},
    ports::{self, PortSpec},
};

// The fields of each struct are in alphabetical order: the order `status --json` has always
// printed them in.

/// `status --json` when nothing is loaded.
#[derive(Serialize)]
struct NotLoaded<'a> {
    loaded: bool,
    pin_path: &'a PathBuf,
}

#[derive(Serialize)]
struct Status {
    attachments: Vec<AttachmentStatus>,
    counters: CounterUse,
    /// The directions `load` was given: `ingress`, `egress` or `both`.
    direction: &'static str,
    layout_version: u32,
    loaded: bool,
    /// The kernel memory of every pinned map, as the kernel counts it (`memlock` in each map's
    /// fdinfo, what `bpftool map show` prints), in bytes.
    maps_memory_bytes: MapMemory,
    pin_path: PathBuf,
    programs: Vec<ProgramStatus>,
    /// A reset that was interrupted (a crash, SIGKILL) and waits for the next command that takes
    /// the lock to finish it or roll it back; `null` when there is none.
    reset_interrupted: Option<InterruptedReset>,
    stats: StatsStatus,
    watched_ports: Vec<PortSpec>,
}

#[derive(Serialize)]
struct InterruptedReset {
    /// The reset's id (`reset_id` in its record).
    id: String,
    /// The file its record went to (`null`: stdout, a pipe or a terminal).
    output: Option<PathBuf>,
    /// Where it stopped (`bpffs-layout.md`, "Reset"): `prepared`, `writing`, `written` (rolled back,
    /// or forward when the file holds its whole record), `committed`, `deleted`, `subtracting`
    /// (finished).
    state: &'static str,
    /// Unix time it began.
    time: u64,
}

#[derive(Serialize)]
struct AttachmentStatus {
    /// Whether the kernel has it: the TCX link pinned, or the tc filter on the interface with
    /// this program (false: recorded only; `detach` removes the record).
    attached: bool,
    #[serde(serialize_with = "direction_name")]
    direction: Direction,
    ifindex: u32,
    /// Its name now, or the name recorded at attach time if it has vanished.
    interface: String,
    link_id: Option<u32>,
    /// `tcx`, `tc`, or `pending`.
    #[serde(serialize_with = "mode_as_str")]
    mode: AttachMode,
    /// The network namespace as it was given (`--netns`); `None`: the one portwatch ran in.
    netns: Option<String>,
    /// An `attach` was interrupted between recording it and making it: the next command that
    /// takes the lock completes or removes the record, as the kernel says.
    pending: bool,
    /// Whether the interface still exists.
    present: bool,
    tc_handle: Option<String>,
    tc_priority: Option<u16>,
}

#[derive(Serialize)]
struct ProgramStatus {
    #[serde(serialize_with = "direction_name")]
    direction: Direction,
    id: u32,
    tag: String,
}

#[derive(Serialize)]
struct CounterUse {
    /// Remote-IP keys in the active generation (the overflow keys not included).
    entries: usize,
    generation: u32,
    max_entries: u32,
    /// Per port, protocol and direction, what was counted since the last reset, every tier's
    /// counts added: exact whatever the tiers held.
    ports: Vec<PortUse>,
    /// The distinct remote addresses counted past the per-IP map since the last reset, estimated,
    /// per port, protocol and direction.
    sources: Vec<SourceUse>,
    /// The estimates' standard error (a fraction: 0.016 is 1.6%).
    sources_standard_error: f64,
    /// Every tier: its keys in the active generation, its size, and what it counted since the last
    /// reset (both generations).
    tiers: Vec<TierUse>,
    /// Counted under the overflow key since the last reset: no tier had room (never in normal
    /// operation).
    unattributed: Figures,
}

#[derive(Serialize)]
struct TierUse {
    bytes: u64,
    entries: usize,
    /// `null` for the per-port overflow, which holds every port.
    max_entries: Option<u32>,
    packets: u64,
    /// `ip`, `prefix`, `wide-prefix` or `port`.
    tier: &'static str,
}

#[derive(Serialize)]
struct PortUse {
    bytes: u64,
    #[serde(serialize_with = "direction_name")]
    direction: Direction,
    packets: u64,
    port: u16,
    proto: &'static str,
}

#[derive(Serialize)]
struct SourceUse {
    #[serde(serialize_with = "direction_name")]
    direction: Direction,
    estimate: u64,
    port: u16,
    proto: &'static str,
}

#[derive(Serialize, Default)]
struct Figures {
    bytes: u64,
    packets: u64,
}

#[derive(Serialize)]
struct StatsStatus {
    map_full_bytes: u64,
    map_full_packets: u64,
    matched_bytes: u64,
    matched_packets: u64,
    not_counted: NotCountedFigures,
    overflow_missing_packets: u64,
    unwatched_packets: u64,
}

fn direction_name<S: Serializer>(direction: &Direction, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(direction.name())
}

fn mode_as_str<S: Serializer>(mode: &AttachMode, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(mode.name())
}

/// The packets of each `NotCounted` reason: a JSON object keyed by the reasons' names.
struct NotCountedFigures(Stats);

impl Serialize for NotCountedFigures {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let by_name: BTreeMap<&str, u64> = NotCounted::ALL
            .iter()
            .map(|r| (r.name(), self.0.not_counted(*r)))
            .collect();
        by_name.serialize(serializer)
    }
}

impl From<Observed> for AttachmentStatus {
    fn from(seen: Observed) -> AttachmentStatus {
        let Observed {
            key,
            record,
            mode,
            live,
            current_name,
        } = seen;
        let netns = attach::recorded_netns(&record);
        let tc = mode == AttachMode::Tc;
        AttachmentStatus {
            attached: live != Live::Gone,
            direction: key.direction(),
            ifindex: key.ifindex,
            present: current_name.is_some(),
            interface: current_name.unwrap_or_else(|| attach::recorded_name(&record)),
            link_id: match live {
                Live::Link { id } => Some(id),
                Live::Filter { .. } | Live::Gone => None,
            },
            mode,
            netns: (!netns.is_empty()).then_some(netns),
            pending: record.flags & ATTACH_FLAG_PENDING != 0,
            tc_handle: tc.then(|| format!("{:x}", record.handle)),
            tc_priority: tc.then_some(record.priority),
        }
    }
}

impl From<Stats> for StatsStatus {
    fn from(s: Stats) -> StatsStatus {
        StatsStatus {
            map_full_bytes: s.map_full_bytes,
            map_full_packets: s.map_full_packets,
            matched_bytes: s.matched_bytes,
            matched_packets: s.matched_packets,
            not_counted: NotCountedFigures(s),
            overflow_missing_packets: s.overflow_missing_packets,
            unwatched_packets: s.unwatched_packets,
        }
    }
}

pub(super) fn run(pin: &PinPath, as_json: bool) -> Result<()> {
    let missing = lifecycle::missing_pins(pin);
    if pin.is_loaded() && !missing.is_empty() {
        return Err(Error::Conflict(format!(
            "the state pinned at {} is incomplete ({} missing): an unload was interrupted; `portwatch unload` \
             finishes it",
            pin.root.display(),
            missing.join(", ")
        ))
        .into());
    }
    let Some(mut pinned) = Pinned::probe(pin, Access::Read)? else {
        if lifecycle::has_debris(pin) {
            eprintln!(
                "portwatch: {} holds pins that an interrupted load or unload left; the next `portwatch load` or \
                 `unload` removes them",
                pin.root.display()
            );
        }
        if as_json {
            output::print_json(&NotLoaded {
                loaded: false,
                pin_path: &pin.root,
            });
        } else {
            println!("portwatch is not loaded at {}", pin.root.display());
        }
        return Ok(());
    };
    let status = collect(&mut pinned)?;
    if as_json {
        output::print_json(&status);
    } else {
        print_human(&status);
    }
    Ok(())
}

fn collect(pinned: &mut Pinned) -> Result<Status> {
    let pin = pinned.pin.clone();
    let mut programs = vec![];
    for direction in Direction::ALL {
        let info = pinned.program(direction)?.info()?;
        programs.push(ProgramStatus {
            direction,
            id: info.id(),
            tag: format!("{:016x}", info.tag()),
        });
    }
    let mut attachments: Vec<AttachmentStatus> = attach::observe_all(pinned)?.into_iter().map(Into::into).collect();
    attachments.sort_by(|a, b| (&a.netns, &a.interface, a.direction).cmp(&(&b.netns, &b.interface, b.direction)));

    let watched_ports = ports::fold(&maps::port_table(pinned.watched_ports()?)?);
    let generation = pinned.active_generation()?;
    let sizes = pinned.meta.sizes();
    let mut tiers: Vec<TierUse> = Tier::ALL
        .iter()
        .map(|tier| TierUse {
            tier: tier.name(),
            entries: 0,
            max_entries: match tier {
                Tier::Ip => Some(sizes.ip),
                Tier::Prefix => Some(sizes.prefix),
                Tier::WidePrefix => Some(sizes.wide_prefix),
                Tier::Port => None,
            },
            bytes: 0,
            packets: 0,
        })
        .collect();
    let mut unattributed = Figures::default();
    let mut per_port: std::collections::BTreeMap<PortKey, Counters> = Default::default();
    for g in [0, 1] {
        pinned.generation(g)?.for_each(|key, value| {
            let Some(tier) = key.tier() else {
                unattributed.bytes += value.bytes;
                unattributed.packets += value.packets;
                return;
            };
            *per_port.entry(key.port_key()).or_default() += value;
            let t = &mut tiers[tier as usize];
            // A port slot that only holds distinct-source registers is no count.
            t.entries += usize::from(g == generation && value != Counters::default());
            t.bytes += value.bytes;
            t.packets += value.packets;
        })?;
    }
    let entries = tiers[Tier::Ip as usize].entries;
    let ports = per_port
        .into_iter()
        .filter(|(_, c)| *c != Counters::default())
        .map(|(port, c)| PortUse {
            bytes: c.bytes,
            direction: port.direction(),
            packets: c.packets,
            port: port.port,
            proto: output::proto_name(port.proto),
        })
        .collect();
    let sources = pinned
        .sources()?
        .into_iter()
        .map(|(port, sketch)| SourceUse {
            port: port.port,
            proto: output::proto_name(port.proto),
            direction: port.direction(),
            estimate: sketch.estimate(),
        })
        .filter(|s| s.estimate > 0)
        .collect();
    let stats = maps::read_stats(pinned.stats()?)?;
    let j = journal::read(pinned)?;
    let state = journal::state(&j)?;
    let reset_interrupted = (state != JournalState::Idle).then(|| InterruptedReset {
        id: journal::id_text(j.id),
        output: journal::path(&j),
        state: state.name(),
        time: j.time,
    });
    Ok(Status {
        attachments,
        counters: CounterUse {
            entries,
            generation,
            max_entries: pinned.meta.max_entries,
            ports,
            tiers,
            unattributed,
            sources,
            sources_standard_error: crate::sources::STANDARD_ERROR,
        },
        direction: pinned.meta.directions().name(),
        layout_version: LAYOUT_VERSION,
        loaded: true,
        maps_memory_bytes: memory::pinned(&pin)?,
        pin_path: pin.root,
        programs,
        reset_interrupted,
        stats: stats.into(),
        watched_ports,
    })
}

fn print_human(status: &Status) {
    println!(
        "portwatch loaded at {} (layout {}, direction {})",
        status.pin_path.display(),
        status.layout_version,
        status.direction
    );
    for p in &status.programs {
        println!("  program {:<8} id {} tag {}", p.direction.name(), p.id, p.tag);
    }
    println!("  maps: {}", status.maps_memory_bytes);
    if status.attachments.is_empty() {
        println!("attached nowhere (attach with `portwatch attach IF`)");
    }
    for a in &status.attachments {
        let what = match (a.link_id, a.mode) {
            (Some(id), _) => format!("link {id}"),
            (None, AttachMode::Tc) => format!(
                "prio {} handle {}",
                a.tc_priority.unwrap_or_default(),
                a.tc_handle.as_deref().unwrap_or_default()
            ),
            (None, AttachMode::Tcx) => "link missing".into(),
            (None, AttachMode::Pending) => String::new(),
        };
        let netns = a.netns.as_ref().map_or(String::new(), |ns| format!("  netns {ns}"));
        let vanished = match (a.present, &a.netns) {
            _ if a.pending => "  (an attach was interrupted: the next command that takes the lock resolves it)".into(),
            (true, _) if !a.attached => format!(
                "  ({} missing: `portwatch detach {}{}` removes the record)",
                if a.mode == AttachMode::Tc { "filter" } else { "link" },
                a.interface,
                a.netns.as_ref().map_or(String::new(), |ns| format!(" --netns {ns}"))
            ),
            (true, _) => String::new(),
            (false, None) => "  (interface vanished: `portwatch detach` removes this)".into(),
            (false, Some(ns)) => format!(
                "  (interface vanished: `portwatch detach {} --netns {ns}` removes this)",
                a.interface
            ),
        };
        println!(
            "attached {:<16} {:<8} {:<4} {what}{netns}{vanished}",
            a.interface,
            a.direction.name(),
            a.mode.name()
        );
    }
    let ports: Vec<String> = status.watched_ports.iter().map(|p| p.to_string()).collect();
    println!(
        "watching {}",
        if ports.is_empty() {
            "no port".to_string()
        } else {
            ports.join(", ")
        }
    );
    if let Some(r) = &status.reset_interrupted {
        println!(
            "reset {} was interrupted ({}, writing to {}): the next command that takes the lock (any change, \
             `portwatch reset`, a scrape) finishes it or rolls it back",
            r.id,
            r.state,
            r.output
                .as_ref()
                .map_or("stdout".to_string(), |p| p.display().to_string())
        );
    }
    let c = &status.counters;
    println!(
        "counter entries {} of {} (generation {})",
        c.entries, c.max_entries, c.generation
    );
    let past: Vec<String> = c.tiers[1..]
        .iter()
        .map(|t| {
            let size = t.max_entries.map_or(String::new(), |m| format!(" of {m}"));
            format!(
                "{} {}{size} entries, {} ({} bytes)",
                t.tier,
                t.entries,
                human_bytes(t.bytes),
                t.bytes
            )
        })
        .collect();
    println!("past the per-IP map: {}", past.join("; "));
    for p in &c.ports {
        println!(
            "port {}/{} {}: {} ({} bytes), {} packets since the last reset",
            p.port,
            p.proto,
            p.direction.name(),
            human_bytes(p.bytes),
            p.bytes,
            p.packets
        );
    }
    if !c.sources.is_empty() {
        let sources: Vec<String> = c
            .sources
            .iter()
            .map(|s| format!("{}/{} {} about {}", s.port, s.proto, s.direction.name(), s.estimate))
            .collect();
        println!(
            "distinct sources past the per-IP map: {} (standard error {:.1}%)",
            sources.join(", "),
            c.sources_standard_error * 100.0
        );
    }
    if c.unattributed.packets > 0 {
        println!(
            "unattributed (no tier had room): {} packets, {} ({} bytes)",
            c.unattributed.packets,
            human_bytes(c.unattributed.bytes),
            c.unattributed.bytes
        );
    }
    let s = &status.stats;
    println!(
        "matched {} packets, {} ({} bytes)",
        s.matched_packets,
        human_bytes(s.matched_bytes),
        s.matched_bytes
    );
    println!("unwatched {} packets", s.unwatched_packets);
    let not_counted: Vec<String> = NotCounted::ALL
        .iter()
        .map(|r| format!("{} {}", r.description(), s.not_counted.0.not_counted(*r)))
        .collect();
    println!("not counted: {}", not_counted.join(", "));
    println!(
        "map full: {} packets, {} ({} bytes) counted past the per-IP map",
        s.map_full_packets,
        human_bytes(s.map_full_bytes),
        s.map_full_bytes
    );
}
