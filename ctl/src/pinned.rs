//! The one module that knows the pinned layout (see `bpffs-layout.md`) and the one way to open it:
//! paths, bpffs, privileges, the lock, the version check, and each pinned map and program with
//! its type, opened at most once per command.
//!
//! ```text
//! PIN_PATH/maps/<map name>             every map of the object, and the barrier
//! PIN_PATH/progs/ingress, progs/egress the two programs
//! PIN_PATH/links/<netns inode>-<ifindex>-<direction>
//!                                      TCX links (classic tc filters are recorded in maps/attachments)
//! PIN_PATH/intent/                     an empty directory: the lock's writer intent (see `Lock`)
//! ```
//! Names derive from the interface index: bpffs refuses names with a dot (`eth0.100`).
//!
//! Every verb opens the state the same way, by what it does with it:
//!
//! | verb does | call | lock | nothing loaded |
//! |---|---|---|---|
//! | reads (`status`, `top`, `ports list`) | `Pinned::open(pin, Access::Read)` / `probe` | none | `NotLoaded` / `None` |
//! | reads a snapshot (`metrics`, `serve`) | `Pinned::probe(pin, Access::Snapshot)` | shared, behind waiting changes | `None` |
//! | changes (`attach`, `ports add`, `reset`, `unload`...) | `Pinned::open(pin, Access::Change)` / `probe` | exclusive | `NotLoaded` / `None` |
//! | creates (`load`) | `Pinned::create(pin)` | exclusive, taken first | `Creating::Empty` |
//!
//! The environment (privileges, bpffs) is checked once, by the dispatcher, before any of these.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::SchedClassifier,
};
use nix::fcntl::{Flock, FlockArg};
use portwatch_common::{
    generation_index, map_names, AttachKey, Attachment, Config, Counters, Direction, Journal, JournalKey, Meta,
    PortKey, Stats, LAYOUT_VERSION,
};

use crate::{
    error::Error,
    generation::{Generation, Key},
    sources::Sketch,
};

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/portwatch";
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Paths under the pin directory.
#[derive(Clone, Debug)]
pub struct PinPath {
    pub root: PathBuf,
}

impl PinPath {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinPath { root: root.into() }
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }
    pub fn prog(&self, direction: Direction) -> PathBuf {
        self.progs_dir().join(direction.name())
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    /// The directory whose lock says a change is waiting for the pin directory's (see `Lock`).
    pub fn intent_dir(&self) -> PathBuf {
        self.root.join(INTENT_DIR)
    }
    /// A TCX link's pin: by the inode of the interface's network namespace, its index and the
    /// direction (interfaces of two namespaces can share an index and a name).
    pub fn link(&self, netns: u64, ifindex: u32, direction: Direction) -> PathBuf {
        self.links_dir().join(format!("{netns}-{ifindex}-{}", direction.name()))
    }
    /// Whether anything of portwatch is pinned here.
    pub fn is_loaded(&self) -> bool {
        self.map(map_names::META).exists()
    }
}

/// What a verb does with the kernel, and so which capabilities it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Needs {
    /// Reads or writes pinned maps (`status`, `top`, `ports`, `reset`, `metrics`, `serve`...):
    /// CAP_BPF.
    Maps,
    /// Also loads TC programs or attaches them (`load`, `attach`, `detach`, `unload`, `apply`,
    /// `watch`, `check`): CAP_BPF and CAP_NET_ADMIN.
    Network,
}

/// Fails unless this process has the capabilities `needs` (CAP_SYS_ADMIN stands in for CAP_BPF, as
/// in the kernel). Root has them all; a service can be given just these (systemd's
/// `CapabilityBoundingSet=`).
pub(crate) fn check_privileges(needs: Needs) -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    let mut missing = vec![];
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if needs == Needs::Network && !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Permission {
            missing: missing.join(", "),
            needs: match needs {
                Needs::Maps => "CAP_BPF",
                Needs::Network => "CAP_BPF and CAP_NET_ADMIN",
            },
        }
        .into())
    }
}

// `f_type` is an i64 here and an i32 on some 32-bit targets.
#[allow(clippy::unnecessary_cast)]
fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Whether this process is in PID 1's mount namespace, where a mount outlives the process. `ip
/// netns exec` runs a command in a mount namespace of its own (with a fresh /sys) that dies with it.
/// Unknown (PID 1's namespace unreadable) counts as not.
fn in_init_mount_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    let inode = |path: &str| std::fs::metadata(path).map(|m| m.ino());
    matches!((inode("/proc/self/ns/mnt"), inode("/proc/1/ns/mnt")), (Ok(own), Ok(init)) if own == init)
}

/// Makes sure the pin path can live on bpffs: mounts bpffs at /sys/fs/bpf when it is not mounted
/// (these machines do not mount it at boot), and refuses a pin path outside bpffs. It mounts only
/// in PID 1's mount namespace: elsewhere the mount, and everything pinned in it, would vanish when
/// the namespace does, after `load` had reported success.
pub(crate) fn ensure_bpffs(pin: &PinPath) -> Result<()> {
    let bpffs_root = Path::new(BPFFS_ROOT);
    if pin.root.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
        if !in_init_mount_namespace() {
            return Err(Error::Bpffs(format!(
                "bpffs is not mounted at {BPFFS_ROOT} in this mount namespace, which is not the system's \
                 (`ip netns exec` gives a command one of its own): what portwatch pinned here would vanish \
                 with it; run `nsenter --net=/run/netns/NS portwatch ...` or `portwatch ... --netns NS` instead"
            ))
            .into());
        }
        nix::mount::mount(
            Some("bpf"),
            bpffs_root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| {
            Error::Bpffs(format!(
                "bpffs is not mounted at {BPFFS_ROOT} and mounting it failed ({e}): mount it with \
                     `mount -t bpf bpf {BPFFS_ROOT}` (needs CAP_SYS_ADMIN)"
            ))
        })?;
    }
    check_pin_path(pin)?;
    let existing = pin.root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        return Err(Error::Bpffs(format!(
            "{} is not on a bpffs mount: choose a --pin-path under {BPFFS_ROOT} (or another bpffs mount)",
            pin.root.display()
        ))
        .into());
    }
    Ok(())
}

/// Refuses a pin path through a symbolic link, or a pin directory someone else owns: bpffs at
/// /sys/fs/bpf is writable by every user (mode 1777), so another user could have made the
/// directory, or a link to one of theirs, before portwatch did.
fn check_pin_path(pin: &PinPath) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for path in pin.root.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            return Err(Error::Bpffs(format!(
                "{} is a symbolic link: give the pin path without links (--pin-path {})",
                path.display(),
                std::fs::canonicalize(&pin.root)
                    .unwrap_or_else(|_| pin.root.clone())
                    .display()
            ))
            .into());
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(&pin.root) {
        if meta.uid() != 0 && meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(Error::Bpffs(format!(
                "{} belongs to uid {}, not to root: another user may have made it; remove it (`rm -r {}`) \
                 or choose another --pin-path",
                pin.root.display(),
                meta.uid(),
                pin.root.display()
            ))
            .into());
        }
    }
    Ok(())
}

/// Makes `dir` (and the directories it needs) with mode 0700: what is pinned under the pin path is
/// root's alone.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (mode 0700)", dir.display()))
}

/// The pin directory's lock, held until dropped: `flock` on the directory itself (bpffs holds
/// pins and directories, no regular file to lock), exclusive to change pinned state (so a cron job
/// and a person cannot interleave), shared to read a snapshot (`metrics`, `serve`).
///
/// `flock` alone prefers no one: shared holders that overlap (three `metrics` loops) would keep a
/// waiting reset out for as long as they go on. So every taker first passes the writer's intent,
/// `flock` on the directory `PIN_PATH/intent`, taken the same way (exclusive for a change,
/// shared for a snapshot) and given up as soon as the pin directory's own lock is held. A change
/// waiting for the pin directory holds the intent: snapshots that come after it wait behind it,
/// and it waits only for the snapshots already reading (one scrape each). Nobody waits for the
/// intent while holding the pin directory's lock, so the two cannot deadlock; a killed holder's
/// locks go with its file descriptors.
///
/// `intent` is made and removed only under the exclusive lock (made by the first change that
/// finds none, removed by `unload` and by a failed first load), so a taker never races its
/// removal. A taker that waited on a directory removed meanwhile (by `unload`) finds the lock it
/// got is no longer the path's, and looks again.
pub struct Lock {
    _dir: Flock<File>,
}

/// The directory under the pin path whose lock says a change is waiting (see `Lock`).
const INTENT_DIR: &str = "intent";

/// What locking a directory came to.
enum Locked {
    Held(Flock<File>),
    /// Nothing at the path.
    Missing,
    /// The locked directory was removed (and perhaps made again) while this waited.
    Replaced,
}

fn lock_dir(dir: &Path, how: FlockArg) -> Result<Locked> {
    use std::os::unix::fs::MetadataExt;
    let file = match File::open(dir) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Locked::Missing),
        Err(e) => return Err(e).with_context(|| format!("opening {}", dir.display())),
    };
    let locked = Flock::lock(file, how)
        .map_err(|(_, errno)| std::io::Error::from(errno))
        .with_context(|| format!("locking {}", dir.display()))?;
    let held = locked
        .metadata()
        .with_context(|| format!("reading {}", dir.display()))?;
    match std::fs::metadata(dir) {
        Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => Ok(Locked::Held(locked)),
        _ => Ok(Locked::Replaced),
    }
}

impl Lock {
    /// The exclusive lock, making the pin directory first (`load`).
    fn acquire_creating(pin: &PinPath) -> Result<Lock> {
        loop {
            create_private_dir(&pin.root)?;
            if let Some(lock) = Lock::take(pin, FlockArg::LockExclusive)? {
                return Ok(lock);
            }
        }
    }

    /// The lock, exclusive or shared; `None` when the pin directory is gone.
    fn take(pin: &PinPath, how: FlockArg) -> Result<Option<Lock>> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let exclusive = matches!(how, FlockArg::LockExclusive);
        loop {
            // Missing when a portwatch without it loaded the state: then no preference, as then.
            let intent = match lock_dir(&pin.intent_dir(), how)? {
                Locked::Held(intent) => Some(intent),
                Locked::Missing => None,
                Locked::Replaced => continue,
            };
            let dir = match lock_dir(&pin.root, how)? {
                Locked::Held(dir) => dir,
                Locked::Missing => return Ok(None),
                Locked::Replaced => continue,
            };
            if exclusive {
                // What is pinned under the pin path is root's alone, whoever made the directory.
                std::fs::set_permissions(&pin.root, std::fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("making {} private (mode 0700)", pin.root.display()))?;
                if intent.is_none() {
                    match std::fs::DirBuilder::new().mode(0o700).create(pin.intent_dir()) {
                        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                            return Err(e).with_context(|| format!("creating {}", pin.intent_dir().display()))
                        }
                        _ => {}
                    }
                }
            }
            return Ok(Some(Lock { _dir: dir }));
        }
    }
}

/// What a verb does with the pinned state: `Change` takes the exclusive lock, `Read` none.
/// `Snapshot` reads under the shared lock: what it reads is not halfway through a change (a
/// reset moving counts from the counter maps to the drained totals), and changes wait for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Snapshot,
    Change,
}

/// What `Pinned::create` found: the loaded state, or nothing (then the lock is held while `load`
/// creates it).
pub(crate) enum Creating {
    Loaded(Box<Pinned>),
    Empty(Fresh),
}

/// An empty pin path, locked for a first load (see `create`).
pub(crate) struct Fresh {
    pub pin: PinPath,
    /// The pin directory did not exist before the lock made it.
    pub root_created: bool,
    lock: Lock,
}

impl Fresh {
    /// Removes the pin directory (empty but for its intent directory); the lock goes with it.
    pub(crate) fn remove_dir(self) -> Result<()> {
        self.remove_intent()?;
        std::fs::remove_dir(&self.pin.root).with_context(|| format!("removing {}", self.pin.root.display()))
    }

    /// `Fresh` with what `checked` gave, or, when it is an error, the error: a first load refused
    /// before it made anything (the memory guard) leaves nothing (`abandon`).
    pub(crate) fn unless_refused<T>(self, checked: Result<T>) -> Result<(Fresh, T)> {
        match checked {
            Ok(value) => Ok((self, value)),
            Err(e) => {
                self.abandon();
                Err(e)
            }
        }
    }

    /// A first load refused before it made anything: the pin directory goes if the lock made it,
    /// and the intent directory (only a loaded state has one), so that nothing is left.
    fn abandon(self) {
        if self.root_created {
            let _ = self.remove_dir();
        } else {
            let _ = self.remove_intent();
        }
    }

    /// Removes the intent directory (see `Lock`): under the exclusive lock, nobody is making it.
    fn remove_intent(&self) -> Result<()> {
        let intent = self.pin.intent_dir();
        match std::fs::remove_dir(&intent) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", intent.display()))
            }
            _ => Ok(()),
        }
    }
}

/// The pinned state, version-checked; each map and program is opened on first use and kept.
pub struct Pinned {
    pub pin: PinPath,
    pub meta: Meta,
    /// Held as long as the state is, when opened to change it.
    lock: Option<Lock>,
    access: Access,
    watched_ports: Option<Array<MapData, u8>>,
    generations: Option<[Generation; 2]>,
    config: Option<Array<MapData, Config>>,
    stats: Option<PerCpuArray<MapData, Stats>>,
    attachments: Option<HashMap<MapData, AttachKey, Attachment>>,
    drained: Option<HashMap<MapData, PortKey, Counters>>,
    journal: Option<Array<MapData, Journal>>,
    journal_entries: Option<HashMap<MapData, JournalKey, Counters>>,
    barrier: Option<MapData>,
    programs: [Option<SchedClassifier>; 2],
}

fn open_map(pin: &PinPath, name: &str) -> Result<Map> {
    let path = pin.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// Both counter generations of the maps pinned at `pin`.
pub(crate) fn open_generations(pin: &PinPath) -> Result<[Generation; 2]> {
    let config: Array<MapData, Config> = Array::try_from(open_map(pin, map_names::CONFIG)?)?;
    let config = config.get(&0, 0).context("reading the config map")?;
    Generation::open_both(&config, |name| open_map(pin, name))
}

/// The map in `slot`, opened from its pin (with its type checked) the first time.
fn open_once<'a, T>(slot: &'a mut Option<T>, pin: &PinPath, name: &str) -> Result<&'a mut T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    if slot.is_none() {
        let map = T::try_from(open_map(pin, name)?).with_context(|| format!("pinned map {name} has another type"))?;
        *slot = Some(map);
    }
    Ok(slot.as_mut().expect("just set"))
}

impl Pinned {
    /// The pinned state at `pin`, or `NotLoaded`.
    pub fn open(pin: &PinPath, access: Access) -> Result<Pinned> {
        Pinned::probe(pin, access)?.ok_or_else(|| Error::NotLoaded(pin.root.clone()).into())
    }

    /// The pinned state at `pin`, or `None` when nothing is loaded there.
    pub fn probe(pin: &PinPath, access: Access) -> Result<Option<Pinned>> {
        // Checked before the lock, which would create the pin directory.
        if !pin.is_loaded() {
            return Ok(None);
        }
        let lock = match access {
            Access::Read => None,
            Access::Snapshot | Access::Change => {
                let how = if access == Access::Change {
                    FlockArg::LockExclusive
                } else {
                    FlockArg::LockShared
                };
                match Lock::take(pin, how)? {
                    // An `unload` ran while this waited.
                    Some(_) if !pin.is_loaded() => return Ok(None),
                    Some(lock) => Some(lock),
                    None => return Ok(None),
                }
            }
        };
        Pinned::with_lock(pin, lock, access).map(Some)
    }

    /// For `load`: the exclusive lock first (creating the pin directory), then the state if one
    /// is loaded.
    pub(crate) fn create(pin: &PinPath) -> Result<Creating> {
        let root_created = !pin.root.exists();
        let lock = Lock::acquire_creating(pin)?;
        if pin.is_loaded() {
            Ok(Creating::Loaded(Box::new(Pinned::with_lock(
                pin,
                Some(lock),
                Access::Change,
            )?)))
        } else {
            Ok(Creating::Empty(Fresh {
                pin: pin.clone(),
                root_created,
                lock,
            }))
        }
    }

    /// Gives the lock up as a `Fresh` pin path, once what was pinned is gone (see
    /// `lifecycle::remove`). `None` without the lock.
    pub(crate) fn into_fresh(self) -> Option<Fresh> {
        let pin = self.pin;
        let exclusive = self.access == Access::Change;
        self.lock.filter(|_| exclusive).map(|lock| Fresh {
            pin,
            root_created: false,
            lock,
        })
    }

    /// Opens what a first load has just pinned, under the lock it holds.
    pub(crate) fn created(fresh: Fresh) -> Result<Pinned> {
        Pinned::with_lock(&fresh.pin, Some(fresh.lock), Access::Change)
    }

    /// Refuses another layout version before reading anything else.
    fn with_lock(pin: &PinPath, lock: Option<Lock>, access: Access) -> Result<Pinned> {
        let wrong_layout = |found: String| {
            Error::Conflict(format!(
                "the state pinned at {} has layout {found}, this portwatch reads layout {LAYOUT_VERSION}: \
                 run `portwatch unload` with the portwatch that loaded it (or remove {} by hand), then load again",
                pin.root.display(),
                pin.root.display()
            ))
        };
        // A meta map whose value is not a `Meta` is another layout, whatever its bytes say.
        let meta_map: Array<MapData, Meta> =
            Array::try_from(open_map(pin, map_names::META)?).map_err(|_| wrong_layout("of another shape".into()))?;
        let meta = meta_map.get(&0, 0).context("reading the meta map")?;
        if meta.layout_version != LAYOUT_VERSION {
            return Err(wrong_layout(format!("version {}", meta.layout_version)).into());
        }
        Ok(Pinned {
            pin: pin.clone(),
            meta,
            lock,
            access,
            watched_ports: None,
            generations: None,
            config: None,
            stats: None,
            attachments: None,
            drained: None,
            journal: None,
            journal_entries: None,
            barrier: None,
            programs: [None, None],
        })
    }

    /// Whether this process holds the pin path's exclusive lock (opened with `Access::Change`).
    pub fn is_locked(&self) -> bool {
        self.access == Access::Change && self.lock.is_some()
    }

    pub fn watched_ports(&mut self) -> Result<&mut Array<MapData, u8>> {
        open_once(&mut self.watched_ports, &self.pin, map_names::WATCHED_PORTS)
    }

    /// Counter generation `generation` (only its bit 0 counts): every map it counts into. Both
    /// are opened on first use.
    pub fn generation(&mut self, generation: u32) -> Result<&mut Generation> {
        if self.generations.is_none() {
            self.generations = Some(open_generations(&self.pin)?);
        }
        let generations = self.generations.as_mut().expect("just set");
        Ok(&mut generations[generation_index(generation)])
    }

    /// The distinct-source registers of both generations, merged per port, protocol and
    /// direction: the remote addresses counted past the per-IP map since the last reset.
    pub fn sources(&mut self) -> Result<std::collections::BTreeMap<PortKey, Sketch>> {
        let mut merged: std::collections::BTreeMap<PortKey, Sketch> = Default::default();
        for generation in [0, 1] {
            self.generation(generation)?.merge_sources(&mut merged)?;
        }
        Ok(merged)
    }

    /// Every count of both generations: summed per key, they are what was counted since the last
    /// reset (a key can be in both).
    pub fn for_each_count(&mut self, mut each: impl FnMut(Key, Counters)) -> Result<()> {
        for generation in [0, 1] {
            self.generation(generation)?.for_each(&mut each)?;
        }
        Ok(())
    }

    pub fn config(&mut self) -> Result<&mut Array<MapData, Config>> {
        open_once(&mut self.config, &self.pin, map_names::CONFIG)
    }

    pub fn stats(&mut self) -> Result<&mut PerCpuArray<MapData, Stats>> {
        open_once(&mut self.stats, &self.pin, map_names::STATS)
    }

    pub fn attachments(&mut self) -> Result<&mut HashMap<MapData, AttachKey, Attachment>> {
        open_once(&mut self.attachments, &self.pin, map_names::ATTACHMENTS)
    }

    /// What resets drained, per port, protocol and direction.
    pub fn drained(&mut self) -> Result<&mut HashMap<MapData, PortKey, Counters>> {
        open_once(&mut self.drained, &self.pin, map_names::DRAINED)
    }

    /// The reset journal (see `reset`).
    pub fn journal(&mut self) -> Result<&mut Array<MapData, Journal>> {
        open_once(&mut self.journal, &self.pin, map_names::JOURNAL)
    }

    pub fn journal_entries(&mut self) -> Result<&mut HashMap<MapData, JournalKey, Counters>> {
        open_once(&mut self.journal_entries, &self.pin, map_names::JOURNAL_ENTRIES)
    }

    /// The barrier map (see `sys::wait_for_running_programs`), untyped.
    pub fn barrier(&mut self) -> Result<&MapData> {
        if self.barrier.is_none() {
            let path = self.pin.map(map_names::BARRIER);
            let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
            self.barrier = Some(data);
        }
        Ok(self.barrier.as_ref().expect("just set"))
    }

    /// The pinned program of `direction`.
    pub fn program(&mut self, direction: Direction) -> Result<&mut SchedClassifier> {
        let slot = &mut self.programs[direction as usize];
        if slot.is_none() {
            let path = self.pin.prog(direction);
            let program = SchedClassifier::from_pin(&path)
                .with_context(|| format!("opening the pinned program {}", path.display()))?;
            *slot = Some(program);
        }
        Ok(slot.as_mut().expect("just set"))
    }

    /// The generation the program writes now: 0 or 1.
    pub fn active_generation(&mut self) -> Result<u32> {
        Ok(self
            .config()?
            .get(&0, 0)
            .context("reading the config map")?
            .active_generation())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc,
        },
        time::{Duration, Instant},
    };

    use super::*;

    /// A pin directory of the test's own (flock works the same on any file system).
    struct TempPin(PinPath);

    impl TempPin {
        fn new(name: &str) -> TempPin {
            let root = std::env::temp_dir().join(format!("pw-lock-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            TempPin(PinPath::new(root))
        }
    }

    impl Drop for TempPin {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0.root);
        }
    }

    /// Three readers whose shared locks overlap without a gap (each takes it again as soon as it
    /// lets it go) until told to stop, or for 10 s: a change waiting for the lock gets it while they
    /// are still going. (Each `take` opens the directories again: to flock, another holder.)
    #[test]
    fn a_change_gets_the_lock_while_readers_keep_overlapping() {
        let pin = TempPin::new("writer");
        drop(Lock::acquire_creating(&pin.0).unwrap());
        assert!(
            pin.0.intent_dir().is_dir(),
            "the first exclusive lock makes the intent directory"
        );
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3u64)
            .map(|i| {
                let (pin, done) = (pin.0.clone(), done.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(10 * i));
                    let started = Instant::now();
                    while !done.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(10) {
                        let _shared = Lock::take(&pin, FlockArg::LockShared).unwrap().unwrap();
                        std::thread::sleep(Duration::from_millis(30));
                    }
                    // Still going when the change got the lock.
                    done.load(Ordering::SeqCst)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let waited = Instant::now();
        let change = Lock::take(&pin.0, FlockArg::LockExclusive).unwrap().unwrap();
        let waited = waited.elapsed();
        done.store(true, Ordering::SeqCst);
        drop(change);
        for reader in readers {
            assert!(
                reader.join().unwrap(),
                "the change waited for the readers to stop ({waited:?})"
            );
        }
    }

    /// A taker that waited on a pin directory removed meanwhile (an unload) finds nothing loaded,
    /// and one of a pin directory made again takes the new one's lock.
    #[test]
    fn a_lock_on_a_removed_directory_is_not_taken_for_the_new_one() {
        let pin = TempPin::new("removed");
        let held = Lock::acquire_creating(&pin.0).unwrap();
        let waiter = {
            let pin = pin.0.clone();
            std::thread::spawn(move || Lock::take(&pin, FlockArg::LockShared).unwrap().is_some())
        };
        std::thread::sleep(Duration::from_millis(50));
        std::fs::remove_dir(pin.0.intent_dir()).unwrap();
        std::fs::remove_dir(&pin.0.root).unwrap();
        drop(held);
        assert!(!waiter.join().unwrap(), "the lock of a removed pin directory");
    }
}
