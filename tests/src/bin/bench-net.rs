//! The network benchmark: the same traffic through a veth pair between two throwaway namespaces
//! with no monitoring, a do-nothing TC program, portwatch (TCX, classic tc, 1,000 ports and
//! 100,000 entries, a full map),
//! nftables per-source sets and a packet capture, in alternating rounds. Markdown tables on stdout,
//! progress on stderr. `tests/bench.sh` builds it in release mode and runs it.
//!
//!     bench-net [--rounds N] [--secs S] [--scenario NAME]... [--traffic NAME]...
//!
//! Scenarios: none hook tcx tc many nftables capture full. Traffic: tcp udp64 connections flood
//! flood6.
//! Interrupted (SIGINT, SIGTERM), it stops at the next step and removes its namespaces and pins.

use anyhow::{bail, Context, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use portwatch_tests::bench::{markdown, run, Options, Scenario, Traffic, INTERRUPTED};

/// The one of `all` called `wanted`.
fn named<T: Copy>(all: &[T], name: fn(T) -> &'static str, wanted: &str) -> Result<T> {
    all.iter()
        .copied()
        .find(|t| name(*t) == wanted)
        .with_context(|| format!("no scenario or traffic named {wanted} (see --help)"))
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn main() -> Result<()> {
    let mut options = Options {
        rounds: 5,
        secs: 3,
        scenarios: vec![],
        traffic: vec![],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--rounds" => options.rounds = value()?.parse()?,
            "--secs" => options.secs = value()?.parse()?,
            "--smoke" => options = Options::smoke(),
            "--scenario" => options
                .scenarios
                .push(named(&Scenario::ALL, Scenario::name, &value()?)?),
            "--traffic" => options.traffic.push(named(&Traffic::ALL, Traffic::name, &value()?)?),
            "-h" | "--help" => {
                println!(
                    "bench-net [--rounds N (5)] [--secs S (3)] [--smoke] [--scenario NAME]... [--traffic NAME]...\n\
                     scenarios: none hook tcx tc many nftables capture full (default: all; none is always run)\n\
                     traffic: tcp udp64 connections flood flood6 (default: all)"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other} (see --help)"),
        }
    }
    if options.scenarios.is_empty() {
        options.scenarios = Scenario::ALL.to_vec();
    } else if !options.scenarios.contains(&Scenario::None) {
        options.scenarios.insert(0, Scenario::None);
    }
    if options.traffic.is_empty() {
        options.traffic = Traffic::ALL.to_vec();
    }
    let handler = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &handler) }?;
    }
    let started = std::time::Instant::now();
    let report = match run(&options, |line| eprintln!("{line}")) {
        Ok(report) => report,
        Err(_) if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) => {
            eprintln!("bench-net: interrupted; its namespaces, pins and processes are removed");
            std::process::exit(130);
        }
        Err(e) => return Err(e),
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "bench-net: {} rounds of {} s, kernel {}, {} CPUs, portwatch {}, {:.0} s in all",
        options.rounds,
        options.secs,
        kernel.trim(),
        cpus,
        portwatch_tests::cli::portwatch_bin().display(),
        started.elapsed().as_secs_f64()
    );
    print!("{}", markdown(&report));
    Ok(())
}
