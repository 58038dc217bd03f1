//! Resets that die: SIGKILL at random instants of `reset --json --output FILE` under traffic, a
//! kill in each named phase of the protocol (debug builds' `PORTWATCH_FAULT` points), and failures
//! of its syscalls. Afterwards the file has no torn line, every record has its own reset id, and
//! the records plus what is still counted equal, key by key, what the senders put on the wire. The
//! same kills in a flood-filled state, every tier of both generations full of spoofed sources:
//! exact per port, and no source, prefix or wide prefix holding more than it sent.
//!
//! Seeded: `PORTWATCH_CRASH_SEED=N` replays a run (the seed is printed); `PORTWATCH_CRASH_RUNS=N`
//! sets how many resets are killed (default 50).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::process::ExitStatusExt,
    path::Path,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use portwatch::{
    cidr::Cidr,
    generation::{Key, Remote},
};
use portwatch_common::{Counters, Direction::Ingress as IN, Tier, IPPROTO_UDP};
use portwatch_tests::{
    cli::{counters_of, rows_by_key, Pw},
    kernel_test, key, mix,
    netns::{Bed, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6},
    rng::{seed_from_env, Rng},
    TestFile,
};
use serde_json::Value;

const PORTS: [u16; 2] = [7102, 7104];
const SOURCES: [(&str, &str); 4] = [
    (CLIENT_V4[0], SERVER_V4),
    (CLIENT_V4[1], SERVER_V4),
    (CLIENT_V6[0], SERVER_V6),
    (CLIENT_V6[1], SERVER_V6),
];

/// The kill instants' PRNG: seeded from PORTWATCH_CRASH_SEED, or fresh (and printed).
fn seeded(test: &str) -> Rng {
    let seed = seed_from_env("PORTWATCH_CRASH_SEED");
    eprintln!("{test}: PORTWATCH_CRASH_SEED={seed}");
    Rng::new(seed)
}

/// What most tests here start from: a bed, portwatch loaded on its server for `PORTS` (and `more`
/// options), and a reset log named `log` (removed when dropped, before portwatch and the bed).
fn loaded(log: &str, more: &[&str]) -> (Arc<Bed>, Pw, TestFile) {
    let bed = Arc::new(Bed::new(false).unwrap());
    let pw = Pw::load_with(&bed.server, &bed.server_if, &["7102/udp", "7104/udp"], more);
    (bed, pw, TestFile::new(log))
}

/// Sends rounds of UDP (`send_round`, or another round) in a thread until stopped (bounded: 2,000
/// rounds), and returns what it sent, per key, in L3 bytes.
struct Sender {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<BTreeMap<Key, Counters>>,
}

/// A round of traffic: its number, and what it sent added per key.
type Round = fn(&Bed, usize, &mut BTreeMap<Key, Counters>);

impl Sender {
    fn start(bed: &Arc<Bed>, round: Round) -> Sender {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (bed, stop) = (bed.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut sent = BTreeMap::new();
                for n in 0..2000usize {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    round(&bed, n, &mut sent);
                }
                sent
            })
        };
        Sender { stop, thread }
    }

    fn stop(self) -> BTreeMap<Key, Counters> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

fn send_round(bed: &Bed, round: usize, sent: &mut BTreeMap<Key, Counters>) {
    for (i, (src, dst)) in SOURCES.iter().enumerate() {
        for port in PORTS {
            let payload = 100 + 10 * i + round % 7;
            let bytes = bed.send_udp(src, dst, port, 20, payload).unwrap();
            *sent.entry(key(src, port, IPPROTO_UDP, IN)).or_default() += Counters { bytes, packets: 20 };
        }
    }
}

/// The records of `log` plus what is still counted (after a last reset into the log), per key; and
/// checks the log on the way: every line a whole JSON record, every reset id once.
fn recorded_and_counted(pw: &Pw, log: &Path) -> BTreeMap<Key, Counters> {
    pw.ok(&["reset", "--json", "--output", log.to_str().unwrap()]);
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "the log ends in a torn line");
    let mut ids = BTreeSet::new();
    let mut counted: BTreeMap<Key, Counters> = BTreeMap::new();
    let last = pw.json(&["top", "--by", "ip-port", "-n", "0", "--json"]);
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a torn or broken line ({e}): {l}")))
        .collect();
    for v in records.iter().chain(std::iter::once(&last)) {
        if let Some(id) = v.get("reset_id") {
            assert!(ids.insert(id.as_str().unwrap().to_string()), "reset id {id} twice");
        }
        assert_eq!(counters_of(&v["overflow"]), Counters::default());
        for (k, c) in rows_by_key(v) {
            *counted.entry(k).or_default() += c;
        }
    }
    counted
}

/// `portwatch_port_bytes_total` and `_packets_total` of each watched port (ingress, UDP) in the
/// Prometheus export: the live counters plus what resets drained, which must equal what was sent.
fn exported_per_port(pw: &Pw) -> BTreeMap<u16, Counters> {
    let text = pw.ok(&["metrics"]);
    let value = |metric: &str, port: u16| -> u64 {
        let labels = format!("{metric}{{direction=\"ingress\",port=\"{port}\",proto=\"udp\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&labels))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
    };
    PORTS
        .iter()
        .map(|&port| {
            let c = Counters {
                bytes: value("portwatch_port_bytes_total", port),
                packets: value("portwatch_port_packets_total", port),
            };
            (port, c)
        })
        .collect()
}

fn per_port(sent: &BTreeMap<Key, Counters>) -> BTreeMap<u16, Counters> {
    let mut out: BTreeMap<u16, Counters> = PORTS.iter().map(|p| (*p, Counters::default())).collect();
    for (k, c) in sent {
        *out.entry(k.port).or_default() += *c;
    }
    out
}

fn interrupted_state(pw: &Pw) -> Option<String> {
    let status: Value = serde_json::from_str(&pw.ok(&["status", "--json"])).unwrap();
    status["reset_interrupted"]["state"].as_str().map(str::to_string)
}

/// How many resets the tests kill at random instants: `PORTWATCH_CRASH_RUNS`, default 50.
fn crash_runs() -> usize {
    std::env::var("PORTWATCH_CRASH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50)
}

/// When to kill a reset of `pw` into `log`: from most of the time a command takes to get going
/// here (a reader that opens the state) to 1.5 times a whole reset, where the reset does its work
/// (under emulation, starting a process is most of a reset's time). Measured before the traffic
/// starts.
struct KillWindow {
    startup: Duration,
    window: Duration,
    reset_time: Duration,
}

impl KillWindow {
    fn measure(pw: &Pw, log: &TestFile) -> KillWindow {
        let mean = |args: &[&str]| {
            let started = Instant::now();
            for _ in 0..5 {
                pw.ok(args);
            }
            started.elapsed() / 5
        };
        let startup = mean(&["top", "-n", "1", "--json"]) * 4 / 5;
        let reset_time = mean(&["reset", "--json", "--output", log.as_str()]);
        KillWindow {
            startup,
            window: (reset_time * 3 / 2).saturating_sub(startup),
            reset_time,
        }
    }
}

/// `runs` `reset --json --output LOG`, each killed with SIGKILL at a random instant of `when`, each
/// followed by a normal reset into the same file, which must finish what the killed one left. Some
/// kills must land inside a reset (the journal shows it), or nothing was tested. Returns where the
/// kills left the journal.
fn kill_resets_at_random_instants(
    pw: &Pw,
    log: &TestFile,
    rng: &mut Rng,
    runs: usize,
    when: &KillWindow,
) -> BTreeMap<String, usize> {
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..runs {
        let mut child = pw
            .command(&["reset", "--json", "--output", log.as_str()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = when.startup + Duration::from_micros(rng.below(when.window.as_micros().max(1) as usize) as u64);
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().unwrap();
        let state = match status.signal() {
            Some(9) => interrupted_state(pw).unwrap_or_else(|| "none (before or after)".into()),
            _ => "finished before the kill".into(),
        };
        *landed.entry(state).or_default() += 1;
        pw.ok(&["reset", "--json", "--output", log.as_str()]);
        assert_eq!(
            interrupted_state(pw),
            None,
            "a reset after a crash finishes what it left"
        );
    }
    eprintln!(
        "start {:?}, reset {:?}; where the {runs} kills left the journal: {landed:?}",
        when.startup, when.reset_time
    );
    let inside: usize = landed
        .iter()
        .filter(|(state, _)| !state.starts_with("none") && !state.starts_with("finished"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        inside * 10 >= runs,
        "only {inside} of {runs} kills landed inside a reset: {landed:?}"
    );
    landed
}

/// 50 `reset --json --output FILE` runs (PORTWATCH_CRASH_RUNS), each killed with SIGKILL at a
/// random instant within about one reset's duration, each followed by a normal reset into the same
/// file, while UDP flows from four sources to two watched ports. Some kills must land inside a
/// reset (the journal shows it), or the test tested nothing.
#[kernel_test]
fn resets_killed_at_random_instants_lose_and_double_count_nothing() {
    let mut rng = seeded("resets_killed_at_random_instants");
    let (bed, pw, log) = loaded("killed.jsonl", &[]);
    let when = KillWindow::measure(&pw, &log);
    let sender = Sender::start(&bed, send_round);
    kill_resets_at_random_instants(&pw, &log, &mut rng, crash_runs(), &when);
    let sent = sender.stop();
    std::thread::sleep(portwatch_tests::bound(0.2));
    assert_eq!(exported_per_port(&pw), per_port(&sent), "the export's per-port totals");
    assert_eq!(recorded_and_counted(&pw, &log.path), sent);
}

/// The phases of a reset a kill can stop it in (`PORTWATCH_FAULT=reset:PHASE=kill`), in order,
/// with what `status` then says of the reset it interrupted.
const RESET_PHASES: [(&str, Option<&str>); 11] = [
    ("locked", None),
    ("prepared", Some("prepared")),
    ("flipped", Some("prepared")),
    ("waiting", Some("prepared")),
    ("draining", Some("prepared")),
    ("writing", Some("writing")),
    ("fsync", Some("written")),
    ("committed", Some("committed")),
    ("deleting", Some("committed")),
    ("deleted", Some("deleted")),
    ("subtracting", Some("subtracting")),
];

/// `reset --json --output LOG`, killed at `phase` (`PORTWATCH_FAULT`), which it must reach.
fn reset_killed_at(pw: &Pw, log: &TestFile, phase: &str) {
    let out = pw
        .command(&["reset", "--json", "--output", log.as_str()])
        .env("PORTWATCH_FAULT", format!("reset:{phase}=kill"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(9),
        "the reset did not reach {phase}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A kill in each named phase, under traffic, with stale entries in the idle generation (a reset
/// killed after its flip leaves the traffic that follows there): `status` names the phase, the
/// next reset finishes or rolls it back, and nothing is lost or doubled.
#[kernel_test]
fn a_kill_in_each_phase_of_a_reset_loses_and_doubles_nothing() {
    let (bed, pw, log) = loaded("phases.jsonl", &[]);
    let mut sent = BTreeMap::new();
    let mut round = 0;
    let mut send = |sent: &mut BTreeMap<Key, Counters>| {
        send_round(&bed, round, sent);
        round += 1;
    };
    let killed_at = |phase: &str| reset_killed_at(&pw, &log, phase);
    for (phase, state) in RESET_PHASES {
        send(&mut sent);
        // Killed after its flip: what is sent next lands in the generation that is idle again once
        // the next command rolls that reset back.
        killed_at("draining");
        send(&mut sent);
        killed_at(phase);
        assert_eq!(interrupted_state(&pw).as_deref(), state, "killed at {phase}");
        let text = std::fs::read_to_string(&log.path).unwrap_or_default();
        if phase == "writing" {
            assert!(!text.ends_with('\n'), "killed at writing: the record is half written");
        }
        send(&mut sent);
        let r = pw.run(&["reset", "--json", "--output", log.as_str()]);
        assert_eq!(r.code, 0, "after a kill at {phase}: {}", r.stderr);
        if state.is_some() {
            assert!(
                r.stderr.contains("rolled back reset") || r.stderr.contains("finished reset"),
                "after a kill at {phase}, the next reset says what it did: {}",
                r.stderr
            );
        }
        assert_eq!(interrupted_state(&pw), None);
        // The export's per-port totals never lost or doubled what the resets drained.
        assert_eq!(exported_per_port(&pw), per_port(&sent), "after a kill at {phase}");
    }
    assert_eq!(recorded_and_counted(&pw, &log.path), sent);
}

/// `load` of the tiered test: a per-IP map of 64 keys, a prefix tier of 16 and a wide prefix tier
/// of 2, so that one `spoofed_round` fills them all in whichever generation it lands, and the rest
/// of it goes to the per-port overflow.
const TIERED: [&str; 8] = [
    "--max-entries",
    "64",
    "--prefix-entries",
    "16",
    "--wide-prefix-entries",
    "2",
    "--direction",
    "ingress",
];

/// A round of the flood mix (`portwatch_tests::mix`): 400 spoofed datagrams to the two ports from
/// heavy prefixes and the spray, the same for the same round number.
fn spoofed_round(bed: &Bed, round: usize, sent: &mut BTreeMap<Key, Counters>) {
    let datagrams = mix::datagrams(&mut Rng::new(round as u64), 400, &PORTS.map(|p| (p, 1)));
    bed.send_spoofed(&datagrams).unwrap();
    mix::add_sent(sent, &datagrams);
}

/// Which tiers hold traffic in each generation of `pw`.
fn tiers_in_each_generation(pw: &Pw) -> [BTreeSet<Tier>; 2] {
    let mut pinned = pw.pinned();
    [0, 1].map(|g| {
        let mut tiers = BTreeSet::new();
        pinned
            .generation(g)
            .unwrap()
            .for_each(|key, c| {
                if c.packets > 0 {
                    tiers.extend(key.tier());
                }
            })
            .unwrap();
        tiers
    })
}

/// What the records plus the counters (`counted`, per key of every tier) may hold of what was
/// sent (`sent`, per source and port): exactly what was sent per port; and at most what was sent
/// under any key's remote, per port, at each granularity: a source's own key; a /24 or /48 (its
/// sources' keys and its own); a /16 or /32 (the same, and its prefixes'). Where a byte was counted
/// depends on which tier had room when it came, and after a reset in which generation; it is
/// counted once, under a key that holds its source.
fn assert_held_where_sent(counted: &BTreeMap<Key, Counters>, sent: &BTreeMap<Key, Counters>) {
    assert_eq!(per_port(counted), per_port(sent), "records plus counters, per port");
    for tier in [Tier::Ip, Tier::Prefix, Tier::WidePrefix] {
        // The key's remote at `tier`'s granularity, if it is that fine.
        let at_tier = |key: &Key| -> Option<(Cidr, u16)> {
            let addr = match key.remote {
                Remote::Ip(ip) => ip,
                Remote::Prefix(cidr) if cidr.tier() <= Some(tier) => cidr.addr(),
                _ => return None,
            };
            Some((Cidr::of(addr, tier.prefix4(), tier.prefix6()), key.port))
        };
        let sum = |counts: &BTreeMap<Key, Counters>| {
            let mut out: BTreeMap<(Cidr, u16), Counters> = BTreeMap::new();
            for (k, c) in counts {
                if let Some(group) = at_tier(k) {
                    *out.entry(group).or_default() += *c;
                }
            }
            out
        };
        let sent = sum(sent);
        for ((remote, port), c) in sum(counted) {
            let most = sent.get(&(remote, port)).copied().unwrap_or_default();
            assert!(
                c.bytes <= most.bytes && c.packets <= most.packets,
                "{remote} on {port}, at the {} tier: {c:?} counted, {most:?} sent",
                tier.name()
            );
        }
    }
}

/// Resets killed in a flood-filled, tiered state: every round of spoofed traffic fills the per-IP
/// map, both prefix tiers and the per-port overflow of the generation it lands in, and a reset
/// killed after its flip leaves the next round in the other one, so both are full. A kill in each
/// named phase, then 50 (PORTWATCH_CRASH_RUNS) at random instants under that traffic; each
/// followed by a reset that finishes or rolls it back. The export's per-port totals never lose or
/// double a byte; at the end the records plus the counters equal what was sent per port, and hold
/// at most what was sent under every source, prefix and wide prefix.
#[kernel_test]
fn resets_killed_in_a_tiered_flood_lose_and_double_nothing() {
    let mut rng = seeded("resets_killed_in_a_tiered_flood");
    let (bed, pw, log) = loaded("tiered.jsonl", &TIERED);
    // Spoofed sources (the tiers' floods) must reach the watched ports.
    bed.accept_any_source().unwrap();
    let mut sent = BTreeMap::new();
    // The sender's rounds are numbered from 0: these from 10,000, another traffic.
    let mut round = 10_000;
    let mut send = |sent: &mut BTreeMap<Key, Counters>| {
        spoofed_round(&bed, round, sent);
        round += 1;
    };
    let every_tier: BTreeSet<Tier> = Tier::ALL.into_iter().collect();
    for (phase, state) in RESET_PHASES {
        send(&mut sent);
        reset_killed_at(&pw, &log, "draining");
        send(&mut sent);
        assert_eq!(
            tiers_in_each_generation(&pw),
            [every_tier.clone(), every_tier.clone()],
            "before the kill at {phase}: both generations past every tier"
        );
        reset_killed_at(&pw, &log, phase);
        assert_eq!(interrupted_state(&pw).as_deref(), state, "killed at {phase}");
        send(&mut sent);
        let r = pw.run(&["reset", "--json", "--output", log.as_str()]);
        assert_eq!(r.code, 0, "after a kill at {phase}: {}", r.stderr);
        assert_eq!(interrupted_state(&pw), None);
        assert_eq!(exported_per_port(&pw), per_port(&sent), "after a kill at {phase}");
    }

    send(&mut sent);
    let when = KillWindow::measure(&pw, &log);
    let sender = Sender::start(&bed, spoofed_round);
    kill_resets_at_random_instants(&pw, &log, &mut rng, crash_runs(), &when);
    for (k, c) in sender.stop() {
        *sent.entry(k).or_default() += c;
    }
    assert_eq!(exported_per_port(&pw), per_port(&sent), "the export's per-port totals");
    let counted = recorded_and_counted(&pw, &log.path);
    let tiers: BTreeSet<Tier> = counted.keys().filter_map(Key::tier).collect();
    assert_eq!(tiers, every_tier, "the records hold every tier");
    assert_held_where_sent(&counted, &sent);
}

/// Failures rather than kills: a failing `BPF_MAP_DELETE_BATCH` (after the record is written: the
/// error says so, `status` shows the reset, the next command finishes it), a failing barrier update
/// (before: nothing zeroed), a failing fsync (the file is cut back, nothing zeroed).
#[kernel_test]
fn failing_syscalls_in_a_reset_lose_and_double_nothing() {
    let (bed, pw, log) = loaded("faults.jsonl", &[]);
    let mut sent = BTreeMap::new();
    let failing = |fault: &str| {
        let r = pw
            .command(&["reset", "--json", "--output", log.as_str()])
            .env("PORTWATCH_FAULT", fault)
            .output()
            .unwrap();
        assert_eq!(r.status.code(), Some(1), "{fault}");
        String::from_utf8_lossy(&r.stderr).into_owned()
    };

    send_round(&bed, 0, &mut sent);
    let before = std::fs::metadata(&log.path).map(|m| m.len()).unwrap_or(0);
    let stderr = failing("reset:delete-batch=eio");
    assert!(
        stderr.contains("the reset's record is written") && stderr.contains("Input/output error"),
        "{stderr}"
    );
    assert!(
        std::fs::metadata(&log.path).unwrap().len() > before,
        "the record is in the file"
    );
    assert_eq!(interrupted_state(&pw).as_deref(), Some("committed"));
    // Any command that takes the lock finishes it.
    let r = pw.run(&["ports", "add", "7106/udp"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("finished reset"), "{}", r.stderr);
    assert_eq!(interrupted_state(&pw), None);

    send_round(&bed, 1, &mut sent);
    let before = std::fs::metadata(&log.path).unwrap().len();
    let stderr = failing("reset:barrier=eio");
    assert!(stderr.contains("nothing was zeroed"), "{stderr}");
    assert_eq!(std::fs::metadata(&log.path).unwrap().len(), before);

    send_round(&bed, 2, &mut sent);
    let before = std::fs::metadata(&log.path).unwrap().len();
    let stderr = failing("reset:fsync=eio");
    assert!(
        stderr.contains("nothing was zeroed") && stderr.contains("syncing"),
        "{stderr}"
    );
    assert_eq!(std::fs::metadata(&log.path).unwrap().len(), before, "cut back");
    assert_eq!(interrupted_state(&pw), None);

    send_round(&bed, 3, &mut sent);
    assert_eq!(recorded_and_counted(&pw, &log.path), sent);
}

/// To a pipe the rule is "never lose": a reset killed after its record was printed is finished
/// (not printed again); one killed halfway through printing is rolled back, and the next reset
/// prints those counts again.
#[kernel_test]
fn a_reset_to_a_pipe_never_loses() {
    let (bed, pw, _) = loaded("pipe.jsonl", &[]);
    let mut sent = BTreeMap::new();
    send_round(&bed, 0, &mut sent);
    let total = |m: &BTreeMap<Key, Counters>| {
        let mut t = Counters::default();
        m.values().for_each(|c| t += *c);
        t
    };
    let piped = |fault: &str| {
        let out = pw
            .command(&["reset", "--json"])
            .env("PORTWATCH_FAULT", fault)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.signal(), Some(9), "{fault}");
        String::from_utf8(out.stdout).unwrap()
    };
    // Killed once the record is out: printed once, and the counts are gone from the maps.
    let printed = piped("reset:committed=kill");
    let record: Value = serde_json::from_str(printed.trim_end()).unwrap();
    assert_eq!(counters_of(&record["totals"]), total(&sent));
    assert_eq!(interrupted_state(&pw).as_deref(), Some("committed"));
    let again = pw.json(&["reset", "--json"]);
    assert_eq!(counters_of(&again["totals"]), Counters::default());

    // Killed halfway through printing: rolled back, printed again by the next reset.
    let mut more = BTreeMap::new();
    send_round(&bed, 1, &mut more);
    let half = piped("reset:writing=kill");
    assert!(!half.ends_with('\n'), "{half}");
    assert_eq!(interrupted_state(&pw).as_deref(), Some("writing"));
    let again = pw.json(&["reset", "--json"]);
    assert_eq!(counters_of(&again["totals"]), total(&more));
}

/// What the kernel has of this state's two programs on `ifaces` of `ns`: (interface, direction,
/// "tcx" or "tc"). TCX from `BPF_PROG_QUERY`, tc filters from `bpftool net`.
fn kernel_attachments(
    ns: &portwatch_tests::netns::Netns,
    ifaces: &[&str],
    ids: &[u64],
) -> BTreeSet<(String, String, String)> {
    use aya::programs::{tc::TcAttachType, SchedClassifier};
    let mut out = BTreeSet::new();
    for iface in ifaces {
        for (attach, dir) in [(TcAttachType::Ingress, "ingress"), (TcAttachType::Egress, "egress")] {
            let progs = ns
                .enter(|| SchedClassifier::query_tcx(iface, attach))
                .unwrap()
                // A kernel without TCX: nothing attached that way.
                .map(|(_, progs)| progs)
                .unwrap_or_default();
            for p in progs {
                if ids.contains(&u64::from(p.id())) {
                    out.insert((iface.to_string(), dir.to_string(), "tcx".to_string()));
                }
            }
        }
    }
    let net: Value = serde_json::from_str(&ns.exec(&["bpftool", "-j", "net", "show"]).unwrap()).unwrap();
    for tc in net[0]["tc"].as_array().into_iter().flatten() {
        let id = tc["id"].as_u64().or(tc["prog_id"].as_u64()).unwrap_or(0);
        let iface = tc["devname"].as_str().unwrap_or("").to_string();
        if ids.contains(&id) && ifaces.contains(&iface.as_str()) {
            let dir = tc["kind"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches("clsact/")
                .to_string();
            out.insert((iface, dir, "tc".to_string()));
        }
    }
    out
}

/// What `status --json` says is attached (in the kernel), what it says is pending, and the
/// programs' ids; `None` when nothing is loaded.
type Said = (BTreeSet<(String, String, String)>, BTreeSet<(String, String)>, Vec<u64>);

fn status_says(pw: &Pw) -> Option<Said> {
    let r = pw.run(&["status", "--json"]);
    assert_eq!(r.code, 0, "status: {}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    if v["loaded"] != true {
        return None;
    }
    let mut attached = BTreeSet::new();
    let mut pending = BTreeSet::new();
    for a in v["attachments"].as_array().unwrap() {
        let (iface, dir) = (
            a["interface"].as_str().unwrap().to_string(),
            a["direction"].as_str().unwrap().to_string(),
        );
        if a["pending"] == true {
            pending.insert((iface, dir));
        } else if a["attached"] == true {
            attached.insert((iface, dir, a["mode"].as_str().unwrap().to_string()));
        }
    }
    let ids = v["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    Some((attached, pending, ids))
}

/// SIGKILL at random instants of `load`, `attach`, `detach`, `ports`, `apply` and `unload` (50
/// runs, PORTWATCH_CRASH_RUNS; seeded): right after each kill `status` tells the truth (what it
/// says is attached is exactly what the kernel has, but for attachments it reports as pending; a
/// half-done unload is reported as such), the same command run again completes, and then status
/// and kernel agree exactly, with a TCX link pin for every TCX attachment. At the end `unload`
/// leaves no pin, link, filter or clsact qdisc.
#[kernel_test]
fn lifecycle_commands_killed_at_random_instants_leave_nothing_half_done() {
    let mut rng = seeded("lifecycle_commands_killed");
    let runs = crash_runs();
    let bed = Arc::new(Bed::new(false).unwrap());
    let pw = Pw::new(Some(&bed.server));
    let ifaces = ["lo", bed.server_if.as_str()];
    let config = TestFile::new("lifecycle.yaml");
    std::fs::write(
        &config.path,
        format!(
            "pin_path: {}\nports: [443, 7102/udp]\ninterfaces:\n  - name: {}\n  - name: lo\n    mode: tc\n",
            pw.pin.display(),
            bed.server_if
        ),
    )
    .unwrap();
    let server_if = bed.server_if.clone();
    let commands: Vec<(Vec<&str>, &[i32])> = vec![
        (vec!["load", "--iface", &server_if, "--port", "443"], &[0]),
        (vec!["attach", "lo", "--mode", "tc"], &[0, 4]),
        (vec!["detach", "lo"], &[0, 4, 6]),
        (vec!["detach", &server_if], &[0, 4, 6]),
        (vec!["ports", "add", "8080"], &[0, 4]),
        (vec!["ports", "del", "8080"], &[0, 2, 4]),
        (vec!["apply", "-f", config.as_str()], &[0]),
        (vec!["unload"], &[0]),
    ];
    // How long the slowest of them takes here: kills land within 1.2 times that.
    let started = Instant::now();
    pw.ok(&["apply", "-f", config.as_str()]);
    pw.ok(&["unload"]);
    let slowest = started.elapsed();
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    // How long each command's last run that finished took: kills land within 1.2 times that (a
    // command that got faster, like `ports` with a batch read, is followed down).
    let mut took: Vec<Duration> = vec![slowest / 8; commands.len()];
    let mut kills = 0;
    for run in 0..runs {
        let which = rng.below(commands.len());
        let (args, accepted) = &commands[which];
        let began = Instant::now();
        let mut child = pw
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(
            rng.below((took[which].as_micros() * 6 / 5).max(1) as usize) as u64,
        ));
        let _ = child.kill();
        let killed = child.wait().unwrap().signal() == Some(9);
        if killed {
            kills += 1;
        } else {
            took[which] = began.elapsed();
        }
        *landed
            .entry(format!("{} {}", args[0], if killed { "killed" } else { "done" }))
            .or_default() += 1;

        // The truth right after the kill.
        let r = pw.run(&["status", "--json"]);
        if r.code != 0 {
            assert!(
                args[0] == "unload" && r.stderr.contains("`portwatch unload` finishes it"),
                "run {run}, {args:?}: status failed: {}",
                r.stderr
            );
        } else if let Some((attached, pending, ids)) = status_says(&pw) {
            let kernel = kernel_attachments(&bed.server, &ifaces, &ids);
            assert!(
                attached.is_subset(&kernel),
                "run {run}, {args:?}: status {attached:?}, kernel {kernel:?}"
            );
            for (iface, dir, _) in kernel.difference(&attached) {
                assert!(
                    pending.contains(&(iface.clone(), dir.clone())),
                    "run {run}, {args:?}: {iface} {dir} is attached but status does not say so"
                );
            }
        }

        // The same command again completes.
        let r = pw.run(args);
        assert!(
            accepted.contains(&r.code),
            "run {run}: {args:?} again: exit {}: {}",
            r.code,
            r.stderr
        );
        if let Some((attached, pending, ids)) = status_says(&pw) {
            assert!(pending.is_empty(), "run {run}: {pending:?}");
            let kernel = kernel_attachments(&bed.server, &ifaces, &ids);
            assert_eq!(attached, kernel, "run {run}, after {args:?} again");
            let tcx = attached.iter().filter(|(_, _, m)| m == "tcx").count();
            let links = std::fs::read_dir(pw.pin.join("links")).map(|d| d.count()).unwrap_or(0);
            assert_eq!(links, tcx, "run {run}: link pins");
        }
    }
    eprintln!("{landed:?}");
    assert!(
        kills * 4 >= runs,
        "only {kills} of {runs} commands were killed before they finished"
    );
    let r = pw.run(&["unload"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        !pw.pin.exists(),
        "pins left: {:?}",
        std::fs::read_dir(&pw.pin).map(|d| d.count())
    );
    for iface in ifaces {
        let qdiscs = bed.server.exec(&["tc", "qdisc", "show", "dev", iface]).unwrap();
        assert!(!qdiscs.contains("clsact"), "{iface}: {qdiscs}");
    }
    let net = bed.server.exec(&["bpftool", "-j", "net", "show"]).unwrap();
    assert!(!net.contains("portwatch"), "{net}");
}

/// A kill at each named point of `load`, `attach` (TCX and tc), `detach` and `unload`: `status`
/// tells the truth (debris of a load is not a state; an interrupted attach is pending; a half
/// unload is incomplete), the same command again completes, and status and kernel then agree.
#[kernel_test]
fn a_kill_at_each_point_of_load_attach_detach_and_unload_leaves_nothing_half_done() {
    let bed = Arc::new(Bed::new(false).unwrap());
    let pw = Pw::new(Some(&bed.server));
    let ifaces = ["lo", bed.server_if.as_str()];
    let server_if = bed.server_if.clone();
    let killed = |args: &[&str], point: &str| {
        let out = pw
            .command(args)
            .env("PORTWATCH_FAULT", format!("{point}=kill"))
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{args:?} did not reach {point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let agree = |when: &str| {
        let (attached, pending, ids) = status_says(&pw).unwrap();
        assert!(pending.is_empty(), "{when}: {pending:?}");
        assert_eq!(attached, kernel_attachments(&bed.server, &ifaces, &ids), "{when}");
    };
    let load = ["load", "--iface", server_if.as_str(), "--port", "443"];

    killed(&load, "load:before-meta");
    let r = pw.run(&["status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("not loaded") && r.stderr.contains("an interrupted load"),
        "{r:?}"
    );
    let r = pw.run(&load);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("removed") && r.stderr.contains("interrupted load"),
        "{}",
        r.stderr
    );
    agree("after load again");

    for mode in ["tc", "tcx"] {
        if mode == "tcx"
            && !portwatch_tests::tcx_available("a_kill_at_each_point_of_load_attach_detach_and_unload (its tcx half)")
        {
            continue;
        }
        for point in ["attach:recorded", "attach:made"] {
            killed(&["attach", "lo", "--mode", mode], point);
            let (attached, pending, ids) = status_says(&pw).unwrap();
            assert!(
                pending.contains(&("lo".to_string(), "ingress".to_string())),
                "{mode} {point}: {pending:?}"
            );
            let kernel = kernel_attachments(&bed.server, &ifaces, &ids);
            let made = kernel.contains(&("lo".to_string(), "ingress".to_string(), mode.to_string()));
            assert_eq!(made, point == "attach:made", "{mode} {point}: {kernel:?}");
            assert!(attached.is_subset(&kernel));
            let r = pw.run(&["attach", "lo", "--mode", mode]);
            assert_eq!(r.code, 0, "{}", r.stderr);
            assert!(r.stderr.contains("interrupted attach"), "{}", r.stderr);
            agree(&format!("{mode} {point}, attached again"));
            killed(&["detach", "lo"], "detach:detached");
            let r = pw.run(&["detach", "lo"]);
            assert!([0, 6].contains(&r.code), "{}", r.stderr);
            agree(&format!("{mode} {point}, detached again"));
            let qdiscs = bed.server.exec(&["tc", "qdisc", "show", "dev", "lo"]).unwrap();
            assert!(!qdiscs.contains("clsact"), "{mode} {point}: {qdiscs}");
        }
    }

    killed(&["unload"], "unload:removing");
    let r = pw.run(&["status"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("incomplete") && r.stderr.contains("`portwatch unload` finishes it"),
        "{}",
        r.stderr
    );
    let r = pw.run(&["unload"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!pw.pin.exists());
    let net = bed.server.exec(&["bpftool", "-j", "net", "show"]).unwrap();
    assert!(!net.contains("portwatch"), "{net}");
}

/// `unload --drain-to LOG` killed in the middle of its drain (after the record was written, and
/// halfway through writing it): the next `unload --drain-to LOG` finishes, and the log holds
/// exactly what was sent.
#[kernel_test]
fn an_unload_drain_killed_loses_and_doubles_nothing() {
    for point in ["reset:committed", "reset:writing", "reset:deleted"] {
        let (bed, pw, log) = loaded("drain.jsonl", &[]);
        let mut sent = BTreeMap::new();
        send_round(&bed, 0, &mut sent);
        pw.ok(&["reset", "--json", "--output", log.as_str()]);
        send_round(&bed, 1, &mut sent);
        let out = pw
            .command(&["unload", "--drain-to", log.as_str()])
            .env("PORTWATCH_FAULT", format!("{point}=kill"))
            .output()
            .unwrap();
        assert_eq!(out.status.signal(), Some(9), "{point}");
        let r = pw.run(&["unload", "--drain-to", log.as_str()]);
        assert_eq!(r.code, 0, "{point}: {}", r.stderr);
        assert!(!pw.pin.exists());
        let mut counted: BTreeMap<Key, Counters> = BTreeMap::new();
        for line in std::fs::read_to_string(&log.path).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{point}: {e}: {line}"));
            for r in v["rows"].as_array().unwrap() {
                let k = key(
                    r["ip"].as_str().unwrap(),
                    r["port"].as_u64().unwrap() as u16,
                    IPPROTO_UDP,
                    IN,
                );
                *counted.entry(k).or_default() += counters_of(r);
            }
        }
        assert_eq!(counted, sent, "{point}");
    }
}
