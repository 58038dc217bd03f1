//! The benchmark harness's smoke run (`bench-net --smoke`): one short round of every traffic kind
//! under every scenario, so the harness cannot rot. Its figures are not judged here (timing
//! belongs in BENCHMARKS.md); that every measurement ran, moved packets, and that each scenario
//! did what it says (portwatch counted the traffic, the full map overflowed, nftables counted it in
//! its family's per-source set, tcpdump ran and exited cleanly) and that the floods' datagrams, IPv4
//! and IPv6, reached the server's UDP layer with good checksums and unanswered is: `bench::run`
//! checks those after each measurement and fails otherwise. The full run is `tests/bench.sh`, not
//! part of CI; nor is `bench-prog`'s full run, whose one short round is here too. Host only:
//! tests/kernels.sh leaves it out.

use portwatch_tests::{
    bench::{run, Options, Scenario, Traffic},
    kernel_test,
};

#[kernel_test]
fn every_scenario_and_traffic_kind_runs() {
    let report = run(&Options::smoke(), |line| eprintln!("{line}")).unwrap();
    for traffic in Traffic::ALL {
        for scenario in Scenario::ALL {
            let samples = &report.samples[&(traffic, scenario)];
            assert_eq!(samples.len(), 1, "{traffic:?} under {scenario:?}");
            assert!(
                samples[0].value > 0.0 && samples[0].packets > 0,
                "{traffic:?} under {scenario:?} measured nothing: {:?}",
                samples[0]
            );
        }
    }
    let table = portwatch_tests::bench::markdown(&report);
    for scenario in Scenario::ALL {
        let row = format!("| {} |", scenario.label());
        let rows = table.lines().filter(|l| l.starts_with(&row)).count();
        assert_eq!(
            rows,
            Traffic::ALL.len(),
            "one row per traffic kind for {scenario:?}:\n{table}"
        );
    }
}

/// Interrupted (Ctrl-C) in the middle of a scenario, the harness stops, exits 130 and leaves
/// nothing behind: no namespace, no pin, no process it started (iperf3, tcpdump).
#[kernel_test]
fn an_interrupted_run_removes_what_it_made() {
    use std::{
        os::unix::process::CommandExt,
        time::{Duration, Instant},
    };
    // In a process group of its own, so that what it started can be found after it exits; the
    // signal goes to it alone: its own cleanup must stop what it started.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bench-net"))
        .args(["--smoke"])
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mine = |line: &str| line.contains(&format!("-{pid}-"));
    // Wait until it is inside a portwatch scenario (its pin path exists), bounded.
    let started = Instant::now();
    loop {
        let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| mine(n))
            .collect();
        if !pins.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < portwatch_tests::bound(60.0),
            "no scenario pinned anything in {:?}",
            portwatch_tests::bound(60.0)
        );
        assert!(child.try_wait().unwrap().is_none(), "bench-net ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let netns = portwatch_tests::netns::sh(&["ip", "netns", "list"]).unwrap();
    assert!(!netns.lines().any(mine), "namespaces left: {netns}");
    let pins: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| mine(&e.file_name().to_string_lossy()))
        .collect();
    assert!(pins.is_empty(), "pins left: {pins:?}");
    let left = std::process::Command::new("pgrep")
        .args(["-a", "-g", &pid.to_string()])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(left.trim().is_empty(), "processes of its group left: {left}");
}

/// `bench-prog` (the kernel program's cost per packet, BPF_PROG_TEST_RUN), one short round, so it
/// cannot rot either: it checks its own runs (every run of each map-update and flood-floor program
/// counted once; the full map's newcomers past it every time, under their /24 or their port) and
/// fails otherwise. Every kind prints a row.
#[kernel_test]
fn bench_prog_runs_and_counts_every_run() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bench-prog"))
        .args(["1", "1000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench-prog failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| program"))
        .count();
    assert_eq!(rows, 16, "one row per kind:\n{stdout}");
}
