//! Driving the real `portwatch` binary: one process per command, as an operator would, inside a
//! test's network namespace (`nsenter --net`, which keeps the host's bpffs mount), with a pin path
//! of the test's own that is removed on drop.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use portwatch::{
    cidr::Cidr,
    generation::{Key, Remote},
    pinned::{Access, PinPath, Pinned},
};
use portwatch_common::{Counters, Direction, Stats, IPPROTO_TCP, IPPROTO_UDP};

use crate::netns::Netns;

/// `target/<profile>/portwatch`, which cargo builds before any test runs (portwatch has integration
/// tests of its own): beside a binary of this crate, or one level up from a test in `deps/`.
/// `cargo test -p portwatch-tests` alone does not rebuild it: a binary older than the sources it
/// is built from is refused rather than tested.
pub fn portwatch_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(find_portwatch_bin).clone()
}

fn find_portwatch_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let candidates = [dir.join("portwatch"), dir.parent().unwrap().join("portwatch")];
    let found = candidates.iter().find(|p| p.is_file());
    let bin = found.cloned().unwrap_or_else(|| {
        panic!(
            "{} is missing: build it with `cargo build -p portwatch` (tests/run.sh does)",
            candidates[1].display()
        )
    });
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    if let Some(newer) = ["ctl/src", "ctl/build.rs", "ctl-common/src", "ctl-ebpf/src"]
        .iter()
        .flat_map(|p| files_under(&root.join(p)))
        .find(|f| std::fs::metadata(f).and_then(|m| m.modified()).is_ok_and(|t| t > built))
    {
        panic!(
            "{} is older than {}: rebuild it with `cargo build -p portwatch` (or run tests/run.sh)",
            bin.display(),
            newer.display()
        );
    }
    bin
}

fn files_under(path: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(path) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .flat_map(|e| files_under(&e.path()))
            .collect(),
        Err(_) => vec![path.to_path_buf()],
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One portwatch installation under test: its pin path and the namespace its commands run in.
pub struct Pw {
    pub pin: PathBuf,
    netns: Option<String>,
}

/// `Pw::on_loopback`: portwatch and the namespace whose loopback it is loaded on.
pub struct OnLoopback {
    /// Declared first, so dropped (unloaded) before the namespace goes.
    pub pw: Pw,
    _ns: Netns,
}

/// The `bytes` and `packets` of a JSON row, totals or overflow object.
pub fn counters_of(v: &serde_json::Value) -> Counters {
    Counters {
        bytes: v["bytes"].as_u64().unwrap(),
        packets: v["packets"].as_u64().unwrap(),
    }
}

/// The key a row of `top --by ip-port --json` or of a reset's record is of: an `ip`; a prefix
/// tier's `cidr`, whose `tier` must be the one its length is of; or (`"tier": "port"`, neither
/// `ip` nor `cidr`) the per-port overflow. Any other shape fails, naming the row.
pub fn key_of(row: &serde_json::Value) -> Key {
    let text = |field: &str| {
        row.get(field)
            .map(|v| v.as_str().unwrap_or_else(|| panic!("{field} in {row}")))
    };
    let remote = match (text("ip"), text("cidr"), text("tier")) {
        (Some(ip), None, None) => {
            let ip: std::net::IpAddr = ip.parse().unwrap_or_else(|e| panic!("{e}: {row}"));
            Remote::Ip(match ip {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(v6) => v6.octets(),
            })
        }
        (None, Some(cidr), Some(tier)) => {
            let cidr: Cidr = cidr.parse().unwrap_or_else(|e| panic!("{e}: {row}"));
            assert_eq!(
                cidr.tier().map(|t| t.name()),
                Some(tier),
                "a row's tier is the one its prefix's length is of: {row}"
            );
            Remote::Prefix(cidr)
        }
        (None, None, Some("port")) => Remote::AnyRemote,
        _ => panic!("a row of no known shape: {row}"),
    };
    Key {
        remote,
        port: row["port"].as_u64().unwrap_or_else(|| panic!("no port: {row}")) as u16,
        proto: match text("proto") {
            Some("tcp") => IPPROTO_TCP,
            Some("udp") => IPPROTO_UDP,
            _ => panic!("no proto: {row}"),
        },
        direction: match text("direction") {
            Some("ingress") => Direction::Ingress,
            Some("egress") => Direction::Egress,
            _ => panic!("no direction: {row}"),
        },
    }
}

/// Every row of `top --by ip-port --json` or of a reset's record, by key (each key once).
pub fn rows_by_key(report: &serde_json::Value) -> BTreeMap<Key, Counters> {
    let mut out = BTreeMap::new();
    for row in report["rows"].as_array().unwrap_or_else(|| panic!("no rows: {report}")) {
        let previous = out.insert(key_of(row), counters_of(row));
        assert!(previous.is_none(), "a key twice: {row}");
    }
    out
}

/// A finished command.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Pw {
    pub fn new(netns: Option<&Netns>) -> Pw {
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/pwt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Pw {
            pin,
            netns: netns.map(|n| n.name.clone()),
        }
    }

    /// `portwatch load --iface IFACE --port SPEC...` in `netns`, which must succeed.
    pub fn load(netns: &Netns, iface: &str, ports: &[&str]) -> Pw {
        Pw::load_with(netns, iface, ports, &[])
    }

    /// `load` as `Pw::load`, with more arguments (`--mode tc`, `--max-entries N`...).
    pub fn load_with(netns: &Netns, iface: &str, ports: &[&str], more: &[&str]) -> Pw {
        let pw = Pw::new(Some(netns));
        let mut args = vec!["load", "--iface", iface];
        for port in ports {
            args.extend(["--port", port]);
        }
        args.extend_from_slice(more);
        pw.ok(&args);
        pw
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_of(&portwatch_bin(), args)
    }

    /// `command`, run by another portwatch binary (a build of another commit, for benchmarks side
    /// by side on the same pinned state).
    pub fn command_of(&self, bin: &Path, args: &[&str]) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--pin-path").arg(&self.pin).args(args);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Ran {
        let Output { status, stdout, stderr } = self.command(args).output().expect("running portwatch");
        Ran {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 0, "portwatch {args:?} failed ({}): {}", r.code, r.stderr);
        r.stdout
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json is JSON")
    }

    /// Runs a command with `--json` among `args`, which must succeed and print one JSON line.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        assert_eq!(out.lines().count(), 1, "--json is one line: {out}");
        serde_json::from_str(&out).unwrap()
    }

    /// portwatch loaded on the loopback of a namespace of its own, watching 443, with `more`
    /// arguments to `load`: for tests that fill the counter maps themselves (no traffic).
    pub fn on_loopback(role: &str, more: &[&str]) -> OnLoopback {
        let ns = Netns::new(role).unwrap();
        let pw = Pw::load_with(&ns, "lo", &["443"], more);
        OnLoopback { pw, _ns: ns }
    }

    /// The pinned state, opened from this (test) process as a reader (no lock): pins are not bound
    /// to a namespace.
    pub fn pinned(&self) -> Pinned {
        Pinned::open(&PinPath::new(&self.pin), Access::Read).expect("opening the pinned state")
    }

    /// The active generation's counters, without the overflow keys.
    pub fn counters(&self) -> BTreeMap<Key, Counters> {
        let mut pinned = self.pinned();
        let generation = pinned.active_generation().unwrap();
        crate::real_counters(
            &pinned
                .generation(generation)
                .unwrap()
                .read()
                .unwrap()
                .into_iter()
                .collect(),
        )
    }

    /// The global statistics, summed over CPUs.
    pub fn stats(&self) -> Stats {
        portwatch::maps::read_stats(self.pinned().stats().unwrap()).unwrap()
    }

    /// Every path under the pin path, sorted (empty when nothing is pinned).
    pub fn tree(&self) -> Vec<String> {
        fn walk(dir: &Path, out: &mut Vec<String>) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    out.push(e.path().display().to_string());
                    walk(&e.path(), out);
                }
            }
        }
        let mut out = vec![];
        walk(&self.pin, &mut out);
        out.sort();
        out
    }
}

impl Drop for Pw {
    fn drop(&mut self) {
        if self.pin.exists() {
            let _ = self.command(&["unload"]).output();
            let _ = std::fs::remove_dir_all(&self.pin);
        }
    }
}

/// A spawned process (a `serve`, a `watch`, a Prometheus), killed and reaped when dropped,
/// whatever the test does in between.
pub struct Running(pub std::process::Child);

impl Running {
    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("sending SIGTERM");
        self.0.wait().expect("waiting for the process")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
