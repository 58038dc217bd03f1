//! Shared helpers for portwatch's kernel tests: a loaded program to feed crafted packets to
//! (`Harness`), crafted packets (`packet`), and throwaway network namespaces joined by a veth pair
//! with real sockets on both ends (`netns`).

pub mod bench;
pub mod cli;
pub mod flood;
pub mod hostile;
pub mod mix;
pub mod netns;
pub mod nft;
pub mod packet;
pub mod reference;
pub mod rng;

/// How many times slower than a quiet host this run may be. Every bounded wait in the tests is
/// written as what a quiet host needs (with margin) and multiplied by it, through `bound`:
/// `PORTWATCH_WAIT_SCALE` (default 1). `tests/kernels.sh` sets it for kernels under emulation; set
/// it on a loaded or slow machine too. A wait that ends early (a poll) costs nothing more for it.
pub fn wait_scale() -> f64 {
    static SCALE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| match std::env::var("PORTWATCH_WAIT_SCALE") {
        Err(_) => 1.0,
        Ok(s) => match s.parse::<f64>() {
            Ok(f) if f >= 1.0 && f.is_finite() => f,
            _ => panic!("PORTWATCH_WAIT_SCALE={s:?}: give a number of at least 1"),
        },
    })
}

/// `secs` (what a quiet host needs) scaled by `wait_scale`.
pub fn bound(secs: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(secs * wait_scale())
}

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use portwatch::{
    generation::{sum, Generation, Key},
    pinned::{Access, PinPath, Pinned},
    sources::Sketch,
};
use portwatch_common::{map_names, CounterKey, Counters, Direction, PortKey, Stats, Tier, TierSizes};
/// `#[kernel_test]`: a `#[test]` that first asks `kernel_available` with its own name.
pub use portwatch_test_macros::kernel_test;

/// Kernel tests need root and a BPF-capable kernel. Outside CI a machine without them skips the
/// test with a message; under `CI=true` it fails, so nothing skips silently. `#[kernel_test]`
/// calls it at the start of every kernel test.
pub fn kernel_available(test: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("the kernel has no BTF (/sys/kernel/btf/vmlinux)")
    } else {
        None
    };
    match reason {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: kernel test cannot run under CI=true: {why}")
        }
        Some(why) => {
            say_skipped(test, &format!("{why} (set CI=true to make this a failure)"));
            false
        }
    }
}

/// `SKIPPED <test>: <why>` on the process's stderr, past the test harness's capture (which only
/// takes `print!`/`eprint!`), so that a skip shows in every run, passing or not.
fn say_skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("SKIPPED {test}: {why}\n").as_bytes());
}

/// Whether this kernel has TCX links (6.6 and later; Debian 12's 6.1 has none). Tests of TCX
/// (`#[kernel_test(tcx)]`) ask it; without TCX they are skipped with a line saying so, under
/// `CI=true` too: the one skip for a missing kernel feature, and their classic tc variants run.
pub fn tcx_available(test: &str) -> bool {
    let available = has_tcx();
    if !available {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let release = release.trim();
        say_skipped(
            test,
            &format!("kernel {release} has no TCX (its classic tc variant runs)"),
        );
    }
    available
}

/// Whether this kernel has TCX links (probed once).
pub fn has_tcx() -> bool {
    static TCX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TCX.get_or_init(|| probe_tcx().unwrap_or_else(|e| panic!("probing the kernel for TCX: {e:#}")))
}

/// Attaches portwatch's ingress program with a TCX link to the loopback of a namespace of its
/// own. A kernel without TCX refuses the link with EINVAL; any other failure is an error.
fn probe_tcx() -> Result<bool> {
    use aya::programs::{tc::TcAttachOptions, LinkOrder, TcAttachType};
    let ns = netns::Netns::new("tcx-probe")?;
    let mut h = Harness::new(16)?;
    let prog: &mut SchedClassifier = h
        .ebpf
        .program_mut(Direction::Ingress.program_name())
        .unwrap()
        .try_into()?;
    let attached = ns.enter(|| {
        prog.attach_with_options(
            "lo",
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
    })?;
    match attached {
        Ok(_) => Ok(true),
        Err(e) if has_errno(&e, libc::EINVAL) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn has_errno(e: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>().and_then(|io| io.raw_os_error()) == Some(errno) {
            return true;
        }
        source = s.source();
    }
    false
}

/// The embedded object, loaded into the kernel but attached nowhere, for `BPF_PROG_TEST_RUN`.
pub struct Harness {
    pub ebpf: Ebpf,
    /// Its counter generations, read as every reader reads them.
    generations: [Generation; 2],
}

/// `sizeof(struct __sk_buff)` and the offsets of the fields a test run may set.
const SKB_CTX_SIZE: usize = 192;
const SKB_GSO_SEGS: usize = 164;
const SKB_GSO_SIZE: usize = 176;

/// What one test run returned: the program's return code and the packet as it left the program.
pub struct Run {
    pub return_code: i32,
    pub data_out: Vec<u8>,
    pub duration: std::time::Duration,
}

impl Harness {
    pub fn new(max_entries: u32) -> Result<Self> {
        Harness::with_sizes(TierSizes::derived(max_entries))
    }

    /// With tiers of these sizes (small ones fill with a few sources).
    pub fn with_sizes(sizes: TierSizes) -> Result<Self> {
        let mut ebpf = portwatch::object::load_programs(sizes)?;
        let config: Array<_, portwatch_common::Config> = Array::try_from(ebpf.map(map_names::CONFIG).unwrap())?;
        let config = config.get(&0, 0)?;
        let mut generations = Generation::open_both(&config, |name| {
            ebpf.take_map(name).with_context(|| format!("map {name} missing"))
        })?;
        for generation in &mut generations {
            generation.ensure_overflow_keys()?;
        }
        Ok(Harness { ebpf, generations })
    }

    /// Whether `key`'s byte of the filter of `tier` in `generation` is set.
    pub fn filter_marked(&self, generation: u32, key: &CounterKey, tier: Tier) -> Result<bool> {
        self.generations[generation as usize].filter_marked(key, tier)
    }

    /// Watches `port` for the protocols in `flags` (`PROTO_TCP | PROTO_UDP`; 0 unwatches).
    pub fn watch(&mut self, port: u16, flags: u8) -> Result<()> {
        let mut ports: Array<_, u8> = Array::try_from(self.ebpf.map_mut(map_names::WATCHED_PORTS).unwrap())?;
        portwatch::maps::set_port(&mut ports, port, flags)
    }

    /// Runs the program of `direction` once on `frame`, with `gso_segs`/`gso_size` in the skb.
    pub fn run_gso(
        &mut self,
        direction: Direction,
        frame: &[u8],
        gso_segs: u32,
        gso_size: u32,
        repeat: u32,
    ) -> Result<Run> {
        let prog: &mut SchedClassifier = self.ebpf.program_mut(direction.program_name()).unwrap().try_into()?;
        let mut ctx = [0u8; SKB_CTX_SIZE];
        ctx[SKB_GSO_SEGS..SKB_GSO_SEGS + 4].copy_from_slice(&gso_segs.to_ne_bytes());
        ctx[SKB_GSO_SIZE..SKB_GSO_SIZE + 4].copy_from_slice(&gso_size.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(Run {
            return_code: result.return_value as i32,
            data_out: out,
            duration: result.duration,
        })
    }

    pub fn run(&mut self, direction: Direction, frame: &[u8]) -> Result<Run> {
        self.run_gso(direction, frame, 0, 0, 1)
    }

    fn generation(&self, generation: u32) -> &Generation {
        &self.generations[(generation & 1) as usize]
    }

    /// Counters of generation `generation` (0 or 1), summed over CPUs, overflow keys included,
    /// with what its front cache holds added: as every reader reads them.
    pub fn counters(&mut self, generation: u32) -> Result<BTreeMap<Key, Counters>> {
        Ok(self.generation(generation).read()?.into_iter().collect())
    }

    /// The counter of `key` in generation `generation`, summed over CPUs, front cache included
    /// (`None`: the counter map has no such key).
    pub fn counter(&mut self, generation: u32, key: &Key) -> Result<Option<Counters>> {
        let Some(mut value) = self.hash_counter(generation, key)? else {
            return Ok(None);
        };
        for (k, v) in self.front(generation)? {
            if k == *key {
                value += v;
            }
        }
        Ok(Some(value))
    }

    /// The counter of `key` in generation `generation`'s hash map alone (no front cache).
    pub fn hash_counter(&mut self, generation: u32, key: &Key) -> Result<Option<Counters>> {
        match self.generation(generation).hash().get(&key.counter_key(), 0) {
            Ok(values) => Ok(Some(sum(&values))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The distinct-source registers of generation `generation`, merged per port, protocol and
    /// direction.
    pub fn sources(&mut self, generation: u32) -> Result<BTreeMap<PortKey, Sketch>> {
        let mut out = BTreeMap::new();
        self.generation(generation).merge_sources(&mut out)?;
        Ok(out)
    }

    /// The owned slots of generation `generation`'s front cache, every CPU.
    pub fn front(&mut self, generation: u32) -> Result<Vec<(Key, Counters)>> {
        self.generation(generation).front_slots()
    }

    pub fn stats(&mut self) -> Result<Stats> {
        let map: PerCpuArray<_, Stats> = PerCpuArray::try_from(self.ebpf.map_mut(map_names::STATS).unwrap())?;
        portwatch::maps::read_stats(&map)
    }

    /// Zeroes every statistic and counter and makes generation 0 the active one: the program
    /// starts again from nothing, as freshly loaded, without the load (a load and two
    /// verifications take seconds under the kernel matrix's qemu). The watched ports stay.
    pub fn clear(&mut self) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut stats: PerCpuArray<_, Stats> = PerCpuArray::try_from(self.ebpf.map_mut(map_names::STATS).unwrap())?;
        stats.set(0, aya::maps::PerCpuValues::try_from(vec![Stats::default(); cpus])?, 0)?;
        for generation in &mut self.generations {
            // Every key removed (the overflow keys zeroed), their slots cleared, the hint cleared.
            let keys: Vec<Key> = generation.read()?.into_iter().map(|(k, _)| k).collect();
            generation.remove(&keys)?;
            generation.refill_filter()?;
        }
        self.set_generation(0)
    }

    /// Switches the generation the program writes to.
    pub fn set_generation(&mut self, generation: u32) -> Result<()> {
        let mut config: Array<_, portwatch_common::Config> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).unwrap())?;
        let now = config.get(&0, 0)?;
        config.set(0, portwatch_common::Config { generation, ..now }, 0)?;
        Ok(())
    }
}

impl Harness {
    /// Attaches the program of `direction` to `iface` in `ns` (see `attach_in`), so that real
    /// frames run it and land in this harness's maps.
    pub fn attach(&mut self, ns: &netns::Netns, iface: &str, direction: Direction) -> Result<()> {
        attach_in(&mut self.ebpf, direction.program_name(), ns, iface, direction)
    }
}

/// Attaches the TC program `name` of `ebpf` to `iface` of namespace `ns` in `direction`: with a
/// TCX link where the kernel has TCX, else as a filter on the interface's clsact qdisc (added if
/// missing). It stays attached until the namespace goes: a classic filter is deleted by ifindex
/// in the deleting thread's namespace, so its link is forgotten rather than dropped outside `ns`.
pub fn attach_in(ebpf: &mut Ebpf, name: &str, ns: &netns::Netns, iface: &str, direction: Direction) -> Result<()> {
    use aya::programs::{
        tc::{NlOptions, TcAttachOptions},
        LinkOrder, TcAttachType,
    };
    let tcx = has_tcx();
    let prog: &mut SchedClassifier = ebpf.program_mut(name).context("program missing")?.try_into()?;
    let attach_type = match direction {
        Direction::Ingress => TcAttachType::Ingress,
        Direction::Egress => TcAttachType::Egress,
    };
    ns.enter(|| -> Result<()> {
        if tcx {
            prog.attach_with_options(iface, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .with_context(|| format!("attaching {name} to {iface} with TCX"))?;
        } else {
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
            let id = prog
                .attach_with_options(iface, attach_type, TcAttachOptions::Netlink(NlOptions::default()))
                .with_context(|| format!("attaching {name} to {iface} with tc"))?;
            std::mem::forget(prog.take_link(id)?);
        }
        Ok(())
    })?
}

/// `ctl-ebpf/src/bin/linear_probe.rs` loaded: it records, per direction, the packets it saw and
/// the last one's length and linear length.
pub struct LinearProbe {
    ebpf: Ebpf,
}

/// What `LinearProbe` saw in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearSeen {
    pub packets: u64,
    /// `skb->len` of the last packet.
    pub len: u64,
    /// The length of its linear part.
    pub linear: u64,
}

impl LinearProbe {
    pub fn new() -> Result<LinearProbe> {
        let path = portwatch::object::LINEAR_PROBE_OBJECT_PATH;
        let mut ebpf = Ebpf::load_file(path).with_context(|| format!("loading {path}"))?;
        for name in ["linear_probe_ingress", "linear_probe_egress"] {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).context("program missing")?.try_into()?;
            prog.load().with_context(|| format!("loading {name} into the kernel"))?;
        }
        Ok(LinearProbe { ebpf })
    }

    /// Attaches the probe of `direction` to `iface` in `ns`, after what is there.
    pub fn attach(&mut self, ns: &netns::Netns, iface: &str, direction: Direction) -> Result<()> {
        let name = match direction {
            Direction::Ingress => "linear_probe_ingress",
            Direction::Egress => "linear_probe_egress",
        };
        attach_in(&mut self.ebpf, name, ns, iface, direction)
    }

    pub fn seen(&self, direction: Direction) -> Result<LinearSeen> {
        let map: Array<_, u64> = Array::try_from(self.ebpf.map("linear_seen").context("map missing")?)?;
        let at = direction as u32 * 4;
        Ok(LinearSeen {
            packets: map.get(&at, 0)?,
            len: map.get(&(at + 1), 0)?,
            linear: map.get(&(at + 2), 0)?,
        })
    }
}

/// The key of an IP address's count, as readers see it (IPv4 mapped into IPv6).
pub fn key(ip: &str, port: u16, proto: u8, direction: Direction) -> Key {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let remote_ip = match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    Key::ip(remote_ip, port, proto, direction)
}

/// The counters without the (zero) overflow keys.
pub fn real_counters(all: &BTreeMap<Key, Counters>) -> BTreeMap<Key, Counters> {
    all.iter()
        .filter(|(k, _)| !k.is_overflow())
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// Writes `entries` into counter generation `generation` of a pinned portwatch, all of each value
/// on CPU 0, with `BPF_MAP_UPDATE_BATCH` (a million entries take about a second).
/// Each key goes into its tier's map (a prefix into its prefix tier, `Key::any_remote` into the
/// per-port overflow), and the generation's filter marks them, as if the program had inserted
/// them. A zero entry is not written.
pub fn fill_counters(pin: &std::path::Path, generation: u32, entries: &[(Key, Counters)]) -> Result<()> {
    let mut pinned = Pinned::open(&PinPath::new(pin), Access::Read)?;
    let generation = pinned.generation(generation)?;
    for chunk in entries.chunks(65536) {
        generation.set(chunk)?;
    }
    generation.refill_filter()
}

/// `n` distinct remote IPs (2001:db8::<i>) on port 443/tcp ingress, with bytes a permutation of
/// 0..n (7919 is prime and coprime to the powers of ten used), one packet each.
pub fn synthetic_entries(n: u64) -> Vec<(Key, Counters)> {
    (0..n)
        .map(|i| {
            let mut ip = [0u8; 16];
            ip[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            ip[12..].copy_from_slice(&(i as u32).to_be_bytes());
            let key = Key::ip(ip, 443, portwatch_common::IPPROTO_TCP, Direction::Ingress);
            (
                key,
                Counters {
                    bytes: (i * 7919) % n,
                    packets: 1,
                },
            )
        })
        .collect()
}

/// Sets the global statistics of a pinned portwatch to `stats` (all on CPU 0, zero elsewhere).
pub fn set_stats(pin: &std::path::Path, stats: Stats) -> Result<()> {
    let mut pinned = Pinned::open(&PinPath::new(pin), Access::Read)?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let mut values = vec![Stats::default(); cpus];
    values[0] = stats;
    pinned.stats()?.set(0, aya::maps::PerCpuValues::try_from(values)?, 0)?;
    Ok(())
}

/// A file of the test's own (a configuration, a log), mode 0644, removed on drop.
pub struct TestFile {
    pub path: std::path::PathBuf,
}

impl TestFile {
    pub fn new(name: &str) -> TestFile {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pwt-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        TestFile { path }
    }

    /// Writes `text` (root's, writable by root only).
    pub fn write(&self, text: &str) -> &Self {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&self.path, text).unwrap();
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        self
    }

    pub fn as_str(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path).or_else(|_| std::fs::remove_dir(&self.path));
    }
}

/// A scratch directory of the test's own, removed with everything in it when it goes (a failing
/// test's too).
pub struct TestDir {
    pub path: std::path::PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!("pwt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }

    /// `name` in the directory.
    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Pins a small map of no one's at `path`: something else holding a pin path portwatch wants.
pub fn pin_foreign_map(path: &std::path::Path) -> Result<()> {
    netns::sh(&[
        "bpftool",
        "map",
        "create",
        path.to_str().context("a path in UTF-8")?,
        "type",
        "array",
        "key",
        "4",
        "value",
        "4",
        "entries",
        "1",
        "name",
        "foreign",
    ])
    .map(|_| ())
}

/// The JSON objects of a JSON-lines file (a reset log).
pub fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `cmd` with stdout to `out`; returns (seconds, peak RSS in MiB) of the command, for the
/// benchmarks. The peak RSS is GNU time's (`/usr/bin/time -f %M`): a child forked from this large
/// process would report this process's size as its own peak (the kernel keeps the peak of the
/// memory it had before exec), so the command is started from `time`, a small process.
pub fn measure(cmd: std::process::Command, out: std::process::Stdio) -> Result<(f64, f64)> {
    let report = std::env::temp_dir().join(format!("pw-measure-{}", std::process::id()));
    let mut timed = std::process::Command::new("/usr/bin/time");
    timed
        .args(["-f", "%M", "-o"])
        .arg(&report)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdout(out)
        .stderr(std::process::Stdio::piped());
    let started = std::time::Instant::now();
    let status = timed.status().context("running /usr/bin/time (package time)")?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "{cmd:?} failed with {status}");
    let kib: f64 = std::fs::read_to_string(&report)?.trim().parse()?;
    let _ = std::fs::remove_file(&report);
    Ok((secs, kib / 1024.0))
}

/// The median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A full map's accounting: everything the program matched (`stats.matched_*`) is `sent`, and what
/// was counted past the per-IP map (every tier but it, and the overflow keys) is exactly what
/// `stats.map_full_*` counted.
pub fn assert_past_per_ip_accounted(stats: &Stats, past_per_ip: Counters, sent: Counters) {
    assert_eq!((stats.matched_packets, stats.matched_bytes), (sent.packets, sent.bytes));
    assert_eq!(
        (stats.map_full_packets, stats.map_full_bytes),
        (past_per_ip.packets, past_per_ip.bytes),
        "stats.map_full_* account for what was counted past the per-IP map"
    );
}

/// The samples of one metric in the Prometheus text format (`portwatch metrics`): labels (as
/// written, `{direction="ingress",port="9000",proto="udp"}`) -> value.
pub fn metric_samples(text: &str, metric: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(metric))
        .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
        .map(|rest| {
            let (labels, value) = rest.rsplit_once(' ').unwrap();
            (labels.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// What `counts` holds past the per-IP map: every key but the per-IP ones.
pub fn past_per_ip(counts: &BTreeMap<Key, Counters>) -> Counters {
    counts
        .iter()
        .filter(|(k, _)| !matches!(k.remote, portwatch::generation::Remote::Ip(_)))
        .fold(Counters::default(), |acc, (_, c)| acc + *c)
}
