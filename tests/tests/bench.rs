//! The benchmark harness's smoke run (`bench-net --smoke`): one short round of every traffic kind
//! under every scenario, so the harness cannot rot. Its figures are not judged here (timing
//! belongs in BENCHMARKS.md); that every measurement ran, moved packets, and that each scenario
//! did what it says (portwatch counted the traffic, the full map overflowed, tcpdump ran and exited
//! cleanly) is: `bench::run` checks those after each measurement and fails otherwise. The full
//! run is `tests/bench.sh`, not part of CI. Host only: tests/kernels.sh leaves it out.

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
