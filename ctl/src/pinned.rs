//! The one module that knows the pinned layout (see `bpffs-layout.md`): paths, bpffs, privileges,
//! the lock, the version check, and opening each pinned map with its type.
//!
//! ```text
//! PIN_PATH/maps/<map name>             every map of the object
//! PIN_PATH/progs/ingress, progs/egress the two programs
//! PIN_PATH/links/<ifindex>-<direction> TCX links (classic tc filters are recorded in maps/attachments)
//! ```
//! Names derive from the interface index: bpffs refuses names with a dot (`eth0.100`).

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use portwatch_common::{
    map_names, AttachKey, Attachment, Config, CounterKey, Counters, Meta, Stats, DIRECTION_EGRESS, DIRECTION_INGRESS,
    LAYOUT_VERSION,
};

use crate::error::Error;

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/portwatch";
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Paths under the pin directory.
#[derive(Clone, Debug)]
pub struct PinPath {
    pub root: PathBuf,
}

pub fn direction_name(direction: u8) -> &'static str {
    if direction == DIRECTION_INGRESS {
        "ingress"
    } else {
        "egress"
    }
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
    pub fn prog(&self, direction: u8) -> PathBuf {
        self.progs_dir().join(direction_name(direction))
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    pub fn link(&self, ifindex: u32, direction: u8) -> PathBuf {
        self.links_dir()
            .join(format!("{ifindex}-{}", direction_name(direction)))
    }
    /// Whether anything of portwatch is pinned here.
    pub fn is_loaded(&self) -> bool {
        self.map(map_names::META).exists()
    }
}

/// Fails unless this process may use bpf(2) and change network configuration: root, or CAP_BPF
/// (or CAP_SYS_ADMIN) together with CAP_NET_ADMIN.
pub fn check_privileges() -> Result<()> {
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
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Permission {
            missing: missing.join(", "),
        }
        .into())
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure the pin path can live on bpffs: mounts bpffs at /sys/fs/bpf when it is not mounted
/// (these machines do not mount it at boot), and refuses a pin path outside bpffs.
pub fn ensure_bpffs(pin: &PinPath) -> Result<()> {
    let bpffs_root = Path::new(BPFFS_ROOT);
    if pin.root.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
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

/// An exclusive lock on the pin directory (flock), held until dropped. Every command that
/// changes pinned state takes it, so a cron job and a person cannot interleave; readers do not.
pub struct Lock {
    _dir: File,
}

impl Lock {
    pub fn acquire(pin: &PinPath) -> Result<Lock> {
        std::fs::create_dir_all(&pin.root).with_context(|| format!("creating {}", pin.root.display()))?;
        let dir = File::open(&pin.root).with_context(|| format!("opening {}", pin.root.display()))?;
        // SAFETY: flock on a valid fd we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", pin.root.display()));
        }
        Ok(Lock { _dir: dir })
    }
}

/// The pinned state, opened and version-checked.
pub struct Pinned {
    pub pin: PinPath,
    pub meta: Meta,
}

fn open_map(pin: &PinPath, name: &str) -> Result<Map> {
    let path = pin.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl Pinned {
    /// Opens the pinned state at `pin`, or fails with `NotLoaded`; refuses another layout version
    /// before reading anything else.
    pub fn open(pin: &PinPath) -> Result<Pinned> {
        if !pin.is_loaded() {
            return Err(Error::NotLoaded(pin.root.clone()).into());
        }
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
        Ok(Pinned { pin: pin.clone(), meta })
    }

    /// A pinned map, untyped (for batch syscalls on its fd).
    pub fn map_data(&self, name: &str) -> Result<MapData> {
        let path = self.pin.map(name);
        MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
    }
    pub fn counters_data(&self, generation: u32) -> Result<MapData> {
        self.map_data(if generation & 1 == 0 {
            map_names::COUNTERS_0
        } else {
            map_names::COUNTERS_1
        })
    }
    pub fn watched_ports(&self) -> Result<Array<MapData, u8>> {
        Ok(Array::try_from(open_map(&self.pin, map_names::WATCHED_PORTS)?)?)
    }
    pub fn counters(&self, generation: u32) -> Result<PerCpuHashMap<MapData, CounterKey, Counters>> {
        let name = if generation & 1 == 0 {
            map_names::COUNTERS_0
        } else {
            map_names::COUNTERS_1
        };
        Ok(PerCpuHashMap::try_from(open_map(&self.pin, name)?)?)
    }
    pub fn config(&self) -> Result<Array<MapData, Config>> {
        Ok(Array::try_from(open_map(&self.pin, map_names::CONFIG)?)?)
    }
    pub fn stats(&self) -> Result<PerCpuArray<MapData, Stats>> {
        Ok(PerCpuArray::try_from(open_map(&self.pin, map_names::STATS)?)?)
    }
    pub fn attachments(&self) -> Result<HashMap<MapData, AttachKey, Attachment>> {
        Ok(HashMap::try_from(open_map(&self.pin, map_names::ATTACHMENTS)?)?)
    }
    /// The directions `load` was given.
    pub fn directions(&self) -> Vec<u8> {
        directions_from_bits(self.meta.directions)
    }
}

pub fn directions_from_bits(bits: u8) -> Vec<u8> {
    let mut v = vec![];
    if bits & portwatch_common::META_DIRECTION_INGRESS != 0 {
        v.push(DIRECTION_INGRESS);
    }
    if bits & portwatch_common::META_DIRECTION_EGRESS != 0 {
        v.push(DIRECTION_EGRESS);
    }
    v
}
