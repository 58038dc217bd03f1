//! Nanoseconds per packet of portwatch's kernel program under `BPF_PROG_TEST_RUN`, next to a
//! do-nothing TC program (the floor) and to programs that do only a map update (`bench_hash`: the
//! per-CPU hash lookup of a 20-byte key and an increment; `bench_cache`: the same behind
//! portwatch's front cache), from one heavy sender and from 16,384 senders in turn, all measured in
//! the same run. The kinds are interleaved round by round and the median round is reported, so a
//! noisy neighbour hits all of them alike. Three kinds run in a spoofed flood's state: on a full
//! per-IP map, a packet whose key exists, and one from a new source whose /24 the prefix tier holds;
//! with every tier full, one from a new prefix, counted under its port alone.
//!
//!     cargo run --release -p portwatch-tests --bin bench-prog -- [ROUNDS] [REPEAT]

use anyhow::{Context, Result};
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use portwatch::generation::Key;
use portwatch_common::{
    front_index, CounterKey, Direction, FrontSlot, PortKey, Tier, TierSizes, IPPROTO_TCP, IPPROTO_UDP, PROTO_ALL,
};
use portwatch_tests::{packet::Packet, Harness};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn load_single(path: &str, program: &str) -> Result<Ebpf> {
    let mut ebpf = Ebpf::load_file(path).with_context(|| format!("loading {path}"))?;
    let prog: &mut SchedClassifier = ebpf.program_mut(program).context("program missing")?.try_into()?;
    prog.load()?;
    Ok(ebpf)
}

fn run_single(ebpf: &mut Ebpf, program: &str, frame: &[u8], repeat: u32) -> Result<f64> {
    let prog: &mut SchedClassifier = ebpf.program_mut(program).unwrap().try_into()?;
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    })?;
    Ok(r.duration.as_nanos() as f64)
}

/// The key portwatch counts traffic from `ip` to port 443/`proto` under, at ingress.
fn key_443(ip: IpAddr, proto: u8) -> CounterKey {
    let octets = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    CounterKey::with_octets(octets, 443, proto, Direction::Ingress)
}

/// A packet from `ip`, port 40000, to the server's port 443/`proto`, with 100 bytes of payload.
fn to_443(ip: IpAddr, proto: u8) -> Vec<u8> {
    let src = ip.to_string();
    let packet = match (ip, proto) {
        (IpAddr::V4(_), IPPROTO_TCP) => Packet::tcp4(&src, 40000, "198.18.0.1", 443),
        (IpAddr::V4(_), _) => Packet::udp4(&src, 40000, "198.18.0.1", 443),
        (IpAddr::V6(_), IPPROTO_TCP) => Packet::tcp6(&src, 40000, "2001:db8::1", 443),
        (IpAddr::V6(_), _) => Packet::udp6(&src, 40000, "2001:db8::1", 443),
    };
    packet.payload(100).build()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(15);
    let repeat: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1_000_000);

    // Every run on one CPU: the per-CPU state (front caches, "map full" hints) is warm as on a
    // busy CPU, and a run never lands on a CPU that has not seen the set-up.
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu)?;
    let mut noop = load_single(portwatch::object::NOOP_OBJECT_PATH, "noop")?;
    let mut h = Harness::new(65536)?;
    h.watch(443, PROTO_ALL)?;
    let tcp4 = Packet::tcp4("198.18.9.9", 40000, "198.18.0.1", 443)
        .payload(100)
        .build();
    let udp6 = Packet::udp6("2001:db8:9::9", 40000, "2001:db8::1", 443)
        .payload(100)
        .build();
    let unwatched = Packet::tcp4("198.18.9.9", 40000, "198.18.0.1", 80).payload(100).build();
    // Known keys whose front slot another key took first: counted through the hash, as most keys
    // are when more than the cache's slots are live.
    let off_slot: [(IpAddr, u8); 2] = [
        (Ipv4Addr::new(198, 18, 9, 10).into(), IPPROTO_TCP),
        ("2001:db8:9::10".parse::<Ipv6Addr>()?.into(), IPPROTO_UDP),
    ];
    for (timed, proto) in off_slot {
        let taken = front_index(&key_443(timed, proto));
        let candidate = |i: u16| -> IpAddr {
            match timed {
                IpAddr::V4(_) => Ipv4Addr::from(0xc612_1400 + u32::from(i)).into(),
                IpAddr::V6(_) => Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, i).into(),
            }
        };
        let owner = (0..4096)
            .map(candidate)
            .find(|&a| front_index(&key_443(a, proto)) == taken)
            .with_context(|| format!("no owner for the front slot of {timed}"))?;
        h.run(Direction::Ingress, &to_443(owner, proto))?;
    }
    let off_slot_frames = off_slot.map(|(ip, proto)| to_443(ip, proto));
    // A full map: FULL keys, then the same packet from one of them, and from a source not in it.
    const FULL: u32 = 1024;
    let v4 = |a: u8, b: u8, c: u8, d: u8| IpAddr::from(Ipv4Addr::new(a, b, c, d));
    let filled = |i: u32| to_443(v4(198, 18, 10 + (i / 256) as u8, (i % 256) as u8), IPPROTO_TCP);
    // The timed newcomers are sources whose filter bytes are clear, as at least 15 in 16 are (a
    // byte another key set costs a lookup: that is the filter's own cost, not the path's); with a
    // random seed per load, a load where none of the candidates is clear is made again (bounded).
    let mut attempts = 0;
    let (mut full, newcomer) = loop {
        attempts += 1;
        anyhow::ensure!(attempts <= 20, "no newcomer with a clear filter byte in 20 loads");
        let mut full = Harness::new(FULL)?;
        full.watch(443, PROTO_ALL)?;
        for i in 0..FULL {
            full.run(Direction::Ingress, &filled(i))?;
        }
        // The first newcomer finds the map full (and marks its filter byte before the insert
        // that fails, and sets the hint); its /24 (198.18.14.0/24) enters the prefix tier. The
        // one timed is another source of that /24: a new source whose prefix is known, as most
        // packets of a flood from a few prefixes.
        full.run(Direction::Ingress, &filled(FULL))?;
        let clear = (1..=255u8).find(|&d| {
            !full
                .filter_marked(0, &key_443(v4(198, 18, 14, d), IPPROTO_TCP), Tier::Ip)
                .unwrap_or(true)
        });
        if let Some(d) = clear {
            break (full, to_443(v4(198, 18, 14, d), IPPROTO_TCP));
        }
    };
    let existing = filled(7);
    // Every tier full: 4 sources fill the per-IP map, two /24s the prefix tier, 2001:db8::/32 the
    // wide prefix tier; a source of another /16 then finds every tier full (and its prefixes,
    // marked before their inserts failed, set the hints). Every packet of a source from a /16 never
    // seen before goes to its port alone, without a hash lookup: a spray over more prefixes than
    // the tiers hold, in the steady state of a flood. The one timed has its three filter bytes
    // clear (the per-IP key's, its /24's and its /16's).
    let mut attempts = 0;
    let (mut tiers_full, spray) = loop {
        attempts += 1;
        anyhow::ensure!(attempts <= 20, "no spray source with clear filter bytes in 20 loads");
        let mut tiers_full = Harness::with_sizes(TierSizes {
            ip: 4,
            prefix: 2,
            wide_prefix: 1,
        })?;
        tiers_full.watch(443, PROTO_ALL)?;
        for src in [
            "198.18.1.1",
            "198.18.1.2",
            "198.18.1.3",
            "198.18.1.4",
            "198.18.1.5",
            "198.18.2.1",
        ] {
            tiers_full.run(
                Direction::Ingress,
                &Packet::tcp4(src, 40000, "198.18.0.1", 443).payload(100).build(),
            )?;
        }
        tiers_full.run(
            Direction::Ingress,
            &Packet::tcp6("2001:db8:1::1", 40000, "2001:db8::1", 443)
                .payload(100)
                .build(),
        )?;
        tiers_full.run(
            Direction::Ingress,
            &Packet::tcp4("198.18.3.1", 40000, "198.18.0.1", 443)
                .payload(100)
                .build(),
        )?;
        let clear = |k: &CounterKey| -> bool {
            [Tier::Ip, Tier::Prefix, Tier::WidePrefix].into_iter().all(|tier| {
                let masked = CounterKey {
                    remote_ip: portwatch_common::mask_remote(k.remote_ip, tier),
                    ..*k
                };
                !tiers_full.filter_marked(0, &masked, tier).unwrap_or(true)
            })
        };
        let found = (0..=255u8)
            .flat_map(|c| (1..=255u8).map(move |d| (c, d)))
            .find(|&(c, d)| clear(&key_443(v4(198, 19, c, d), IPPROTO_TCP)));
        if let Some((c, d)) = found {
            break (tiers_full, to_443(v4(198, 19, c, d), IPPROTO_TCP));
        }
    };

    let kinds = [
        "do-nothing TC program (the floor)",
        "portwatch: matched IPv4 TCP",
        "portwatch: matched IPv6 UDP",
        "portwatch: unwatched IPv4 TCP",
        "portwatch: matched IPv4 TCP, key exists, map full",
        "portwatch: matched IPv4 TCP, new source, map full, its /24 in the prefix tier",
        "portwatch: matched IPv4 TCP, new source, every tier full (its port alone)",
        "map update alone, per-CPU hash (bench_hash), one heavy sender",
        "map update alone, front cache + hash (bench_cache), one heavy sender",
        "map update alone, per-CPU hash (bench_hash), 16,384 senders in turn",
        "map update alone, front cache + hash (bench_cache), 16,384 senders in turn",
        "flood's floor: per-IP front slot (a miss), prefix front slot (bench_past_ip)",
        "flood's floor: and a distinct-source register (bench_past_ip_hll)",
        "flood's floor: and the per-IP filter byte (bench_past_ip_filter)",
        "portwatch: matched IPv4 TCP, its front slot another key's (the hash)",
        "portwatch: matched IPv6 UDP, its front slot another key's (the hash)",
    ];
    // The front-cache experiment: each program twice, one heavy sender and 16,384 in turn (16
    // times the cache's slots: few own one, most pay the slot check and then the hash).
    let mut experiment = vec![];
    for spread in [1u32, 16384] {
        for name in ["bench_hash", "bench_cache"] {
            // An object of its own for each: maps of its own.
            let mut ebpf = load_single(portwatch::object::BENCH_UPDATE_OBJECT_PATH, name)?;
            aya::maps::Array::<_, u32>::try_from(ebpf.map_mut("spread").context("spread map")?)?.set(0, spread, 0)?;
            experiment.push((ebpf, name));
        }
    }
    // The flood's floor: one heavy sender whose per-IP front slot another key owns, as in a full
    // map.
    for name in ["bench_past_ip", "bench_past_ip_hll", "bench_past_ip_filter"] {
        let mut ebpf = load_single(portwatch::object::BENCH_UPDATE_OBJECT_PATH, name)?;
        aya::maps::Array::<_, u32>::try_from(ebpf.map_mut("spread").context("spread map")?)?.set(0, 1, 0)?;
        let sender = key_443(Ipv4Addr::new(10, 0, 0, 0).into(), IPPROTO_TCP);
        let owner = FrontSlot {
            owned: 1,
            key: key_443(Ipv4Addr::new(10, 9, 9, 9).into(), IPPROTO_TCP),
            ..Default::default()
        };
        let mut front: aya::maps::PerCpuArray<_, FrontSlot> =
            aya::maps::PerCpuArray::try_from(ebpf.map_mut("front").context("front map")?)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        front.set(
            front_index(&sender),
            aya::maps::PerCpuValues::try_from(vec![owner; cpus])?,
            0,
        )?;
        experiment.push((ebpf, name));
    }
    // Warm up: every key of the spread runs is in the hash (and the slots claimed) before timing.
    const WARM_UP: u32 = 32768;
    for (ebpf, name) in &mut experiment {
        run_single(ebpf, name, &tcp4, WARM_UP)?;
    }
    let mut samples: Vec<Vec<f64>> = vec![vec![]; kinds.len()];
    for _ in 0..rounds {
        samples[0].push(run_single(&mut noop, "noop", &tcp4, repeat)?);
        for (i, frame) in [&tcp4, &udp6, &unwatched].into_iter().enumerate() {
            samples[i + 1].push(h.run_gso(Direction::Ingress, frame, 0, 0, repeat)?.duration.as_nanos() as f64);
        }
        for (i, frame) in off_slot_frames.iter().enumerate() {
            samples[i + 14].push(h.run_gso(Direction::Ingress, frame, 0, 0, repeat)?.duration.as_nanos() as f64);
        }
        for (i, frame) in [&existing, &newcomer].into_iter().enumerate() {
            samples[i + 4].push(
                full.run_gso(Direction::Ingress, frame, 0, 0, repeat)?
                    .duration
                    .as_nanos() as f64,
            );
        }
        samples[6].push(
            tiers_full
                .run_gso(Direction::Ingress, &spray, 0, 0, repeat)?
                .duration
                .as_nanos() as f64,
        );
        for (i, (ebpf, name)) in experiment.iter_mut().enumerate() {
            samples[i + 7].push(run_single(ebpf, name, &tcp4, repeat)?);
        }
    }
    // Exact: every run of the experiment's programs is in the hash or in a cache slot.
    for (ebpf, name) in &mut experiment {
        let runs = u64::from(WARM_UP) + rounds as u64 * u64::from(repeat);
        let hash: aya::maps::PerCpuHashMap<_, CounterKey, portwatch_common::Counters> =
            aya::maps::PerCpuHashMap::try_from(ebpf.map("counters").context("counters")?)?;
        let mut packets: u64 = 0;
        for entry in hash.iter() {
            packets += entry?.1.iter().map(|c| c.packets).sum::<u64>();
        }
        // The front cache's owned slots, and the prefixes' of the flood's floor programs.
        for cache in ["front", "prefix_front"] {
            if let Some(front) = ebpf.map(cache) {
                let front: aya::maps::PerCpuArray<_, FrontSlot> = aya::maps::PerCpuArray::try_from(front)?;
                packets += portwatch::generation::front_entries(&front)?
                    .iter()
                    .map(|(_, c)| c.packets)
                    .sum::<u64>();
            }
        }
        anyhow::ensure!(packets == runs, "{name} counted {packets} packets of {runs} runs");
    }
    // The full map stayed full, and the newcomers went past it every time: under their /24, or,
    // every tier full, under their port.
    let runs = rounds as u64 * u64::from(repeat);
    let stats = full.stats()?;
    anyhow::ensure!(
        stats.map_full_packets == runs + 1,
        "the full map's newcomers went past it {} times",
        stats.map_full_packets
    );
    // The keys kept out of their front slot were counted in the hash, every run.
    for (ip, proto) in off_slot {
        let key = Key::from(key_443(ip, proto));
        let in_hash = h.hash_counter(0, &key)?.map_or(0, |c| c.packets);
        anyhow::ensure!(in_hash == runs, "{key:?}: {in_hash} of {runs} runs counted in the hash");
    }
    let counted = tiers_full.counters(0)?;
    let port_only = counted[&Key::any_remote(PortKey::new(443, IPPROTO_TCP, Direction::Ingress))];
    anyhow::ensure!(
        port_only.packets == runs + 1,
        "with every tier full, {} of {} packets were counted under their port alone",
        port_only.packets,
        runs + 1
    );
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let floor = median(&mut samples[0].clone());
    println!("BPF_PROG_TEST_RUN, {rounds} interleaved rounds x {repeat} repeats, median round, ns per packet");
    println!("| program, packet | ns/packet | over the floor |");
    println!("|---|---:|---:|");
    for (kind, s) in kinds.iter().zip(samples.iter_mut()) {
        let m = median(s);
        println!("| {kind} | {m:.0} | {:+.0} |", m - floor);
    }
    Ok(())
}
