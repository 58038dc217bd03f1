//! Hostile packets: random and mutated frames (`portwatch_tests::hostile`) through the real
//! kernel program, each checked against an independent reference classifier written from
//! bpffs-layout.md's "What is parsed" (`portwatch_tests::reference`): for every frame, the one
//! `Stats` field that moved (the reason, or matched/unwatched) and by how much, the counter key and
//! its bytes and packets, and the return code, `TC_ACT_UNSPEC` (-1).
//!
//! Two runs: through `BPF_PROG_TEST_RUN` (linear skbs, every frame size and cut), and through a
//! veth pair with frames whose headers are outside the skb's linear part, the path where the
//! program reads them with `bpf_skb_load_bytes` (see the second test's comment for how).
//!
//! Seeded: a failure prints its seed; `PORTWATCH_HOSTILE_SEED=N` replays it.
//! `PORTWATCH_HOSTILE_PACKETS=N` sets how many frames go through `BPF_PROG_TEST_RUN` (default
//! 20,000; the long run is 1,000,000), and a tenth of that through the veth.

use std::collections::BTreeMap;

use portwatch::generation::Key;
use portwatch_common::{Counters, Direction, NotCounted, Stats};
use portwatch_tests::{
    hostile::{seed_from_env, watched, Generator, Sample, PAGED_SIZES, TEST_RUN_SIZES, WATCHED},
    kernel_test,
    netns::{RawSocket, Wire},
    packet::Packet,
    real_counters,
    reference::{classify, Gso, Outcome},
    Harness, LinearProbe,
};

const TC_ACT_UNSPEC: i32 = -1;
const DEFAULT_PACKETS: usize = 20_000;
/// Remote addresses come from pools of 1024 per family, so keys repeat (increments as well as
/// inserts) and the map never fills: at most 2048 remotes x 4 watched port/protocol pairs x 2
/// directions.
const MAX_ENTRIES: u32 = 1 << 15;
/// The whole counter map is compared with the expected one every this many frames.
const FULL_CHECK_EVERY: usize = 20_000;

fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .map(|s| s.trim().parse().unwrap_or_else(|_| panic!("{var}={s} is not a count")))
        .unwrap_or(default)
}

/// The `Stats` one frame must add.
fn expected_stats(outcome: &Outcome) -> Stats {
    let mut s = Stats::default();
    match outcome {
        Outcome::Counted { counters, .. } => {
            s.matched_packets = counters.packets;
            s.matched_bytes = counters.bytes;
        }
        Outcome::Unwatched => s.unwatched_packets = 1,
        Outcome::NotCounted(reason) => *s.not_counted_mut(*reason) = 1,
    }
    s
}

fn stats_sum(a: &Stats, b: &Stats) -> Stats {
    let mut sum = *a;
    sum += *b;
    sum
}

fn stats_delta(after: &Stats, before: &Stats) -> Stats {
    Stats {
        matched_packets: after.matched_packets - before.matched_packets,
        matched_bytes: after.matched_bytes - before.matched_bytes,
        unwatched_packets: after.unwatched_packets - before.unwatched_packets,
        non_ip_packets: after.non_ip_packets - before.non_ip_packets,
        unknown_l4_packets: after.unknown_l4_packets - before.unknown_l4_packets,
        fragment_packets: after.fragment_packets - before.fragment_packets,
        truncated_packets: after.truncated_packets - before.truncated_packets,
        malformed_packets: after.malformed_packets - before.malformed_packets,
        header_limit_packets: after.header_limit_packets - before.header_limit_packets,
        map_full_packets: after.map_full_packets - before.map_full_packets,
        map_full_bytes: after.map_full_bytes - before.map_full_bytes,
        overflow_missing_packets: after.overflow_missing_packets - before.overflow_missing_packets,
    }
}

fn describe(i: usize, s: &Sample) -> String {
    let hex: String = s.frame.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "frame #{i} ({} bytes, {:?}, gso {:?}): {}\n  {hex}",
        s.frame.len(),
        s.direction,
        s.gso,
        s.notes
    )
}

/// Which frames `BPF_PROG_TEST_RUN` itself refuses (EINVAL) on some kernels, before the program
/// runs: an untagged IPv4 or IPv6 frame too short for the fixed IP header (6.18 checks the
/// header of `skb->protocol`). The test accepts a refusal of these only; the real-traffic test
/// below sends them through a veth.
fn test_run_may_refuse(frame: &[u8]) -> bool {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame.len() < 14 + 20,
        0x86dd => frame.len() < 14 + 40,
        _ => false,
    }
}

fn is_einval(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<std::io::Error>().and_then(|io| io.raw_os_error()) == Some(libc::EINVAL))
}

/// Outcomes seen, by name: the run must see every one of them, or the generator has gone blind.
fn outcome_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Counted { .. } => "counted",
        Outcome::Unwatched => "unwatched",
        Outcome::NotCounted(r) => r.name(),
    }
}

#[kernel_test]
fn hostile_frames_land_where_the_reference_says() {
    let seed = seed_from_env("PORTWATCH_HOSTILE_SEED");
    let packets = env_count("PORTWATCH_HOSTILE_PACKETS", DEFAULT_PACKETS);
    let replay = format!("PORTWATCH_HOSTILE_SEED={seed} PORTWATCH_HOSTILE_PACKETS={packets}");
    eprintln!("hostile: {packets} frames, seed {seed} (replay: {replay})");

    let mut h = Harness::new(MAX_ENTRIES).unwrap();
    for (port, flags) in WATCHED {
        h.watch(port, flags).unwrap();
    }
    let mut generator = Generator::new(seed, TEST_RUN_SIZES);
    let mut expected: BTreeMap<Key, Counters> = BTreeMap::new();
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut refused = 0;
    let mut failures: Vec<String> = vec![];
    let mut before = h.stats().unwrap();
    let started = std::time::Instant::now();

    for i in 0..packets {
        let sample = generator.next_sample();
        let want = classify(&sample.frame, sample.gso, sample.direction, watched);
        match h.run_gso(sample.direction, &sample.frame, sample.gso.segs, sample.gso.size, 1) {
            Err(e) if is_einval(&e) && test_run_may_refuse(&sample.frame) => {
                refused += 1;
                continue;
            }
            Err(e) => panic!("{}: BPF_PROG_TEST_RUN failed: {e:#}", describe(i, &sample)),
            Ok(run) if run.return_code != TC_ACT_UNSPEC => failures.push(format!(
                "{}\n  returned {}, not TC_ACT_UNSPEC",
                describe(i, &sample),
                run.return_code
            )),
            Ok(_) => {}
        }
        *seen.entry(outcome_name(&want)).or_default() += 1;

        let after = h.stats().unwrap();
        let got = stats_delta(&after, &before);
        before = after;
        if got != expected_stats(&want) {
            failures.push(format!(
                "{}\n  want {want:?}\n  stats moved {got:?}",
                describe(i, &sample)
            ));
        }
        if let Outcome::Counted { key, counters } = want {
            let total = expected.entry(key).or_default();
            *total += counters;
            let in_map = h.counter(0, &key).unwrap();
            if in_map != Some(*total) {
                failures.push(format!(
                    "{}\n  want {want:?}\n  key now holds {in_map:?}, want {total:?}",
                    describe(i, &sample)
                ));
            }
        }
        if (i + 1) % FULL_CHECK_EVERY == 0 || i + 1 == packets {
            // Nothing landed under a key the reference did not name.
            let all = h.counters(0).unwrap();
            let real = real_counters(&all);
            if real != expected {
                let extra: Vec<_> = real.iter().filter(|(k, _)| !expected.contains_key(k)).collect();
                failures.push(format!(
                    "after frame #{i}: the counter map holds {} keys, {} expected; keys nobody sent: {:?}",
                    real.len(),
                    expected.len(),
                    &extra[..extra.len().min(5)]
                ));
            }
            assert!(
                all.iter()
                    .filter(|(k, _)| k.is_overflow())
                    .all(|(_, v)| *v == Counters::default()),
                "the map was never full, yet an overflow key moved"
            );
        }
        if failures.len() >= 10 {
            break;
        }
    }
    assert!(
        real_counters(&h.counters(1).unwrap()).is_empty(),
        "generation 1 was written"
    );
    let elapsed = started.elapsed();
    eprintln!(
        "hostile: {packets} frames in {:.1} s ({:.1} us each), {refused} refused by BPF_PROG_TEST_RUN; outcomes {seen:?}",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / packets as f64
    );
    assert!(
        failures.is_empty(),
        "{} frame(s) differ from the reference (seed {seed}; replay with {replay} cargo test -p portwatch-tests --test hostile):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A generator that stopped producing some outcome would pass while testing nothing there.
    if packets >= DEFAULT_PACKETS {
        let names = NotCounted::ALL.iter().map(|r| r.name()).chain(["counted", "unwatched"]);
        for name in names {
            assert!(
                seen.get(name).copied().unwrap_or(0) >= 20,
                "only {:?} frames of outcome {name} in {packets} (seed {seed}): {seen:?}",
                seen.get(name)
            );
        }
    }
}

/// A frame as the TC ingress hook of the veth's other end sees it: the kernel moves a first VLAN
/// tag into `skb->vlan_tci` before that hook (`skb_vlan_untag` in `__netif_receive_skb_core`), and
/// drops a tagged frame too short for the tag and the two bytes after it. `None`: dropped.
fn as_received(frame: &[u8]) -> Option<Vec<u8>> {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x8100 | 0x88a8 if frame.len() < 14 + 6 => None,
        0x8100 | 0x88a8 => Some([&frame[..12], &frame[16..]].concat()),
        _ => Some(frame.to_vec()),
    }
}

/// The bytes of the linear part `packet_snd` may give `frame` written with `hdr_len` asked for:
/// the whole frame when it fits in a page with the veth's 16 bytes of headroom; else `hdr_len`,
/// the Ethernet header at least, and on newer kernels (6.18 here) its VLAN tags too
/// (`packet_parse_headers` pulls them to set the network header).
fn linear_parts(frame: &[u8], hdr_len: u16) -> [u64; 2] {
    if frame.len() + 16 < 4096 {
        return [frame.len() as u64; 2];
    }
    let mut tags_end = 14;
    while matches!(
        u16::from_be_bytes([frame[tags_end - 2], frame[tags_end - 1]]),
        0x8100 | 0x88a8
    ) {
        tags_end += 4;
    }
    let asked = u64::from(hdr_len).max(14);
    [asked, asked.max(tags_end as u64)]
}

/// Where the L3 header of `frame` starts (after in-packet VLAN tags, at most two walked).
fn l3_offset(frame: &[u8]) -> usize {
    let mut at = 12;
    while at < 20 && frame.len() >= at + 2 && matches!(u16::from_be_bytes([frame[at], frame[at + 1]]), 0x8100 | 0x88a8)
    {
        at += 4;
    }
    at + 2
}

/// The `bpf_skb_load_bytes` path. `BPF_PROG_TEST_RUN` hands the program a linear skb, so the
/// parser's fallback for headers outside the linear part never runs there. Here real frames cross
/// a veth pair between two namespaces: written with an AF_PACKET socket whose virtio-net header
/// (`PACKET_VNET_HDR`) sets the linear part's size, and larger than a page (MTU 9000), so that
/// the kernel puts only the first `hdr_len` bytes (at least the Ethernet header; chosen at random
/// up to 160) in the linear part and the rest in page fragments (net/packet/af_packet.c,
/// `packet_alloc_skb`). portwatch's egress program runs on the writing end and its ingress program
/// on the other, each followed by `linear_probe` (`ctl-ebpf/src/bin/linear_probe.rs`), which
/// records every skb's length and linear length: the test asserts, frame by frame, that the skb
/// had exactly the linear part asked for (so the IP or L4 header, or part of it, was outside it)
/// and that portwatch classified and counted it as the reference says. The frames are the
/// generator's, padded past a page; the kernel's own handling is modelled where it differs from
/// the frame written (the ingress end sees a first VLAN tag moved out of the packet). Frames that
/// `BPF_PROG_TEST_RUN` refuses (untagged and shorter than the fixed IP header) cross the veth too,
/// linear. Without the fallback (`load` returning `Truncated` when a header is not linear), this
/// test fails on nearly every frame and the test-run one above still passes.
#[kernel_test]
fn paged_frames_through_a_veth_land_where_the_reference_says() {
    let seed = seed_from_env("PORTWATCH_HOSTILE_SEED");
    let paged = env_count("PORTWATCH_HOSTILE_PACKETS", DEFAULT_PACKETS) / 10;
    let replay = format!("PORTWATCH_HOSTILE_SEED={seed} PORTWATCH_HOSTILE_PACKETS={}", paged * 10);
    eprintln!("hostile through a veth: {paged} paged frames, seed {seed} (replay: {replay})");

    let wire = Wire::new(9000).unwrap();
    let mut h = Harness::new(MAX_ENTRIES).unwrap();
    for (port, flags) in WATCHED {
        h.watch(port, flags).unwrap();
    }
    h.attach(&wire.left, &wire.left_if, Direction::Egress).unwrap();
    h.attach(&wire.right, &wire.right_if, Direction::Ingress).unwrap();
    let mut probe = LinearProbe::new().unwrap();
    probe.attach(&wire.left, &wire.left_if, Direction::Egress).unwrap();
    probe.attach(&wire.right, &wire.right_if, Direction::Ingress).unwrap();
    let socket = RawSocket::new(&wire.left, &wire.left_if).unwrap();

    // (frame, hdr_len, notes)
    let mut frames: Vec<(Vec<u8>, u16, String)> = vec![];
    let mut generator = Generator::new(seed, PAGED_SIZES);
    for _ in 0..paged {
        let s = generator.next_sample();
        let r = &mut generator.rng;
        let hdr_len = if r.chance(40) { 0 } else { r.range(14, 160) as u16 };
        frames.push((s.frame, hdr_len, s.notes));
    }
    // What BPF_PROG_TEST_RUN refuses: every cut of plain packets short of the fixed IP header, and
    // the generator's own.
    for p in [
        Packet::tcp4("198.18.7.7", 40000, "198.18.0.1", 443),
        Packet::udp6("2001:db8:7::7", 40000, "2001:db8::1", 53),
    ] {
        let f = p.build();
        for len in 14..l3_offset(&f) + if f[12] == 0x08 { 20 } else { 40 } {
            frames.push((f[..len].to_vec(), 0, format!("cut={len}")));
        }
    }
    let mut short = Generator::new(seed ^ 1, TEST_RUN_SIZES);
    let mut refused = 0;
    while refused < paged / 10 + 20 {
        let s = short.next_sample();
        if test_run_may_refuse(&s.frame) {
            refused += 1;
            frames.push((s.frame, 0, s.notes));
        }
    }

    let mut expected: BTreeMap<Key, Counters> = BTreeMap::new();
    let mut failures: Vec<String> = vec![];
    let mut before = h.stats().unwrap();
    let (mut egress_seen, mut ingress_seen) = (
        probe.seen(Direction::Egress).unwrap(),
        probe.seen(Direction::Ingress).unwrap(),
    );
    let mut ip_header_not_linear = 0;
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    let started = std::time::Instant::now();
    for (i, (frame, hdr_len, notes)) in frames.iter().enumerate() {
        let what = || format!("frame #{i} ({} bytes, hdr_len {hdr_len}): {notes}", frame.len());
        let outgoing = classify(frame, Gso::default(), Direction::Egress, watched);
        let received = as_received(frame);
        let incoming = received
            .as_deref()
            .map(|f| classify(f, Gso::default(), Direction::Ingress, watched));
        socket
            .send(frame, *hdr_len)
            .unwrap_or_else(|e| panic!("{}: {e:#}", what()));

        // The egress hook ran in send(); the ingress one runs from the backlog, on this CPU's
        // softirq as a rule: wait for it (bounded).
        let want_ingress = ingress_seen.packets + u64::from(incoming.is_some());
        let deadline = std::time::Instant::now() + portwatch_tests::bound(5.0);
        let (egress_now, ingress_now) = loop {
            let e = probe.seen(Direction::Egress).unwrap();
            let g = probe.seen(Direction::Ingress).unwrap();
            if (e.packets > egress_seen.packets && g.packets >= want_ingress) || std::time::Instant::now() > deadline {
                break (e, g);
            }
            std::thread::yield_now();
        };
        if egress_now.packets != egress_seen.packets + 1 || ingress_now.packets != want_ingress {
            failures.push(format!(
                "{}\n  hooks ran {} (egress) and {} (ingress) times, want 1 and {}",
                what(),
                egress_now.packets - egress_seen.packets,
                ingress_now.packets - ingress_seen.packets,
                u64::from(incoming.is_some())
            ));
            break;
        }
        let linear = linear_parts(frame, *hdr_len);
        if egress_now.len != frame.len() as u64 || !linear.contains(&egress_now.linear) {
            failures.push(format!(
                "{}\n  the egress skb was {} bytes with {} linear, want {} with {linear:?}",
                what(),
                egress_now.len,
                egress_now.linear,
                frame.len()
            ));
        }
        if incoming.is_some()
            && ingress_now.linear < (l3_offset(frame) + 20) as u64
            && ingress_now.linear < ingress_now.len
        {
            ip_header_not_linear += 1;
        }
        egress_seen = egress_now;
        ingress_seen = ingress_now;

        let mut want = expected_stats(&outgoing);
        for outcome in [Some(outgoing), incoming].into_iter().flatten() {
            *seen.entry(outcome_name(&outcome)).or_default() += 1;
            if let Outcome::Counted { key, counters } = outcome {
                *expected.entry(key).or_default() += counters;
            }
        }
        if let Some(incoming) = &incoming {
            want = stats_sum(&want, &expected_stats(incoming));
        }
        let after = h.stats().unwrap();
        let got = stats_delta(&after, &before);
        before = after;
        if got != want {
            failures.push(format!(
                "{}\n  want egress {outgoing:?}, ingress {incoming:?}\n  stats moved {got:?}",
                what()
            ));
        }
        for outcome in [Some(outgoing), incoming].into_iter().flatten() {
            if let Outcome::Counted { key, .. } = outcome {
                let in_map = h.counter(0, &key).unwrap();
                if in_map != expected.get(&key).copied() {
                    failures.push(format!(
                        "{}\n  {outcome:?}: the key holds {in_map:?}, want {:?}",
                        what(),
                        expected.get(&key)
                    ));
                }
            }
        }
        if failures.len() >= 10 {
            break;
        }
    }
    // Nothing arrives late, and nothing landed under a key the reference did not name.
    std::thread::sleep(portwatch_tests::bound(0.2));
    if failures.is_empty() {
        assert_eq!(
            probe.seen(Direction::Ingress).unwrap(),
            ingress_seen,
            "a frame reached the ingress hook late"
        );
        assert_eq!(
            real_counters(&h.counters(0).unwrap()),
            expected,
            "the counter map (seed {seed})"
        );
    }
    let elapsed = started.elapsed();
    eprintln!(
        "hostile through a veth: {} frames in {:.1} s, {ip_header_not_linear} of them with the IP header outside the linear part at ingress; outcomes {seen:?}",
        frames.len(),
        elapsed.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} frame(s) differ (seed {seed}; replay with {replay} cargo test -p portwatch-tests --test hostile paged):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // About half the frames ask for a linear part shorter than the Ethernet and IP headers.
    assert!(
        ip_header_not_linear * 4 >= paged,
        "only {ip_header_not_linear} of {paged} paged frames had the IP header outside the linear part"
    );
}
