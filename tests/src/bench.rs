//! The network benchmark harness (`tests/bench.sh` runs it as `bench-net`; the suite runs it once,
//! short, as `tests/bench.rs`): the same traffic through a veth pair between two throwaway
//! namespaces, with nothing watching it, with portwatch set up several ways, with nftables counting
//! per source, and with a packet capture. Every (traffic, scenario) pair is measured once per
//! round, the scenarios in alternation (A B C ... A B C ...), so a noisy neighbour hits them alike;
//! the report gives each one's median, min-max and its ratio to no monitoring in the same round.
//!
//! Traffic stays inside the namespaces: the server is 198.18.0.1 and 2001:db8::1, the client
//! 198.18.0.2, and the floods' spoofed sources are 198.19.1.0 and up, and 2001:db8:f100::100 and up
//! (never routed anywhere).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    cli::{Pw, Running},
    netns::{Bed, Netns, CLIENT_V4, SERVER_V4, SERVER_V6},
};

/// The port every traffic kind uses and every scenario watches.
pub const PORT: u16 = 5201;
/// Entries of the map in the "map full" scenario (all taken before the traffic starts).
pub const FULL_MAP_ENTRIES: u64 = 65536;
/// Live entries and watched ports of the "many" scenario.
pub const MANY_ENTRIES: u64 = 100_000;
pub const MANY_PORTS: u16 = 1000;

/// Set by the binary's SIGINT/SIGTERM handler: the run stops at the next check and cleans up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    None,
    Hook,
    Tcx,
    Tc,
    Many,
    Nftables,
    Capture,
    FullMap,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::None,
        Scenario::Hook,
        Scenario::Tcx,
        Scenario::Tc,
        Scenario::Many,
        Scenario::Nftables,
        Scenario::Capture,
        Scenario::FullMap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::None => "none",
            Scenario::Hook => "hook",
            Scenario::Tcx => "tcx",
            Scenario::Tc => "tc",
            Scenario::Many => "many",
            Scenario::Nftables => "nftables",
            Scenario::Capture => "capture",
            Scenario::FullMap => "full",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Scenario::None => "no monitoring",
            Scenario::Hook => "a do-nothing TC program, TCX (the hook's own cost)",
            Scenario::Tcx => "portwatch, TCX, 1 port",
            Scenario::Tc => "portwatch, classic tc, 1 port",
            Scenario::Many => "portwatch, TCX, 1,000 ports, 100,000 live entries",
            Scenario::Nftables => "nftables, per-source dynamic sets with counters",
            Scenario::Capture => "tcpdump -s 128 -w /dev/null 'port 5201'",
            Scenario::FullMap => "portwatch, TCX, map full (65,536 entries taken)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Traffic {
    Tcp,
    Udp64,
    Connections,
    Flood,
    Flood6,
}

impl Traffic {
    pub const ALL: [Traffic; 5] = [
        Traffic::Tcp,
        Traffic::Udp64,
        Traffic::Connections,
        Traffic::Flood,
        Traffic::Flood6,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Traffic::Tcp => "tcp",
            Traffic::Udp64 => "udp64",
            Traffic::Connections => "connections",
            Traffic::Flood => "flood",
            Traffic::Flood6 => "flood6",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Traffic::Tcp => "iperf3 TCP, one stream, offloads on",
            Traffic::Udp64 => "iperf3 UDP, 64-byte payloads, unlimited rate",
            Traffic::Connections => "short TCP connections (connect, 1 byte, close), 2 clients",
            Traffic::Flood => "spoofed UDP flood, 64-byte payloads, every packet from a new source",
            Traffic::Flood6 => "spoofed IPv6 UDP flood, 64-byte payloads, every packet from a new source",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Traffic::Tcp => "Gbit/s received",
            Traffic::Udp64 => "packets/s received",
            Traffic::Connections => "connections/s",
            Traffic::Flood | Traffic::Flood6 => "packets/s reaching UDP",
        }
    }

    /// Whether the traffic is IPv6 (`flood6`); the others go to the server's IPv4 address.
    fn is_ipv6(self) -> bool {
        self == Traffic::Flood6
    }
}

/// Distinct sources of a spoofed flood, used in turn: they fit a 65,536-entry map or nftables set.
pub const FLOOD_SOURCES: u32 = 65280;

/// A spoofed flood (`Traffic::Flood`, `Traffic::Flood6`): 64-byte UDP datagrams from a raw socket
/// to `PORT` on the server's address of one family, each from the next of `FLOOD_SOURCES` addresses
/// that differ in their last 16 bits (256 and up): 198.19.1.0 to 198.19.255.255, or
/// 2001:db8:f100::100 to 2001:db8:f100::ffff. No interface has them and the server has no route to
/// them, so it answers nothing (`flood` checks that no port unreachable left).
#[derive(Clone, Copy, Debug)]
struct Flood {
    server: IpAddr,
    /// The sources' network: the first source is this plus 256.
    sources: IpAddr,
}

impl Flood {
    const PAYLOAD: usize = 64;

    fn of(traffic: Traffic) -> Option<Flood> {
        match traffic {
            Traffic::Flood => Some(Flood {
                server: SERVER_V4.parse().expect("SERVER_V4 is an address"),
                sources: IpAddr::V4(Ipv4Addr::new(198, 19, 0, 0)),
            }),
            Traffic::Flood6 => Some(Flood {
                server: SERVER_V6.parse().expect("SERVER_V6 is an address"),
                sources: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xf100, 0, 0, 0, 0, 0)),
            }),
            Traffic::Tcp | Traffic::Udp64 | Traffic::Connections => None,
        }
    }

    /// A datagram from the sources' network address itself, the IP header included: every
    /// datagram of the flood is this one with another source (and UDP checksum).
    fn template(self) -> Vec<u8> {
        crate::netns::spoofed_udp(self.sources, self.server, 40000, PORT, Flood::PAYLOAD)
    }

    /// The byte offsets of the source address's last 16 bits and of the UDP checksum.
    fn offsets(self) -> (usize, usize) {
        match self.server {
            IpAddr::V4(_) => (14, 26),
            IpAddr::V6(_) => (22, 46),
        }
    }
}

/// The UDP checksum of a datagram whose checksum was `checksum` once a 16-bit word of what it
/// covers (the pseudo-header's source address included) goes from 0 to `word`: RFC 1624's
/// incremental update, HC' = ~(~HC + m'), with 0 sent as 0xffff (0 means "none", which IPv6
/// forbids).
fn checksum_with(checksum: u16, word: u16) -> u16 {
    let sum = u32::from(!checksum) + u32::from(word);
    let folded = (sum & 0xffff) + (sum >> 16);
    match !(folded as u16) {
        0 => 0xffff,
        c => c,
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub rounds: usize,
    /// Seconds of each traffic run (iperf3 takes whole seconds).
    pub secs: u64,
    pub scenarios: Vec<Scenario>,
    pub traffic: Vec<Traffic>,
}

impl Options {
    /// One short round of everything: what the test suite runs.
    pub fn smoke() -> Options {
        Options {
            rounds: 1,
            secs: 1,
            scenarios: Scenario::ALL.to_vec(),
            traffic: Traffic::ALL.to_vec(),
        }
    }
}

/// One measurement: the traffic's figure (in its unit) and the whole machine's busy CPU time per
/// packet that crossed the server's veth in either direction (other load on the machine included;
/// the alternation spreads it over every scenario).
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub value: f64,
    pub cpu_ns_per_packet: f64,
    pub packets: u64,
}

#[derive(Default)]
pub struct Report {
    pub samples: BTreeMap<(Traffic, Scenario), Vec<Sample>>,
}

/// Runs the benchmark. `progress` gets one line per measurement.
pub fn run(options: &Options, mut progress: impl FnMut(&str)) -> Result<Report> {
    ensure!(
        options.rounds > 0 && options.secs > 0,
        "rounds and seconds must be at least 1"
    );
    for tool in ["iperf3", "tcpdump", "nft"] {
        ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} is not installed: run .ci/bootstrap (tests/bench.sh does)"
        );
    }
    let bed = Bed::new(true)?;
    bed.accept_any_source()?;
    // Short connections: ports come back after a second (TIME_WAIT reuse), from a wide range.
    bed.client.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    bed.client
        .exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])?;
    let mut report = Report::default();
    for round in 0..options.rounds {
        for &traffic in &options.traffic {
            for &scenario in &options.scenarios {
                check_interrupt()?;
                let sample = measure(&bed, scenario, traffic, options.secs)
                    .with_context(|| format!("{} under {}", traffic.name(), scenario.name()))?;
                progress(&format!(
                    "round {}/{}: {:<11} {:<8} {:>14.3} {} ({:.0} ns CPU/packet)",
                    round + 1,
                    options.rounds,
                    traffic.name(),
                    scenario.name(),
                    sample.value,
                    traffic.unit(),
                    sample.cpu_ns_per_packet
                ));
                report.samples.entry((traffic, scenario)).or_default().push(sample);
            }
        }
    }
    Ok(report)
}

/// What a scenario keeps running during the traffic; dropping it takes the scenario down.
enum Active<'a> {
    Nothing,
    /// Dropping the object closes its TCX links: detached.
    Hook(#[allow(dead_code)] aya::Ebpf),
    Portwatch(Pw),
    Nftables(NftTable<'a>),
    Capture(Running),
}

/// The nftables scenario's table on the server, deleted on drop: loaded again into a table that
/// is still there, `nft -f` would append its rules to the chains, and every later scenario would
/// pay for them.
struct NftTable<'a>(&'a Netns);

/// The nftables scenario's table (`table inet pwbench`).
const NFT_TABLE: &str = "pwbench";

/// What a per-source set of the nftables scenario holds.
#[derive(Debug)]
struct PerSource {
    sources: u64,
    packets: u64,
    bytes: u64,
}

impl NftTable<'_> {
    /// The sources in `set` (`src4`, `src6`...) and what their counters counted.
    fn per_source(&self, set: &str) -> Result<PerSource> {
        let json = self.0.exec(&["nft", "-j", "list", "set", "inet", NFT_TABLE, set])?;
        let v: serde_json::Value = serde_json::from_str(&json).context("nft's JSON")?;
        let listed = v["nftables"]
            .as_array()
            .and_then(|items| items.iter().find_map(|item| item.get("set")))
            .with_context(|| format!("nft listed no set {set}"))?;
        // An empty set has no "elem".
        let elements = listed["elem"].as_array().map_or(&[][..], Vec::as_slice);
        let mut counted = PerSource {
            sources: elements.len() as u64,
            packets: 0,
            bytes: 0,
        };
        for element in elements {
            let counter = &element["elem"]["counter"];
            counted.packets += counter["packets"].as_u64().context("an element's packets")?;
            counted.bytes += counter["bytes"].as_u64().context("an element's bytes")?;
        }
        Ok(counted)
    }
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        let _ = self.0.exec(&["nft", "delete", "table", "inet", NFT_TABLE]);
    }
}

fn start(bed: &Bed, scenario: Scenario) -> Result<Active<'_>> {
    let port = PORT.to_string();
    Ok(match scenario {
        Scenario::None => Active::Nothing,
        Scenario::Hook => {
            let mut ebpf = aya::Ebpf::load_file(portwatch::object::NOOP_OBJECT_PATH)?;
            let prog: &mut aya::programs::SchedClassifier = ebpf.program_mut("noop").context("noop")?.try_into()?;
            prog.load()?;
            ensure!(crate::has_tcx(), "the hook scenario needs TCX");
            for direction in portwatch_common::Direction::ALL {
                crate::attach_in(&mut ebpf, "noop", &bed.server, &bed.server_if, direction)?;
            }
            Active::Hook(ebpf)
        }
        Scenario::Tcx => Active::Portwatch(Pw::load_with(&bed.server, &bed.server_if, &[&port], &["--mode", "tcx"])),
        Scenario::Tc => Active::Portwatch(Pw::load_with(&bed.server, &bed.server_if, &[&port], &["--mode", "tc"])),
        Scenario::Many => {
            let others = format!("10000-{}", 10000 + MANY_PORTS - 2);
            let max = (MANY_ENTRIES * 2).to_string();
            let pw = Pw::load_with(
                &bed.server,
                &bed.server_if,
                &[&port, &others],
                &["--mode", "tcx", "--max-entries", &max],
            );
            fill(&pw, MANY_ENTRIES)?;
            Active::Portwatch(pw)
        }
        Scenario::FullMap => {
            let max = FULL_MAP_ENTRIES.to_string();
            let pw = Pw::load_with(
                &bed.server,
                &bed.server_if,
                &[&port],
                &["--mode", "tcx", "--max-entries", &max],
            );
            fill(&pw, FULL_MAP_ENTRIES)?;
            Active::Portwatch(pw)
        }
        Scenario::Nftables => {
            crate::nft::load(bed, &nft_rules())?;
            Active::Nftables(NftTable(&bed.server))
        }
        Scenario::Capture => {
            let log = std::env::temp_dir().join(format!("pw-bench-tcpdump-{}.log", std::process::id()));
            let child = in_netns(&bed.server.name)
                .args(["tcpdump", "-i", &bed.server_if, "-nn", "-s", "128", "-w", "/dev/null"])
                .arg(format!("port {PORT}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .context("starting tcpdump")?;
            let running = Running(child);
            // Counting starts once tcpdump says it listens (bounded: 10 s).
            let started = Instant::now();
            while !std::fs::read_to_string(&log)?.contains("listening on") {
                ensure!(
                    started.elapsed() < crate::bound(10.0),
                    "tcpdump did not start in {:?}",
                    crate::bound(10.0)
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = std::fs::remove_file(&log);
            Active::Capture(running)
        }
    })
}

/// The synthetic entries written into the active generation (the map's state after that much
/// traffic from as many sources).
fn fill(pw: &Pw, entries: u64) -> Result<()> {
    let generation = pw.pinned().active_generation()?;
    crate::fill_counters(&pw.pin, generation, &crate::synthetic_entries(entries))
}

fn nft_rules() -> String {
    let mut sets = String::new();
    for (name, ty) in [
        ("src4", "ipv4_addr"),
        ("src6", "ipv6_addr"),
        ("dst4", "ipv4_addr"),
        ("dst6", "ipv6_addr"),
    ] {
        sets += &format!("  set {name} {{ type {ty}; size 65536; flags dynamic; counter; }}\n");
    }
    format!(
        "table inet {NFT_TABLE} {{\n{sets}  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         meta l4proto {{ tcp, udp }} th dport {PORT} update @src4 {{ ip saddr }}\n    \
         meta l4proto {{ tcp, udp }} th dport {PORT} update @src6 {{ ip6 saddr }}\n  }}\n  \
         chain output {{\n    type filter hook output priority 0; policy accept;\n    \
         meta l4proto {{ tcp, udp }} th sport {PORT} update @dst4 {{ ip daddr }}\n    \
         meta l4proto {{ tcp, udp }} th sport {PORT} update @dst6 {{ ip6 daddr }}\n  }}\n}}\n"
    )
}

/// After the traffic: the scenario did what it says (portwatch counted the traffic; in the full
/// map, past the per-IP map: under prefixes and ports; nftables counted it per source, in the set
/// of its family; the capture saw packets). A flood's datagrams differ only in their source, so
/// every packet counted must be one of them (its length), and in the full map every one must have
/// been counted past the per-IP map.
fn verify(active: Active, scenario: Scenario, traffic: Traffic) -> Result<()> {
    let flood_datagram = Flood::of(traffic).map(|flood| flood.template().len() as u64);
    match active {
        Active::Portwatch(pw) => {
            let stats = pw.stats();
            ensure!(stats.matched_packets > 0, "portwatch counted nothing");
            if scenario == Scenario::FullMap {
                ensure!(
                    stats.map_full_packets > 0,
                    "the map was not full: nothing was counted past the per-IP map"
                );
            }
            if let Some(len) = flood_datagram {
                ensure!(
                    stats.matched_bytes == stats.matched_packets * len,
                    "portwatch counted {} bytes in {} packets, not the flood's {len}-byte datagrams",
                    stats.matched_bytes,
                    stats.matched_packets
                );
                if scenario == Scenario::FullMap {
                    ensure!(
                        stats.map_full_packets == stats.matched_packets,
                        "only {} of the flood's {} packets were counted past the per-IP map",
                        stats.map_full_packets,
                        stats.matched_packets
                    );
                }
            }
            if scenario == Scenario::Many {
                let entries = pw.status()["counters"]["entries"]
                    .as_u64()
                    .context("status: counters.entries")?;
                ensure!(entries >= MANY_ENTRIES, "only {entries} live entries");
            }
        }
        Active::Capture(mut running) => {
            let status = running.terminate();
            ensure!(status.success(), "tcpdump ended with {status}");
        }
        Active::Nftables(table) => {
            let set = if traffic.is_ipv6() { "src6" } else { "src4" };
            let counted = table.per_source(set)?;
            ensure!(counted.packets > 0, "nftables counted nothing in {set}");
            if let Some(len) = flood_datagram {
                ensure!(
                    counted.bytes == counted.packets * len && counted.sources > 1,
                    "nftables' {set} is not the flood's {len}-byte datagrams from many sources: {counted:?}"
                );
            }
        }
        Active::Hook(_) | Active::Nothing => {}
    }
    Ok(())
}

fn measure(bed: &Bed, scenario: Scenario, traffic: Traffic, secs: u64) -> Result<Sample> {
    let active = start(bed, scenario)?;
    let before = (busy_ns()?, veth_packets(bed)?);
    let value = match traffic {
        Traffic::Tcp => {
            let v = iperf3(bed, secs, &[])?;
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .context("iperf3's end.sum_received.bits_per_second")?
                / 1e9
        }
        Traffic::Udp64 => {
            let v = iperf3(bed, secs, &["-u", "-l", "64", "-b", "0"])?;
            let sum = &v["end"]["sum"];
            let (packets, lost, seconds) = (
                sum["packets"].as_f64().context("iperf3's end.sum.packets")?,
                sum["lost_packets"].as_f64().context("iperf3's end.sum.lost_packets")?,
                sum["seconds"].as_f64().context("iperf3's end.sum.seconds")?,
            );
            (packets - lost) / seconds
        }
        Traffic::Connections => connections(bed, secs)?,
        Traffic::Flood | Traffic::Flood6 => flood(bed, secs, Flood::of(traffic).expect("a flood"))?,
    };
    let after = (busy_ns()?, veth_packets(bed)?);
    verify(active, scenario, traffic)?;
    let packets = after.1 - before.1;
    ensure!(packets > 0, "no packet crossed the veth");
    Ok(Sample {
        value,
        cpu_ns_per_packet: (after.0 - before.0) as f64 / packets as f64,
        packets,
    })
}

/// Busy CPU time of the whole machine (user, nice, system, irq, softirq: /proc/stat), in ns.
fn busy_ns() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(f.len() >= 7, "unexpected /proc/stat: {line}");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok((f[0] + f[1] + f[2] + f[5] + f[6]) * 1_000_000_000 / hz)
}

/// Packets through the server's veth, both directions (what the programs there see).
fn veth_packets(bed: &Bed) -> Result<u64> {
    let json = bed.server.ip(&["-j", "-s", "link", "show", "dev", &bed.server_if])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let stats = &v[0]["stats64"];
    Ok(stats["rx"]["packets"].as_u64().context("rx packets")?
        + stats["tx"]["packets"].as_u64().context("tx packets")?)
}

fn in_netns(name: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{name}"));
    c
}

/// One iperf3 run from the client to a one-off server; its JSON report.
fn iperf3(bed: &Bed, secs: u64, more: &[&str]) -> Result<serde_json::Value> {
    let port = PORT.to_string();
    let _server = Running(
        in_netns(&bed.server.name)
            .args(["iperf3", "-s", "-1", "-B", SERVER_V4, "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?,
    );
    // The server listens within moments; the client retries a refused connection (bounded: about
    // 2 s, scaled).
    for _ in 0..(100.0 * crate::wait_scale()) as usize {
        let out = in_netns(&bed.client.name)
            .args(["iperf3", "-c", SERVER_V4, "-B", CLIENT_V4[0], "-p", &port, "-J", "-t"])
            .arg(secs.to_string())
            .args(more)
            .output()
            .context("running iperf3 -c")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3's JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
        match v["error"].as_str() {
            None => return Ok(v),
            Some(e) if e.contains("Connection refused") => std::thread::sleep(Duration::from_millis(20)),
            Some(e) => bail!("iperf3: {e}"),
        }
        check_interrupt()?;
    }
    bail!("iperf3's server did not listen in 2 s")
}

/// Short TCP connections for `secs`: each connects, sends one byte, closes its side and waits for
/// the server's close. Two client threads, one server thread. Connections per second.
fn connections(bed: &Bed, secs: u64) -> Result<f64> {
    let listen = SocketAddr::new(SERVER_V4.parse()?, PORT);
    let listener = bed.server.enter(|| TcpListener::bind(listen))??;
    let done = AtomicBool::new(false);
    let completed = AtomicU64::new(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    std::thread::scope(|s| -> Result<()> {
        let server = s.spawn(|| -> Result<()> {
            for conn in listener.incoming() {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let mut conn = conn?;
                let mut buf = [0u8; 16];
                while conn.read(&mut buf)? > 0 {}
            }
            Ok(())
        });
        let clients: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    bed.client.enter(|| -> Result<()> {
                        // From the client's primary address (its only route), with the port
                        // chosen at connect: bind() first would pick it without TIME_WAIT reuse.
                        while Instant::now() < deadline && !INTERRUPTED.load(Ordering::Relaxed) {
                            let mut sock = TcpStream::connect(listen)?;
                            sock.write_all(b"x")?;
                            sock.shutdown(std::net::Shutdown::Write)?;
                            let mut buf = [0u8; 16];
                            while sock.read(&mut buf)? > 0 {}
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    })?
                })
            })
            .collect();
        let mut result = Ok(());
        for c in clients {
            let r = c.join().expect("client thread panicked");
            if result.is_ok() {
                result = r;
            }
        }
        // Wake the accept loop with one last connection.
        done.store(true, Ordering::Relaxed);
        let _ = bed.client.enter(|| TcpStream::connect(listen));
        server.join().expect("server thread panicked")?;
        result
    })?;
    check_interrupt()?;
    Ok(completed.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// A spoofed flood for `secs` (see `Flood`): datagrams per second that reached the server's UDP
/// layer. It checks that their checksums held there and that the server answered none of them.
fn flood(bed: &Bed, secs: u64, flood: Flood) -> Result<f64> {
    const CHECKSUM_ERRORS: [&str; 2] = ["Udp:InCsumErrors", "Udp6InCsumErrors"];
    const UNREACHABLES_SENT: [&str; 2] = ["Icmp:OutDestUnreachs", "Icmp6OutDestUnreachs"];
    let before = (
        bed.udp_received()?,
        bed.server_snmp(&CHECKSUM_ERRORS)?,
        bed.server_snmp(&UNREACHABLES_SENT)?,
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let to = nix::sys::socket::SockaddrStorage::from(SocketAddr::new(flood.server, 0));
    let template = flood.template();
    let (source_at, checksum_at) = flood.offsets();
    let template_checksum = u16::from_be_bytes([template[checksum_at], template[checksum_at + 1]]);
    let (sent, last_error) = bed.client.enter(|| -> Result<(u64, Option<nix::Error>)> {
        let family = match flood.server {
            IpAddr::V4(_) => libc::AF_INET,
            IpAddr::V6(_) => libc::AF_INET6,
        };
        // IPPROTO_RAW: the datagram is sent with the IP header it has (IPv6: IPV6_HDRINCL is
        // implied), so its source is whatever it says.
        // SAFETY: a plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut packet = template.clone();
        let (mut sent, mut last_error) = (0, None);
        let mut i: u32 = 0;
        loop {
            if i.is_multiple_of(256) && (Instant::now() >= deadline || INTERRUPTED.load(Ordering::Relaxed)) {
                break;
            }
            // The next source (round robin). IPv4: the kernel fills in the header checksum, and
            // the UDP checksum is 0 ("none"), valid for IPv4. IPv6 has no header checksum and
            // requires the UDP one, which covers the source: updated for the new last 16 bits.
            let host = (256 + i % FLOOD_SOURCES) as u16;
            packet[source_at..source_at + 2].copy_from_slice(&host.to_be_bytes());
            let checksum = match flood.server {
                IpAddr::V4(_) => 0,
                IpAddr::V6(_) => checksum_with(template_checksum, host),
            };
            packet[checksum_at..checksum_at + 2].copy_from_slice(&checksum.to_be_bytes());
            match nix::sys::socket::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                &packet,
                &to,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(_) => sent += 1,
                // A full queue (ENOBUFS) drops a datagram: part of what the flood measures.
                Err(e) => last_error = Some(e),
            }
            i = i.wrapping_add(1);
        }
        Ok((sent, last_error))
    })??;
    check_interrupt()?;
    ensure!(
        sent > 0,
        "no datagram could be sent to {}: {last_error:?}",
        flood.server
    );
    // What is still in the backlog arrives within moments.
    std::thread::sleep(Duration::from_millis(50));
    let received = bed.udp_received()? - before.0;
    let checksum_errors = bed.server_snmp(&CHECKSUM_ERRORS)? - before.1;
    ensure!(
        checksum_errors == 0,
        "{checksum_errors} of {received} datagrams had a bad UDP checksum"
    );
    let unreachables = bed.server_snmp(&UNREACHABLES_SENT)? - before.2;
    ensure!(
        unreachables == 0,
        "the server answered the flood: {unreachables} port unreachables sent"
    );
    Ok(received as f64 / started.elapsed().as_secs_f64())
}

/// The report as Markdown tables, one per traffic kind: median, min-max, the median of the
/// per-round ratios to no monitoring (min-max), and CPU time per packet.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let traffics: Vec<Traffic> = {
        let mut t: Vec<_> = report.samples.keys().map(|(t, _)| *t).collect();
        t.dedup();
        t
    };
    for traffic in traffics {
        out += &format!("\n{} ({}):\n\n", traffic.label(), traffic.unit());
        out += "| scenario | median | min-max | ratio to no monitoring (min-max) | CPU per packet |\n";
        out += "|---|---:|---:|---:|---:|\n";
        let none = report.samples.get(&(traffic, Scenario::None));
        for (&(t, scenario), samples) in &report.samples {
            if t != traffic {
                continue;
            }
            let mut values: Vec<f64> = samples.iter().map(|s| s.value).collect();
            let mut cpu: Vec<f64> = samples.iter().map(|s| s.cpu_ns_per_packet).collect();
            let (min, max) = min_max(&values);
            let ratio = match none {
                Some(none) => {
                    let mut r: Vec<f64> = samples.iter().zip(none).map(|(s, n)| s.value / n.value).collect();
                    let (lo, hi) = min_max(&r);
                    format!("{:.3} ({:.3}-{:.3})", crate::median(&mut r), lo, hi)
                }
                None => "-".into(),
            };
            out += &format!(
                "| {} | {} | {}-{} | {} | {:.0} ns |\n",
                scenario.label(),
                figure(crate::median(&mut values)),
                figure(min),
                figure(max),
                ratio,
                crate::median(&mut cpu)
            );
        }
    }
    out
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
        (lo.min(x), hi.max(x))
    })
}

/// Three significant figures for rates, with thousands separators for large ones.
fn figure(v: f64) -> String {
    if v >= 1000.0 {
        let n = v.round() as u64;
        let s = n.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each flood datagram, the template with another source and its checksum updated, is the
    /// datagram built whole from that source: right bytes, right checksum.
    #[test]
    fn a_flood_datagram_is_the_one_built_from_its_source() {
        for traffic in [Traffic::Flood, Traffic::Flood6] {
            let flood = Flood::of(traffic).unwrap();
            let template = flood.template();
            let (source_at, checksum_at) = flood.offsets();
            let template_checksum = u16::from_be_bytes([template[checksum_at], template[checksum_at + 1]]);
            for host in (0..FLOOD_SOURCES).map(|i| (256 + i) as u16) {
                let source = match flood.sources {
                    IpAddr::V4(net) => IpAddr::V4(Ipv4Addr::from(u32::from(net) + u32::from(host))),
                    IpAddr::V6(net) => IpAddr::V6(Ipv6Addr::from(u128::from(net) + u128::from(host))),
                };
                let whole = crate::netns::spoofed_udp(source, flood.server, 40000, PORT, Flood::PAYLOAD);
                let mut updated = template.clone();
                updated[source_at..source_at + 2].copy_from_slice(&host.to_be_bytes());
                updated[checksum_at..checksum_at + 2]
                    .copy_from_slice(&checksum_with(template_checksum, host).to_be_bytes());
                assert_eq!(updated, whole, "{traffic:?} from {source}");
            }
        }
    }
}
