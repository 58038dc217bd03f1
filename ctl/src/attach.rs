//! Attaching the programs to interfaces and detaching them: TCX links (pinned, so they outlive
//! the process) or classic clsact/cls_bpf filters (recorded in the `attachments` map, since they
//! cannot be pinned). Every attachment, either kind, is recorded there.

use std::{fmt, io, os::fd::AsFd};

use anyhow::{Context, Result};
use aya::maps::IterableMap;
use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    LinkOrder, SchedClassifier, TcAttachType,
};
use portwatch_common::{
    AttachKey, AttachMode, Attachment, Direction, Directions, ATTACH_FLAG_OWN_QDISC, ATTACH_FLAG_PENDING,
    ATTACH_FLAG_QDISC_ABSENT,
};

use crate::{
    error::Error,
    fault,
    netns::NetNs,
    pinned::{PinPath, Pinned},
};

/// The mode an operator asks for (`--mode`, `mode:` in a configuration file); an attachment is
/// made in one `AttachMode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// TCX links (pinned); the classic clsact qdisc when the kernel refuses TCX.
    #[default]
    Auto,
    /// TCX links only.
    Tcx,
    /// The classic clsact qdisc with a cls_bpf filter.
    Tc,
}

/// What attaching and detaching have to say along the way, as it happens; the caller says it (on
/// stderr, after `portwatch: `). This module prints nothing.
#[derive(Debug)]
pub(crate) enum Note {
    /// `--mode auto` on a kernel that refused the TCX link: the clsact qdisc is used instead.
    TcxRefused { interface: String, error: String },
    /// A pending record (an `attach` interrupted) is completed: the kernel has the attachment.
    Completed { interface: String, direction: Direction },
    /// A pending record is removed: nothing was attached.
    Removed { interface: String, direction: Direction },
    /// Taking back an attachment after a later one failed failed too.
    UndoFailed(anyhow::Error),
    /// The clsact qdisc portwatch added stays (empty, so harmless).
    QdiscLeft { ifindex: u32, error: io::Error },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Note::TcxRefused { interface, error } => {
                write!(
                    f,
                    "TCX refused on {interface} ({error}); using the classic clsact qdisc"
                )
            }
            Note::Completed { interface, direction } => write!(
                f,
                "completed the record of an interrupted attach to {interface} {}",
                direction.name()
            ),
            Note::Removed { interface, direction } => write!(
                f,
                "removed the record of an interrupted attach to {interface} {}: nothing was attached",
                direction.name()
            ),
            Note::UndoFailed(e) => write!(f, "while undoing: {e:#}"),
            Note::QdiscLeft { ifindex, error } => {
                write!(
                    f,
                    "could not remove the clsact qdisc it added to interface {ifindex}: {error}"
                )
            }
        }
    }
}

/// What `attach_all` did for one interface and direction, as `load` and `attach` say it.
#[derive(Debug)]
pub(crate) enum Step<'a> {
    /// Attached now, in `mode`.
    Attached {
        iface: &'a Iface,
        direction: Direction,
        mode: AttachMode,
    },
    /// The records show it attached there already.
    AlreadyAttached { iface: &'a Iface, direction: Direction },
}

impl fmt::Display for Step<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Step::Attached { iface, direction, mode } => write!(
                f,
                "attached to {} {} ({}){}",
                iface.name,
                direction.name(),
                mode.name(),
                iface.netns.suffix()
            ),
            Step::AlreadyAttached { iface, direction } => write!(
                f,
                "already attached to {} {}{}",
                iface.name,
                direction.name(),
                iface.netns.suffix()
            ),
        }
    }
}

/// Attaches the pinned program of `direction` to `iface` and records it; returns `None` when the
/// records show it attached there already (it never attaches twice). The key and record returned
/// let a caller undo it with `detach_one`. What it has to say goes to `say` as it happens.
pub(crate) fn attach_one(
    pinned: &mut Pinned,
    iface: &Iface,
    direction: Direction,
    mode: Mode,
    say: &mut dyn FnMut(Note),
) -> Result<Option<(AttachKey, Attachment)>> {
    let key = AttachKey::new(iface.netns.inode, iface.index, direction);
    if let Ok(record) = pinned.attachments()?.get(&key, 0) {
        if resolve(pinned, key, record, say)?.is_some() {
            return Ok(None);
        }
    }
    // A clsact qdisc that portwatch added for the other direction is portwatch's here too.
    let other = AttachKey::new(iface.netns.inode, iface.index, direction.other());
    let own_qdisc = pinned
        .attachments()?
        .get(&other, 0)
        .is_ok_and(|r| r.mode() == AttachMode::Tc && r.flags & ATTACH_FLAG_OWN_QDISC != 0);
    // Recorded before it is made: a crash between the two leaves a pending record that the next
    // command resolves (`resolve`), never an attachment that nobody knows of.
    let mut pending = base_record(iface);
    pending.flags = ATTACH_FLAG_PENDING | if own_qdisc { ATTACH_FLAG_OWN_QDISC } else { 0 };
    if !iface.netns.enter(|| crate::sys::netlink::has_clsact(iface.index))?? {
        pending.flags |= ATTACH_FLAG_QDISC_ABSENT;
    }
    pinned
        .attachments()?
        .insert(key, pending, 0)
        .context("recording the attachment")?;
    fault::point("attach:recorded").context("attaching")?;
    let pin = pinned.pin.clone();
    let prog = pinned.program(direction)?;
    let made = iface
        .netns
        .enter(|| attach(prog, &pin, iface, direction, mode, own_qdisc, say))
        .and_then(|r| r);
    let record = match made {
        Ok(record) => record,
        Err(e) => {
            let _ = pinned.attachments()?.remove(&key);
            return Err(e);
        }
    };
    fault::point("attach:made").context("attaching")?;
    if let Err(e) = pinned.attachments()?.insert(key, record, 0) {
        let _ = detach(&pin, key, &record, say);
        let _ = pinned.attachments()?.remove(&key);
        return Err(e).context("recording the attachment");
    }
    Ok(Some((key, record)))
}

/// The record of an attachment to `iface`, before anything is attached: its name and namespace.
fn base_record(iface: &Iface) -> Attachment {
    let mut record = Attachment::default();
    set_nul_padded(&mut record.ifname[..15], &iface.name);
    if let Some(given) = &iface.netns.given {
        set_nul_padded(&mut record.netns, given);
    }
    record
}

/// Completes or removes a pending record (an `attach` interrupted between recording and
/// recording what it made), as the kernel says: a pinned TCX link, or a tc filter running this
/// program on that interface and direction, completes it; nothing removes it (an unpinned TCX
/// link died with the process), with the clsact qdisc the attach may have added; `say` is told
/// which. A record that is not pending is returned as it is. Returns the record, or `None` when
/// nothing is attached.
pub(crate) fn resolve(
    pinned: &mut Pinned,
    key: AttachKey,
    record: Attachment,
    say: &mut dyn FnMut(Note),
) -> Result<Option<Attachment>> {
    if record.flags & ATTACH_FLAG_PENDING == 0 {
        return Ok(Some(record));
    }
    let mut done = record;
    done.flags &= !(ATTACH_FLAG_PENDING | ATTACH_FLAG_QDISC_ABSENT);
    let found = match is_live(pinned, key, &record)? {
        Live::Link { .. } => {
            done.set_mode(AttachMode::Tcx);
            true
        }
        Live::Filter { priority, handle } => {
            done.set_mode(AttachMode::Tc);
            done.priority = priority;
            done.handle = handle;
            if record.flags & ATTACH_FLAG_QDISC_ABSENT != 0 {
                done.flags |= ATTACH_FLAG_OWN_QDISC;
            }
            true
        }
        Live::Gone => {
            if record.flags & ATTACH_FLAG_QDISC_ABSENT != 0 {
                // A namespace that is gone took the interface, and its qdisc, with it.
                if let Some(netns) = NetNs::of_attachment(key.netns, &recorded_netns(&record)) {
                    if let Some(note) = netns.enter(|| remove_own_clsact(key.ifindex))? {
                        say(note);
                    }
                }
            }
            false
        }
    };
    if found {
        pinned
            .attachments()?
            .insert(key, done, 0)
            .context("completing an attachment record")?;
        say(Note::Completed {
            interface: display_name(&key, &done),
            direction: key.direction(),
        });
        Ok(Some(done))
    } else {
        remove_record(pinned, key)?;
        say(Note::Removed {
            interface: display_name(&key, &record),
            direction: key.direction(),
        });
        Ok(None)
    }
}

/// What the kernel has of an attachment (`is_live`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Live {
    /// The TCX link pinned for it, with the link's id.
    Link { id: u32 },
    /// A cls_bpf filter running this portwatch's program, where it is on the interface.
    Filter { priority: u16, handle: u32 },
    /// Nothing: recorded only.
    Gone,
}

/// Whether the kernel has the attachment `record` says is at `key`: the one rule of `status`, of
/// `resolve` and of whatever else asks. TCX: the pin at its link path opens as a link. tc: a
/// cls_bpf filter on (interface, direction), in the attachment's network namespace, runs this
/// portwatch's program (by id), with the recorded priority and handle. A pending record (not made
/// yet, so either mode) takes the link, or any such filter: what completes it.
pub(crate) fn is_live(pinned: &mut Pinned, key: AttachKey, record: &Attachment) -> Result<Live> {
    let mode = record.mode();
    if mode != AttachMode::Tc {
        let link = PinnedLink::from_pin(pinned.pin.link(key.netns, key.ifindex, key.direction()))
            .ok()
            .and_then(|link| FdLink::from(link).info().ok());
        if let Some(info) = link {
            return Ok(Live::Link { id: info.id() });
        }
        if mode == AttachMode::Tcx {
            return Ok(Live::Gone);
        }
    }
    // A namespace that is gone took the interface, and its filters, with it.
    let Some(netns) = NetNs::of_attachment(key.netns, &recorded_netns(record)) else {
        return Ok(Live::Gone);
    };
    let id = pinned.program(key.direction())?.info()?.id();
    let egress = key.direction() == Direction::Egress;
    let filters = netns.enter(|| crate::sys::netlink::bpf_filters(key.ifindex, egress))??;
    let recorded = (mode == AttachMode::Tc).then_some((record.priority, record.handle));
    Ok(filters
        .into_iter()
        .find(|&(priority, handle, prog)| prog == id && recorded.is_none_or(|r| r == (priority, handle)))
        .map_or(Live::Gone, |(priority, handle, _)| Live::Filter { priority, handle }))
}

/// An attachment as recorded, and what the kernel has of it now (`status`).
pub(crate) struct Observed {
    pub key: AttachKey,
    pub record: Attachment,
    pub mode: AttachMode,
    /// `is_live`'s answer; `Gone` when the kernel cannot be asked from here, and for a pending
    /// record, which is no attachment yet (the next command that takes the lock completes it from
    /// what `is_live` finds, or removes it).
    pub live: Live,
    /// The interface's name now; `None` when it, or its namespace, is gone.
    pub current_name: Option<String>,
}

/// Every attachment record, with what the kernel has of it.
pub(crate) fn observe_all(pinned: &mut Pinned) -> Result<Vec<Observed>> {
    let records: Vec<(AttachKey, Attachment)> = pinned.attachments()?.iter().collect::<Result<_, _>>()?;
    Ok(records
        .into_iter()
        .map(|(key, record)| {
            let mode = record.mode();
            let live = match mode {
                AttachMode::Pending => Live::Gone,
                AttachMode::Tcx | AttachMode::Tc => is_live(pinned, key, &record).unwrap_or(Live::Gone),
            };
            Observed {
                key,
                record,
                mode,
                live,
                current_name: current_name(&key, &record),
            }
        })
        .collect())
}

/// `resolve` for every pending record.
pub(crate) fn resolve_all(pinned: &mut Pinned, say: &mut dyn FnMut(Note)) -> Result<()> {
    let pending: Vec<_> = pinned
        .attachments()?
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, r)| r.flags & ATTACH_FLAG_PENDING != 0)
        .collect();
    for (key, record) in pending {
        resolve(pinned, key, record, say)?;
    }
    Ok(())
}

/// Detaches one attachment and removes its record (a pending one is resolved first).
pub(crate) fn detach_one(
    pinned: &mut Pinned,
    key: AttachKey,
    record: &Attachment,
    say: &mut dyn FnMut(Note),
) -> Result<()> {
    let Some(record) = resolve(pinned, key, *record, say)? else {
        return Ok(());
    };
    detach(&pinned.pin, key, &record, say)?;
    fault::point("detach:detached").context("detaching")?;
    remove_record(pinned, key)
}

/// Removes the record of `key`; one already gone is not an error.
fn remove_record(pinned: &mut Pinned, key: AttachKey) -> Result<()> {
    let records = pinned.attachments()?;
    crate::sys::bpf::remove_if_present(records.map().fd().as_fd(), &key).context("removing an attachment record")?;
    Ok(())
}

/// Attaches the pinned programs to every interface of `ifaces` in `directions` (skipping what is
/// attached already), all or nothing: if one fails, those attached before it are detached and
/// their records removed. `each` is told of each interface and direction as it is done, `say`
/// what there is to say on the way.
pub(crate) fn attach_all<'a>(
    pinned: &mut Pinned,
    ifaces: &'a [Iface],
    directions: Directions,
    mode: Mode,
    mut each: impl FnMut(Step<'a>),
    say: &mut dyn FnMut(Note),
) -> Result<()> {
    let mut done = vec![];
    for iface in ifaces {
        for direction in directions.iter() {
            match attach_one(pinned, iface, direction, mode, say) {
                Ok(None) => each(Step::AlreadyAttached { iface, direction }),
                Ok(Some((key, record))) => {
                    each(Step::Attached {
                        iface,
                        direction,
                        mode: record.mode(),
                    });
                    done.push((key, record));
                }
                Err(e) => {
                    for (key, record) in done.iter().rev() {
                        if let Err(e) = detach_one(pinned, *key, record, say) {
                            say(Note::UndoFailed(e));
                        }
                    }
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

impl Mode {
    pub(crate) fn is_auto(&self) -> bool {
        *self == Mode::Auto
    }

    /// The one mode this asks for; `None` for `auto`, which takes either.
    pub(crate) fn required(self) -> Option<AttachMode> {
        match self {
            Mode::Auto => None,
            Mode::Tcx => Some(AttachMode::Tcx),
            Mode::Tc => Some(AttachMode::Tc),
        }
    }

    /// Whether an attachment made in `made` is one this mode asks for.
    pub(crate) fn accepts(self, made: AttachMode) -> bool {
        self.required().is_none_or(|mode| mode == made)
    }
}

/// The mode that makes an attachment again the way it was made. A pending one (not made yet) asks
/// for `tc`, as it always has.
impl From<AttachMode> for Mode {
    fn from(made: AttachMode) -> Mode {
        match made {
            AttachMode::Tcx => Mode::Tcx,
            AttachMode::Tc | AttachMode::Pending => Mode::Tc,
        }
    }
}

/// An interface by name and index, in its network namespace.
#[derive(Clone, Debug)]
pub(crate) struct Iface {
    pub name: String,
    pub index: u32,
    pub netns: NetNs,
}

impl Iface {
    pub(crate) fn resolve(name: &str, netns: &NetNs) -> Result<Iface> {
        match netns.enter(|| nix::net::if_::if_nametoindex(name))? {
            Ok(index) => Ok(Iface {
                name: name.to_string(),
                index,
                netns: netns.clone(),
            }),
            Err(_) => {
                let see = match &netns.given {
                    Some(ns) => format!("ip -n {ns} link"),
                    None => "ip link".to_string(),
                };
                Err(Error::Interface(format!("no interface named {name:?}{} (see `{see}`)", netns.suffix())).into())
            }
        }
    }
}

/// The current name of the interface with this index, if it still exists.
pub(crate) fn ifname_of(index: u32) -> Option<String> {
    let name = nix::net::if_::if_indextoname(index).ok()?;
    // nix 0.29 takes a -1 pointer for the error, not the NULL that if_indextoname(3) returns, so
    // an index with no interface comes back as an empty name; no interface has one.
    (!name.is_empty()).then(|| name.to_string_lossy().into_owned())
}

fn nul_padded(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

fn set_nul_padded(field: &mut [u8], text: &str) {
    let n = text.len().min(field.len());
    field[..n].copy_from_slice(&text.as_bytes()[..n]);
}

pub(crate) fn recorded_name(a: &Attachment) -> String {
    nul_padded(&a.ifname)
}

/// The network namespace as the attachment was given it (`ip netns` name or path), or empty.
pub(crate) fn recorded_netns(a: &Attachment) -> String {
    nul_padded(&a.netns)
}

/// The interface's name now, or the one recorded when it is gone.
pub(crate) fn display_name(key: &AttachKey, record: &Attachment) -> String {
    current_name(key, record).unwrap_or_else(|| recorded_name(record))
}

/// ` in network namespace NS` for an attachment made with `--netns NS`, or nothing.
pub(crate) fn netns_suffix(record: &Attachment) -> String {
    match recorded_netns(record) {
        ns if ns.is_empty() => String::new(),
        ns => format!(" in network namespace {ns}"),
    }
}

/// The name the attached interface has now, in its network namespace; `None` when it (or its
/// namespace) is gone, or the namespace cannot be entered from here.
pub(crate) fn current_name(key: &AttachKey, record: &Attachment) -> Option<String> {
    let netns = NetNs::of_attachment(key.netns, &recorded_netns(record))?;
    netns.enter(|| ifname_of(key.ifindex)).ok().flatten()
}

fn tc_attach_type(direction: Direction) -> TcAttachType {
    match direction {
        Direction::Ingress => TcAttachType::Ingress,
        Direction::Egress => TcAttachType::Egress,
    }
}

/// Set when this command has seen the kernel refuse a TCX link with EINVAL, as a kernel without
/// TCX does: `auto` then goes straight to the clsact qdisc for every later attachment, and says
/// "TCX refused" once per command, not once per attachment.
static NO_TCX: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Attaches `prog` to `iface` in `direction` and pins the link (TCX). Returns the record of the
/// attachment (`own_qdisc`: the interface's clsact qdisc is one portwatch added).
fn attach(
    prog: &mut SchedClassifier,
    pin: &PinPath,
    iface: &Iface,
    direction: Direction,
    mode: Mode,
    own_qdisc: bool,
    say: &mut dyn FnMut(Note),
) -> Result<Attachment> {
    let mut record = base_record(iface);
    let attach_type = tc_attach_type(direction);
    let dir = direction.name();

    let tcx = match mode {
        Mode::Tc => None,
        Mode::Auto if NO_TCX.load(std::sync::atomic::Ordering::Relaxed) => None,
        Mode::Tcx | Mode::Auto => {
            match prog.attach_with_options(
                &iface.name,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(id) => Some(id),
                // A kernel without TCX refuses the link (EINVAL); `auto` then uses clsact.
                Err(e) if mode == Mode::Auto => {
                    if has_errno(&e, &[libc::EINVAL]) {
                        NO_TCX.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    say(Note::TcxRefused {
                        interface: iface.name.clone(),
                        error: e.to_string(),
                    });
                    None
                }
                Err(e) => {
                    // A kernel without TCX (before 6.6) refuses the link with EINVAL.
                    let hint = if has_errno(&e, &[libc::EINVAL]) {
                        " (this kernel has no TCX links, which came with Linux 6.6: use --mode tc, or \
                         --mode auto to fall back to it)"
                    } else {
                        ""
                    };
                    return Err(e).with_context(|| format!("attaching to {} {dir} with TCX{hint}", iface.name));
                }
            }
        }
    };
    match tcx {
        Some(id) => {
            let link: FdLink = prog
                .take_link(id)?
                .try_into()
                .context("a TCX link that is not an fd link")?;
            crate::pinned::create_private_dir(&pin.links_dir())?;
            let path = pin.link(iface.netns.inode, iface.index, direction);
            // Dropping `link` if pinning fails detaches it: nothing is left half-done.
            link.pin(&path)
                .with_context(|| format!("pinning the link at {}", path.display()))?;
            record.set_mode(AttachMode::Tcx);
        }
        None => {
            let added = match tc::qdisc_add_clsact(&iface.name) {
                Ok(()) => true,
                // EEXIST: the interface already has a clsact qdisc (ours or someone else's); use it.
                Err(tc::TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST) => false,
                Err(e) => return Err(e).with_context(|| format!("adding the clsact qdisc to {}", iface.name)),
            };
            // Ours if added now, or if portwatch added it for the other direction.
            if added || own_qdisc {
                record.flags |= ATTACH_FLAG_OWN_QDISC;
            }
            let options = NlOptions {
                priority: 0,
                handle: TcHandle::AUTO_ASSIGN,
                ..Default::default()
            };
            let id = match prog.attach_with_options(&iface.name, attach_type, TcAttachOptions::Netlink(options)) {
                Ok(id) => id,
                Err(e) => {
                    if added {
                        if let Some(note) = remove_own_clsact(iface.index) {
                            say(note);
                        }
                    }
                    return Err(e).with_context(|| format!("attaching a tc filter to {} {dir}", iface.name));
                }
            };
            let link = prog.take_link(id)?;
            record.set_mode(AttachMode::Tc);
            record.priority = link.priority()?;
            record.handle = link.handle()?.into();
            // The filter must outlive this process: forget the link instead of dropping (which
            // would detach it). `detach` finds it again from the record.
            std::mem::forget(link);
        }
    }
    Ok(record)
}

/// Removes one attachment: unpins (and so detaches) a TCX link, or deletes the exact tc filter
/// recorded. An interface that no longer exists took its attachments with it; its pin is removed.
pub(crate) fn detach(pin: &PinPath, key: AttachKey, record: &Attachment, say: &mut dyn FnMut(Note)) -> Result<()> {
    match record.mode() {
        AttachMode::Tcx => {
            let path = pin.link(key.netns, key.ifindex, key.direction());
            match PinnedLink::from_pin(&path) {
                Ok(link) => drop(link.unpin().with_context(|| format!("removing {}", path.display()))?),
                Err(_) if !path.exists() => {}
                Err(_) => std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?,
            }
        }
        AttachMode::Tc => {
            let recorded = recorded_netns(record);
            match NetNs::of_attachment(key.netns, &recorded) {
                Some(netns) => netns.enter(|| detach_tc_filter(key, record, say))??,
                // Recorded without a name: the namespace this command runs in, which it is not.
                None if recorded.is_empty() => {
                    return Err(Error::Interface(format!(
                        "the tc filter on {} {} is in another network namespace (inode {}) than this \
                         command: run portwatch in that one (`nsenter --net=...`)",
                        recorded_name(record),
                        key.direction().name(),
                        key.netns
                    ))
                    .into())
                }
                // The namespace is gone, and its interfaces and their filters with it.
                None => {}
            }
        }
        AttachMode::Pending => {}
    }
    Ok(())
}

/// Deletes the recorded tc filter, in the namespace of its interface.
fn detach_tc_filter(key: AttachKey, record: &Attachment, say: &mut dyn FnMut(Note)) -> Result<()> {
    if let Some(name) = ifname_of(key.ifindex) {
        let link = SchedClassifierLink::attached(
            &name,
            tc_attach_type(key.direction()),
            record.priority,
            TcHandle::from(record.handle),
            None,
        )?;
        match aya::programs::links::Link::detach(link) {
            Ok(()) => {}
            // Someone removed the filter or the qdisc already: nothing left to detach.
            Err(e) if has_errno(&e, &[libc::ENOENT, libc::ENODEV, libc::EINVAL]) => {}
            Err(e) => return Err(e).with_context(|| format!("removing the tc filter from {name}")),
        }
        if record.flags & ATTACH_FLAG_OWN_QDISC != 0 {
            if let Some(note) = remove_own_clsact(key.ifindex) {
                say(note);
            }
        }
    }
    Ok(())
}

/// Deletes the clsact qdisc portwatch added to `ifindex` once no filter is left on it: while the
/// other direction's filter, or another tool's, is there, it stays. Best effort: a qdisc that
/// cannot be removed is an empty qdisc, harmless, and `tc qdisc del dev IF clsact` removes it: the
/// note returned says so.
fn remove_own_clsact(ifindex: u32) -> Option<Note> {
    if crate::sys::netlink::clsact_filter_count(ifindex).is_ok_and(|n| n == 0) {
        if let Err(error) = crate::sys::netlink::delete_clsact(ifindex) {
            if error.raw_os_error() != Some(libc::ENOENT) && error.raw_os_error() != Some(libc::EINVAL) {
                return Some(Note::QdiscLeft { ifindex, error });
            }
        }
    }
    None
}

/// Whether `e`, or an error under it, is an OS error with one of `errnos`.
fn has_errno(e: &aya::programs::ProgramError, errnos: &[i32]) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(code) = s.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error) {
            if errnos.contains(&code) {
                return true;
            }
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use portwatch_common::{ATTACH_MODE_TC, ATTACH_MODE_TCX};

    use super::*;

    fn record(mode: u8, flags: u8) -> Attachment {
        Attachment {
            mode,
            flags,
            ..Attachment::default()
        }
    }

    #[test]
    fn a_record_decodes_to_one_mode() {
        assert_eq!(record(ATTACH_MODE_TCX, 0).mode(), AttachMode::Tcx);
        assert_eq!(record(ATTACH_MODE_TC, ATTACH_FLAG_OWN_QDISC).mode(), AttachMode::Tc);
        assert_eq!(record(0, ATTACH_FLAG_PENDING).mode(), AttachMode::Pending);
        assert_eq!(
            record(0, ATTACH_FLAG_PENDING | ATTACH_FLAG_QDISC_ABSENT).mode(),
            AttachMode::Pending
        );
        // A byte this version does not know is not an attachment it could detach.
        assert_eq!(record(7, 0).mode(), AttachMode::Pending);
        assert_eq!(record(0, 0).mode(), AttachMode::Pending);
        for mode in [AttachMode::Tcx, AttachMode::Tc, AttachMode::Pending] {
            let mut r = record(0, ATTACH_FLAG_PENDING | ATTACH_FLAG_OWN_QDISC);
            r.set_mode(mode);
            assert_eq!(r.mode(), mode);
            assert_eq!(r.flags & ATTACH_FLAG_OWN_QDISC, ATTACH_FLAG_OWN_QDISC);
        }
        assert_eq!(
            [AttachMode::Tcx, AttachMode::Tc, AttachMode::Pending].map(AttachMode::name),
            ["tcx", "tc", "pending"]
        );
    }

    #[test]
    fn notes_and_steps_read_as_they_always_have() {
        let iface = Iface {
            name: "eth0".into(),
            index: 2,
            netns: NetNs::current().unwrap(),
        };
        let direction = Direction::Egress;
        let lines = [
            Step::Attached {
                iface: &iface,
                direction,
                mode: AttachMode::Tc,
            }
            .to_string(),
            Step::AlreadyAttached {
                iface: &iface,
                direction,
            }
            .to_string(),
            Note::TcxRefused {
                interface: "eth0".into(),
                error: "EINVAL".into(),
            }
            .to_string(),
            Note::Completed {
                interface: "eth0".into(),
                direction,
            }
            .to_string(),
            Note::Removed {
                interface: "eth0".into(),
                direction,
            }
            .to_string(),
            Note::UndoFailed(anyhow::anyhow!("no such device").context("detaching")).to_string(),
            Note::QdiscLeft {
                ifindex: 2,
                error: io::Error::from_raw_os_error(libc::EBUSY),
            }
            .to_string(),
        ];
        assert_eq!(
            lines,
            [
                "attached to eth0 egress (tc)",
                "already attached to eth0 egress",
                "TCX refused on eth0 (EINVAL); using the classic clsact qdisc",
                "completed the record of an interrupted attach to eth0 egress",
                "removed the record of an interrupted attach to eth0 egress: nothing was attached",
                "while undoing: detaching: no such device",
                "could not remove the clsact qdisc it added to interface 2: Device or resource busy (os error 16)",
            ]
        );
    }

    #[test]
    fn an_index_without_an_interface_has_no_name() {
        assert_eq!(ifname_of(1).as_deref(), Some("lo"));
        assert_eq!(ifname_of(u32::MAX), None);
    }

    #[test]
    fn a_requested_mode_accepts_what_it_asks_for() {
        for made in [AttachMode::Tcx, AttachMode::Tc, AttachMode::Pending] {
            assert!(Mode::Auto.accepts(made));
            assert_eq!(Mode::Tcx.accepts(made), made == AttachMode::Tcx);
            assert_eq!(Mode::Tc.accepts(made), made == AttachMode::Tc);
        }
        assert_eq!(Mode::from(AttachMode::Tcx), Mode::Tcx);
        assert_eq!(Mode::from(AttachMode::Tc), Mode::Tc);
        assert_eq!(Mode::Auto.required(), None);
        assert_eq!(Mode::Tc.required(), Some(AttachMode::Tc));
    }
}
