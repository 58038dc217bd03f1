//! Nanoseconds per packet of portwatch's kernel program under `BPF_PROG_TEST_RUN`, next to a
//! do-nothing TC program measured in the same run (the floor). The kinds are interleaved round by
//! round and the median round is reported, so a noisy neighbour hits all of them alike.
//!
//!     cargo run --release -p portwatch-tests --bin bench-prog -- [ROUNDS] [REPEAT]

use anyhow::{Context, Result};
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use ctl_common::{DIRECTION_INGRESS, PROTO_ALL};
use portwatch_tests::{packet::Packet, Harness};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(15);
    let repeat: u32 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);

    let mut noop =
        Ebpf::load_file(portwatch::object::NOOP_OBJECT_PATH).context("loading the noop program")?;
    let noop_prog: &mut SchedClassifier = noop.program_mut("noop").unwrap().try_into()?;
    noop_prog.load()?;

    let mut h = Harness::new(65536)?;
    h.watch(443, PROTO_ALL)?;
    let tcp4 = Packet::tcp4("198.18.9.9", 40000, "198.18.0.1", 443)
        .payload(100)
        .build();
    let udp6 = Packet::udp6("2001:db8:9::9", 40000, "2001:db8::1", 443)
        .payload(100)
        .build();
    let unwatched = Packet::tcp4("198.18.9.9", 40000, "198.18.0.1", 80)
        .payload(100)
        .build();

    let kinds = [
        "do-nothing TC program (floor)",
        "matched IPv4 TCP",
        "matched IPv6 UDP",
        "unwatched IPv4 TCP",
    ];
    let mut samples: Vec<Vec<f64>> = vec![vec![]; kinds.len()];
    for _ in 0..rounds {
        let r = noop_prog.test_run(TestRunOptions {
            data_in: Some(&tcp4),
            repeat,
            ..Default::default()
        })?;
        samples[0].push(r.duration.as_nanos() as f64);
        for (i, frame) in [&tcp4, &udp6, &unwatched].into_iter().enumerate() {
            let run = h.run_gso(DIRECTION_INGRESS, frame, 0, 0, repeat)?;
            samples[i + 1].push(run.duration.as_nanos() as f64);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let floor = median(&mut samples[0].clone());
    println!("BPF_PROG_TEST_RUN, {rounds} interleaved rounds x {repeat} repeats, median round, ns per packet");
    println!("| packet | ns/packet | over the floor |");
    println!("|---|---:|---:|");
    for (kind, s) in kinds.iter().zip(samples.iter_mut()) {
        let m = median(s);
        println!("| {kind} | {m:.1} | {:+.1} |", m - floor);
    }
    Ok(())
}
