//! `portwatch alert`, the monitoring-plugin check, on known traffic: OK, WARNING and CRITICAL with
//! thresholds far from the measured rate (timing cannot flip them), the exact bytes and packets of
//! the interval in the perfdata, `--per-remote` naming the heaviest remote, and UNKNOWN for nothing
//! loaded, bad arguments and a timeout. Every output is read by `tests/alert_output.py`, a parser
//! written from the monitoring-plugins guidelines, not from portwatch's code.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portwatch_tests::{
    cli::Pw,
    fill_counters, kernel_test,
    netns::{Bed, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6},
};
use serde_json::Value;

/// Every wait of this file, in seconds: the check's interval is two of it, a bounded wait ten.
/// One second on a quiet host, scaled by `PORTWATCH_WAIT_SCALE` (a slow emulated kernel).
fn unit() -> f64 {
    portwatch_tests::wait_scale()
}

/// The check's interval, as `--interval` takes it, and a `-t` comfortably above it.
fn interval() -> String {
    format!("{}", 2.0 * unit())
}

fn timeout() -> String {
    format!("{}", 10.0 * unit())
}

/// Runs the independent parser over one output; returns what it read. Fails the test on any
/// deviation from the guidelines, a state word that is not the exit code's included.
fn parsed(code: i32, stdout: &str) -> Value {
    let mut parser = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/alert_output.py"))
        .arg(code.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running python3");
    parser.stdin.take().unwrap().write_all(stdout.as_bytes()).unwrap();
    let out = parser.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "alert_output.py refused {stdout:?} (exit {code}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `portwatch alert ARGS` with no traffic of the test's own: (exit code, what the parser read).
fn alert(pw: &Pw, args: &[&str]) -> (i32, Value) {
    let r = pw.run(&[&["alert"], args].concat());
    assert_eq!(r.stderr, "", "alert writes nothing on stderr");
    (r.code, parsed(r.code, &r.stdout))
}

/// `portwatch alert ARGS --interval I -t T`, with `send` run between its two readings: once the
/// check's main thread sleeps (its first reading is done), `send` runs and returns before the
/// interval is out (`Bed::send_udp` returns once the server's stack has the datagrams).
fn alert_during(pw: &Pw, args: &[&str], send: impl FnOnce()) -> (i32, Value) {
    let (interval, timeout) = (interval(), timeout());
    let mut all = vec!["alert", "--interval", &interval, "-t", &timeout];
    all.extend_from_slice(args);
    let child = pw
        .command(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_sleeping(child.id());
    let started = Instant::now();
    send();
    assert!(
        started.elapsed().as_secs_f64() < 2.0 * unit() / 2.0,
        "sending took {:?}, too close to the check's interval",
        started.elapsed()
    );
    let out = child.wait_with_output().unwrap();
    let code = out.status.code().unwrap_or(-1);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    (code, parsed(code, &String::from_utf8_lossy(&out.stdout)))
}

/// Waits until the process's main thread is in `nanosleep`/`clock_nanosleep` (x86_64 35, 230):
/// the check sleeps only between its readings. Bounded.
fn wait_until_sleeping(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs_f64(10.0 * unit());
    loop {
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if matches!(syscall.split_whitespace().next(), Some("35" | "230")) {
            return;
        }
        assert!(Instant::now() < deadline, "the check never slept: {syscall:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A perfdata value by label.
fn perf(v: &Value, label: &str) -> f64 {
    v["perf"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["label"] == label)
        .unwrap_or_else(|| panic!("no perfdata {label}: {v}"))["value"]
        .as_f64()
        .unwrap()
}

fn summary(v: &Value) -> &str {
    v["summary"].as_str().unwrap()
}

#[kernel_test]
fn states_follow_the_thresholds_under_known_traffic() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::load(&bed.server, &bed.server_if, &["9000/udp", "9001/udp"]);
    // 200 datagrams of 1,000 bytes in a 2-unit interval: about 100 kB/s. Each threshold below is a
    // hundred times away from it.
    let send = || {
        let sent = bed.send_udp(CLIENT_V4[0], SERVER_V4, 9000, 200, 1000).unwrap();
        assert_eq!(sent, 200 * 1028);
    };
    let port = ["--port", "9000/udp", "--direction", "ingress"];
    for (thresholds, code, state) in [
        (["-w", "10MB/s", "-c", "20MB/s"], 0, "OK"),
        (["-w", "1kB/s", "-c", "10MB/s"], 1, "WARNING"),
        (["-w", "1kB/s", "-c", "2KB/s"], 2, "CRITICAL"),
    ] {
        let (got, v) = alert_during(&pw, &[&port[..], &thresholds[..]].concat(), send);
        assert_eq!((got, v["state"].as_str().unwrap()), (code, state), "{v}");
        // The exact bytes of the interval, and the rate they make over it.
        let bytes = perf(&v, "9000/udp/ingress_bytes");
        assert_eq!(bytes, (200 * 1028) as f64, "{v}");
        let rate = perf(&v, "9000/udp/ingress_Bps");
        // (The interval is printed to the millisecond.)
        assert!((rate * perf(&v, "interval") - bytes).abs() < bytes * 1e-3, "{v}");
        assert!(summary(&v).contains("9000/udp ingress"), "{v}");
    }

    // Packets, every watched port and direction: 9001 and the egress side are measured at 0.
    let (code, v) = alert_during(&pw, &["--packets", "-w", "1pps", "-c", "10Mpps"], send);
    assert_eq!(code, 1, "{v}");
    assert_eq!(perf(&v, "9000/udp/ingress_packets"), 200.0);
    assert_eq!(perf(&v, "9001/udp/ingress_packets"), 0.0);
    assert_eq!(perf(&v, "9000/udp/egress_pps"), 0.0);
    assert!(summary(&v).starts_with("9000/udp ingress"), "{v}");

    // A lower bound: the silent port is the one named.
    let (code, v) = alert_during(&pw, &["--direction", "ingress", "-c", "1:"], send);
    assert_eq!(code, 2, "{v}");
    assert!(summary(&v).starts_with("9001/udp ingress 0 B/s"), "{v}");

    // An inside range: 100 kB/s is inside 1 kB/s..1 GB/s.
    let (code, v) = alert_during(&pw, &["--port", "9000/udp", "-w", "@1kB/s:1GB/s"], send);
    assert_eq!(code, 1, "{v}");
}

#[kernel_test]
fn per_remote_names_the_heaviest_remote() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::load(&bed.server, &bed.server_if, &["9000/udp"]);
    let (code, v) = alert_during(
        &pw,
        &["--per-remote", "--direction", "ingress", "-w", "1kB/s", "-c", "1GB/s"],
        || {
            bed.send_udp(CLIENT_V4[0], SERVER_V4, 9000, 50, 1000).unwrap();
            bed.send_udp(CLIENT_V4[1], SERVER_V4, 9000, 200, 1000).unwrap();
            bed.send_udp(CLIENT_V6[0], SERVER_V6, 9000, 100, 1000).unwrap();
        },
    );
    assert_eq!(code, 1, "{v}");
    assert!(
        summary(&v).starts_with(&format!("{} on 9000/udp ingress", CLIENT_V4[1])),
        "{v}"
    );
    assert_eq!(perf(&v, "9000/udp/ingress_top_remote_bytes"), (200 * 1028) as f64);
}

#[kernel_test]
fn failures_are_unknown() {
    // Nothing loaded.
    let nothing = Pw::new(None);
    let (code, v) = alert(&nothing, &["-w", "1MB/s"]);
    assert_eq!(code, 3);
    assert!(summary(&v).contains("nothing is loaded"), "{v}");

    // Bad arguments, clap's and the check's own.
    for args in [
        &["-w", "10Mbit/s"][..],
        &["--bogus"],
        &["-c", "20:10"],
        &["--port", "70000"],
        &["--packets", "-w", "1MB/s"],
        &["--interval", "5", "-t", "5"],
        &["--sources", "--packets"],
    ] {
        let (code, v) = alert(&nothing, args);
        assert_eq!(code, 3, "{args:?}: {v}");
        assert!(summary(&v).starts_with("bad arguments"), "{args:?}: {v}");
    }

    // A port that is not watched.
    // --force: a million entries (about 480 MiB) is past the memory guard on a small machine (the
    // kernel matrix's 2 GiB guests).
    let lo = Pw::on_loopback("alert", &["--max-entries", "1000000", "--force"]);
    let (code, v) = alert(&lo.pw, &["--port", "8080", "--interval", "0.1"]);
    assert_eq!(code, 3);
    assert!(summary(&v).contains("no watched port matches"), "{v}");

    // Timed out: two readings of a million entries take longer than 0.1 s.
    fill_counters(&lo.pw.pin, 0, &portwatch_tests::synthetic_entries(1_000_000)).unwrap();
    let started = Instant::now();
    let (code, v) = alert(&lo.pw, &["--interval", "0.05", "-t", "0.1"]);
    assert_eq!(code, 3, "{v}");
    assert!(summary(&v).starts_with("timed out"), "{v}");
    assert!(started.elapsed() < Duration::from_secs_f64(10.0 * unit()));

    // The same state, within its time: OK with no thresholds.
    let (code, v) = alert(&lo.pw, &["--interval", "0.1", "-t", &timeout()]);
    assert_eq!(code, 0, "{v}");

    // --sources with nothing past the per-IP map: 0, and the summary says why.
    let (code, v) = alert(&lo.pw, &["--sources", "-c", "10"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(perf(&v, "443/tcp/ingress_sources"), 0.0);
    assert!(summary(&v).contains("past the per-IP map"), "{v}");
}

/// `alert --history`: the store's last period (its newest 5-minute bucket, over the time since the
/// record before it) judged as the live counters are; a store whose newest record is older than
/// `--max-age` is UNKNOWN. No kernel: records written as `reset --json` writes them.
#[test]
fn history_checks_the_last_period() {
    let dir = portwatch_tests::TestDir::new("alert-history");
    let (db, log) = (dir.join("h.db"), dir.join("portwatch.jsonl"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let record = |time: u64, id: &str, a: u64, b: u64| {
        format!(
            "{{\"time\":{time},\"reset\":true,\"reset_id\":\"{id}\",\"rows\":[\
             {{\"ip\":\"198.18.0.7\",\"port\":443,\"proto\":\"tcp\",\"direction\":\"ingress\",\"bytes\":{a},\"packets\":3000}},\
             {{\"ip\":\"198.18.0.8\",\"port\":443,\"proto\":\"tcp\",\"direction\":\"ingress\",\"bytes\":{b},\"packets\":600}}],\
             \"totals\":{{\"bytes\":0,\"packets\":0}},\"overflow\":{{\"bytes\":0,\"packets\":0}}}}\n"
        )
    };
    // The record before the last (another bucket), and the last: 3.6 MB over 300 s, 12 kB/s.
    let text = record(now - 310, "0000000000000001", 9_000_000, 9_000_000)
        + &record(now - 10, "0000000000000002", 3_000_000, 600_000);
    std::fs::write(&log, text).unwrap();
    let db_arg = db.to_str().unwrap();
    let run = |args: &[&str]| -> (i32, Value) {
        let out = Command::new(portwatch_tests::cli::portwatch_bin())
            .args([
                "history",
                "ingest",
                "--quiet",
                "--config",
                "/nonexistent",
                "--db",
                db_arg,
            ])
            .arg(&log)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut all = vec!["alert", "--history", "--config", "/nonexistent", "--db", db_arg];
        all.extend_from_slice(args);
        let out = Command::new(portwatch_tests::cli::portwatch_bin())
            .args(&all)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stderr), "");
        let code = out.status.code().unwrap();
        (code, parsed(code, &String::from_utf8_lossy(&out.stdout)))
    };
    let (code, v) = run(&["-w", "5kB/s", "-c", "50kB/s"]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(perf(&v, "443/tcp/ingress_bytes"), 3_600_000.0);
    assert_eq!(perf(&v, "443/tcp/ingress_Bps"), 12_000.0);
    assert_eq!(run(&["-c", "10kB/s"]).0, 2);
    assert_eq!(run(&["-w", "100kB/s"]).0, 0);
    let (code, v) = run(&["--per-remote", "-w", "9kB/s"]);
    assert_eq!(code, 1, "{v}");
    assert!(summary(&v).contains("198.18.0.7"), "{v}");
    // A port named and silent in the period: measured at 0.
    let (code, v) = run(&["--port", "53/udp", "-c", "1:"]);
    assert_eq!(code, 2, "{v}");
    // Stale: the newest record is older than --max-age.
    let (code, v) = run(&["--max-age", "1s", "-w", "1"]);
    assert_eq!(code, 3, "{v}");
    assert!(summary(&v).contains("max-age"), "{v}");
    // No store: UNKNOWN, saying what to do.
    let out = Command::new(portwatch_tests::cli::portwatch_bin())
        .args(["alert", "--history", "--config", "/nonexistent", "--db"])
        .arg(dir.join("none.db"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let v = parsed(3, &String::from_utf8_lossy(&out.stdout));
    assert!(summary(&v).contains("history ingest"), "{v}");
}
