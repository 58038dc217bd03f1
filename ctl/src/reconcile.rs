//! Making the pinned state match a configuration (`apply`, `watch`): a plan of changes, one line
//! each, carried out all or nothing. If a step fails, what was done is undone in reverse and the
//! state is as it was before.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use portwatch_common::{AttachKey, Attachment, LAYOUT_VERSION, PORT_COUNT};

use crate::{
    attach::{self, Iface, Mode},
    config::{Desired, Wanted},
    error::Error,
    filter::Filter,
    lifecycle,
    maps::{self, PortChange},
    memory::{self, MapMemory},
    netns::NetNs,
    output::RecordFormat,
    pinned::{Access, Creating, Pinned},
    ports,
    record::{Output, RecordFile},
};

/// How `apply` may go about it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Options {
    /// Print the plan, change nothing.
    pub dry_run: bool,
    /// A change of `max_entries` (or a tier's size) or `direction` unloads and loads again, after
    /// draining every counter into `drain_to`.
    pub reload: bool,
    pub drain_to: Option<PathBuf>,
    /// What the maps of a load or reload may take.
    pub memory: memory::Guard,
}

/// What is pinned that the file does not ask for, and what it asks for that is not pinned.
struct Plan {
    /// Nothing is loaded, or a reload: a first load with the file's settings.
    load: bool,
    /// Loaded with other settings: what differs, as `differences` says it.
    reload_from: Option<Vec<Difference>>,
    detach: Vec<(AttachKey, Attachment)>,
    ports_before: Vec<u8>,
    ports_after: Vec<u8>,
    attach: Vec<Wanted>,
    /// A load or reload: what its maps take (`weigh`).
    maps: Option<MapMemory>,
}

impl Plan {
    fn lines(&self, desired: &Desired, drain_to: Option<&Path>) -> Vec<String> {
        let mut lines = vec![];
        if let Some(differences) = &self.reload_from {
            let what: Vec<String> = differences
                .iter()
                .map(|d| format!("{} {} -> {}", d.setting, d.loaded, d.wanted))
                .collect();
            lines.push(format!(
                "~ reload {}: {}; every counter drained into {} first",
                desired.pin.root.display(),
                what.join(", "),
                drain_to.map_or("?".into(), |p| p.display().to_string())
            ));
        } else if self.load {
            lines.push(format!(
                "+ load {} (layout {LAYOUT_VERSION}, {} counter entries, direction {})",
                desired.pin.root.display(),
                desired.sizes.ip,
                desired.directions.name()
            ));
        }
        if let Some(maps) = self.maps {
            lines.push(format!("  maps: {maps}"));
        }
        for (key, record) in &self.detach {
            lines.push(format!(
                "- attach {} {}{}",
                attach::display_name(key, record),
                key.direction().name(),
                attach::netns_suffix(record)
            ));
        }
        let only = |a: &[u8], b: &[u8]| -> Vec<u8> { a.iter().zip(b).map(|(x, y)| x & !y).collect() };
        for spec in ports::fold(&only(&self.ports_before, &self.ports_after)) {
            lines.push(format!("- port {spec}"));
        }
        for spec in ports::fold(&only(&self.ports_after, &self.ports_before)) {
            lines.push(format!("+ port {spec}"));
        }
        for w in &self.attach {
            let mode = w.mode.required().map_or(String::new(), |m| format!(" ({})", m.name()));
            lines.push(format!(
                "+ attach {} {}{mode}{}",
                w.iface.name,
                w.direction.name(),
                w.iface.netns.suffix()
            ));
        }
        lines
    }
}

/// The changes that make loaded state `pinned` match `desired` (settings aside).
fn plan_changes(pinned: &mut Pinned, desired: &Desired) -> Result<Plan> {
    let wanted: BTreeMap<AttachKey, &Wanted> = desired
        .attachments
        .iter()
        .map(|w| (AttachKey::new(w.iface.netns.inode, w.iface.index, w.direction), w))
        .collect();
    let mut current: Vec<(AttachKey, Attachment)> = pinned.attachments()?.iter().filter_map(|r| r.ok()).collect();
    current.sort_by_key(|(key, _)| *key);
    let keep = |key: &AttachKey, record: &Attachment| wanted.get(key).is_some_and(|w| w.mode.accepts(record.mode()));
    let kept: Vec<AttachKey> = current.iter().filter(|(k, r)| keep(k, r)).map(|(k, _)| *k).collect();
    Ok(Plan {
        load: false,
        reload_from: None,
        detach: current.into_iter().filter(|(k, r)| !keep(k, r)).collect(),
        ports_before: maps::port_table(pinned.watched_ports()?)?,
        ports_after: desired.port_table.clone(),
        attach: wanted
            .into_iter()
            .filter(|(key, _)| !kept.contains(key))
            .map(|(_, w)| w.clone())
            .collect(),
        maps: None,
    })
}

/// Everything `desired` asks for, onto a first load.
fn plan_first_load(desired: &Desired) -> Plan {
    Plan {
        load: true,
        reload_from: None,
        detach: vec![],
        ports_before: vec![0; PORT_COUNT as usize],
        ports_after: desired.port_table.clone(),
        attach: desired.attachments.clone(),
        maps: None,
    }
}

/// A plan that loads, its maps weighed against the memory guard before anything is made.
fn weigh(mut plan: Plan, desired: &Desired, options: &Options) -> Result<Plan> {
    if plan.load {
        plan.maps = Some(memory::weigh(
            desired.sizes,
            options.memory,
            "ask for fewer entries (max_entries in the file)",
        )?);
    }
    Ok(plan)
}

/// Makes the pinned state match `desired`; returns the lines of what changed (empty: nothing).
pub(crate) fn apply(desired: &Desired, options: &Options) -> Result<Vec<String>> {
    let pin = &desired.pin;
    if options.dry_run {
        let plan = match Pinned::probe(pin, Access::Read)? {
            None => plan_first_load(desired),
            Some(mut pinned) => planned(&mut pinned, desired, options)?,
        };
        let plan = weigh(plan, desired, options)?;
        return Ok(plan.lines(desired, options.drain_to.as_deref()));
    }
    match Pinned::create(pin)? {
        Creating::Empty(fresh) => {
            let (fresh, plan) = fresh.unless_refused(weigh(plan_first_load(desired), desired, options))?;
            let mut created = lifecycle::create(fresh, desired.sizes, desired.directions)?;
            carry_out(&mut created.pinned, &plan)?;
            created.keep();
            Ok(plan.lines(desired, None))
        }
        Creating::Loaded(pinned) => {
            let mut pinned = *pinned;
            let plan = weigh(planned(&mut pinned, desired, options)?, desired, options)?;
            if plan.reload_from.is_some() {
                reload(pinned, desired, &plan, options)?;
            } else {
                carry_out(&mut pinned, &plan)?;
            }
            Ok(plan.lines(desired, options.drain_to.as_deref()))
        }
    }
}

/// A setting of the loaded state that the file wants otherwise.
struct Difference {
    setting: &'static str,
    loaded: String,
    wanted: String,
}

/// What a reload would change: the settings `load` fixed that differ from the file's.
fn differences(pinned: &Pinned, desired: &Desired) -> Vec<Difference> {
    let (loaded, dirs) = (pinned.meta.sizes(), pinned.meta.directions());
    let mut out = vec![];
    let mut differ = |setting, loaded: String, wanted: String| {
        if loaded != wanted {
            out.push(Difference {
                setting,
                loaded,
                wanted,
            });
        }
    };
    differ("max_entries", loaded.ip.to_string(), desired.sizes.ip.to_string());
    differ(
        "prefix_entries",
        loaded.prefix.to_string(),
        desired.sizes.prefix.to_string(),
    );
    differ(
        "wide_prefix_entries",
        loaded.wide_prefix.to_string(),
        desired.sizes.wide_prefix.to_string(),
    );
    differ("direction", dirs.name().into(), desired.directions.name().into());
    out
}

/// The plan for loaded state; settings that differ need `--reload`, or are refused.
fn planned(pinned: &mut Pinned, desired: &Desired, options: &Options) -> Result<Plan> {
    let differences = differences(pinned, desired);
    if differences.is_empty() {
        return plan_changes(pinned, desired);
    }
    let names: Vec<String> = differences
        .iter()
        .map(|d| format!("{} {}", d.setting, d.loaded))
        .collect();
    let wanted: Vec<&str> = differences.iter().map(|d| d.wanted.as_str()).collect();
    let what = format!("{}, the file {}", names.join(" and "), wanted.join(" and "));
    if !options.reload || options.drain_to.is_none() {
        return Err(Error::Conflict(format!(
            "portwatch is loaded at {} with {what}: that needs a reload; run `portwatch unload` first \
             (its counters are lost), or `portwatch apply -f FILE --reload --drain-to LOG`, which drains \
             every counter into LOG first",
            pinned.pin.root.display()
        ))
        .into());
    }
    let mut plan = plan_first_load(desired);
    plan.reload_from = Some(differences);
    Ok(plan)
}

/// What has been done, to undo in reverse if a later step fails.
enum Done {
    Attached(AttachKey, Attachment),
    Detached(AttachKey, Attachment),
    Ports(PortChange),
}

/// Detaches, attaches and writes the ports as `plan` says, all or nothing.
fn carry_out(pinned: &mut Pinned, plan: &Plan) -> Result<()> {
    let mut done = vec![];
    let result = (|| -> Result<()> {
        for (key, record) in &plan.detach {
            attach::detach_one(pinned, *key, record, &mut say)?;
            done.push(Done::Detached(*key, *record));
        }
        for w in &plan.attach {
            if let Some((key, record)) = attach::attach_one(pinned, &w.iface, w.direction, w.mode, &mut say)? {
                done.push(Done::Attached(key, record));
            }
        }
        if plan.ports_before != plan.ports_after {
            let change = PortChange::between(plan.ports_before.clone(), plan.ports_after.clone());
            change.write(pinned)?;
            done.push(Done::Ports(change));
        }
        Ok(())
    })();
    if let Err(e) = result {
        undo(pinned, done);
        return Err(e.context("apply failed; what it had changed is undone"));
    }
    Ok(())
}

fn undo(pinned: &mut Pinned, done: Vec<Done>) {
    for step in done.into_iter().rev() {
        let undone = match step {
            Done::Attached(key, record) => attach::detach_one(pinned, key, &record, &mut say),
            Done::Detached(key, record) => reattach(pinned, key, &record),
            Done::Ports(change) => {
                change.undo(pinned);
                Ok(())
            }
        };
        if let Err(e) = undone {
            eprintln!("portwatch: while undoing: {e:#}");
        }
    }
}

/// Attaches again as `record` was, where its interface still is.
fn reattach(pinned: &mut Pinned, key: AttachKey, record: &Attachment) -> Result<()> {
    let netns = NetNs::of_attachment(key.netns, &attach::recorded_netns(record))
        .context("the network namespace of a detached attachment is gone")?;
    let name = attach::current_name(&key, record).context("the interface of a detached attachment is gone")?;
    let iface = Iface {
        name,
        index: key.ifindex,
        netns,
    };
    attach::attach_one(pinned, &iface, key.direction(), Mode::from(record.mode()), &mut say).map(|_| ())
}

/// What attaching and detaching have to say on the way, on stderr as it happens (`apply`, `watch`,
/// `unload --drain-to`).
fn say(note: attach::Note) {
    eprintln!("portwatch: {note}");
}

/// Stops counting (detaches everything) and appends every counter to `log` as one JSON line, as
/// `reset --json` writes it: with nothing attached, the drain takes every byte counted, and none
/// is counted after it. If the log cannot be written, the counters are put back and everything is
/// attached again: nothing changed. Returns what it detached. (`unload --drain-to`, `apply
/// --reload`.)
pub(crate) fn detach_and_drain(pinned: &mut Pinned, log: &Path) -> Result<Vec<(AttachKey, Attachment)>> {
    // Opened before anything changes: a log that cannot be written fails with nothing touched.
    let mut output = Output::File(RecordFile::open(log)?);
    let mut all: Vec<_> = pinned.attachments()?.iter().filter_map(|r| r.ok()).collect();
    all.sort_by_key(|(key, _)| *key);
    let mut done = vec![];
    for (key, record) in all {
        if let Err(e) = attach::detach_one(pinned, key, &record, &mut say) {
            undo(pinned, done);
            return Err(e);
        }
        done.push(Done::Detached(key, record));
    }
    let drained = crate::reset::run(pinned, &Filter::default(), &mut output, RecordFormat::Json);
    if let Err(e) = drained {
        // Not committed: the counters are where they were; attach everything again. (Committed
        // but not finished: the next command finishes it; attaching again is still right.)
        undo(pinned, done);
        return Err(e.context("everything was attached again"));
    }
    Ok(done
        .into_iter()
        .filter_map(|d| match d {
            Done::Detached(key, record) => Some((key, record)),
            _ => None,
        })
        .collect())
}

/// `--reload`: stops counting and drains every counter into the log, unloads, and loads as
/// `desired` says. If the new state cannot be made, the old one is made again (its counters are in
/// the log).
fn reload(mut pinned: Pinned, desired: &Desired, plan: &Plan, options: &Options) -> Result<()> {
    let log = options.drain_to.as_deref().expect("planned checks --drain-to");
    // The old state, as a file would ask for it, to make again if the new one cannot be made.
    let old = crate::config::FileConfig::of_pinned(&mut pinned)?
        .desired(pinned.pin.clone(), Path::new("the pinned state"))?;
    detach_and_drain(&mut pinned, log)?;
    let fresh = lifecycle::remove(pinned)?;
    make(fresh, desired, plan).or_else(|e| {
        let Creating::Empty(fresh) = Pinned::create(&old.pin)? else {
            return Err(e.context("the new state could not be made, and the pin path is not empty"));
        };
        make(fresh, &old, &plan_first_load(&old)).context("making the old state again")?;
        Err(e.context(format!(
            "the reload failed; the state before it is back, with its counters in {}",
            log.display()
        )))
    })
}

/// A first load with `desired`'s settings, then `plan`.
fn make(fresh: crate::pinned::Fresh, desired: &Desired, plan: &Plan) -> Result<()> {
    let mut created = lifecycle::create(fresh, desired.sizes, desired.directions)?;
    carry_out(&mut created.pinned, plan)?;
    created.keep();
    Ok(())
}
