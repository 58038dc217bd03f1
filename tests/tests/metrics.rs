//! The Prometheus export and the JSON-lines feed: `metrics` passes `promtool check metrics` with
//! real traffic on several ports and remotes; per-port counters equal the bytes sent and never go
//! down across resets; a real Prometheus server scraping `serve` agrees; the per-remote options
//! and the series cap; the textfile is never seen half written; `top --count K --json` streams K
//! objects whose rates match their counts.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portwatch::generation::Key;
use portwatch_common::{Counters, Direction::Ingress as IN, IPPROTO_TCP, IPPROTO_UDP};
use portwatch_tests::{
    cli::{Pw, Running},
    fill_counters, kernel_test, key, metric_samples,
    netns::{url_encode, Bed, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6},
    TestFile,
};
use serde_json::Value;

fn promtool_accepts(text: &str) {
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/bootstrap installs it)");
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn port_bytes(text: &str, port: u16, proto: &str) -> f64 {
    metric_samples(text, "portwatch_port_bytes_total")
        [&format!("{{direction=\"ingress\",port=\"{port}\",proto=\"{proto}\"}}")]
}

#[kernel_test]
fn metrics_pass_promtool_and_never_go_down() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::load(&bed.server, &bed.server_if, &["7001/tcp", "7002/udp", "7003/udp"]);
    let a = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 30, 500).unwrap();
    let b = bed.send_udp(CLIENT_V4[1], SERVER_V4, 7002, 20, 300).unwrap();
    let c = bed.send_udp(CLIENT_V6[0], SERVER_V6, 7003, 10, 200).unwrap();
    bed.tcp_transfer(CLIENT_V4[2], SERVER_V4, 7001, 100_000).unwrap();

    let plain = pw.ok(&["metrics"]);
    for text in [
        &plain,
        &pw.ok(&["metrics", "--per-ip", "1"]),
        &pw.ok(&["metrics", "--per-cidr", "24,64"]),
    ] {
        promtool_accepts(text);
    }
    assert_eq!(port_bytes(&plain, 7002, "udp"), (a + b) as f64);
    assert_eq!(port_bytes(&plain, 7003, "udp"), c as f64);
    assert_eq!(metric_samples(&plain, "portwatch_loaded")[""], 1.0);
    assert_eq!(metric_samples(&plain, "portwatch_attached").len(), 2);

    // A reset moves the counts into the drained totals: the exported counter stays.
    let zeroed = pw.json(&["reset", "--json"]);
    assert!(!zeroed["rows"].as_array().unwrap().is_empty());
    let after_reset = pw.ok(&["metrics"]);
    assert_eq!(port_bytes(&after_reset, 7002, "udp"), (a + b) as f64);
    let d = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 5, 500).unwrap();
    assert_eq!(port_bytes(&pw.ok(&["metrics"]), 7002, "udp"), (a + b + d) as f64);
    // A port no longer watched keeps its series until unload.
    pw.ok(&["ports", "del", "7003"]);
    assert_eq!(port_bytes(&pw.ok(&["metrics"]), 7003, "udp"), c as f64);

    // Nothing loaded: an answer, not an error.
    pw.ok(&["unload"]);
    let nothing = pw.ok(&["metrics"]);
    promtool_accepts(&nothing);
    assert_eq!(metric_samples(&nothing, "portwatch_loaded")[""], 0.0);
}

/// Asks Prometheus for `query`'s value, polling until `ready` says yes (bounded: 60 s).
fn query_until(bed: &Bed, query: &str, ready: impl Fn(Option<f64>) -> bool) -> Option<f64> {
    let started = Instant::now();
    loop {
        let path = format!("/api/v1/query?query={}", url_encode(query));
        let value = bed
            .server
            .http_get("127.0.0.1:9090", &path)
            .ok()
            .and_then(|(code, body)| {
                let v: Value = serde_json::from_str(&body).ok()?;
                (code == 200).then_some(())?;
                v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
            });
        if ready(value) {
            return value;
        }
        assert!(
            started.elapsed() < portwatch_tests::bound(60.0),
            "Prometheus never answered {query} as expected (last: {value:?})"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A real Prometheus server, on loopback in the test's namespace, scraping `portwatch serve` every
/// second: it sees the bytes sent, and a reset is no counter reset to it.
#[kernel_test]
fn prometheus_scrapes_serve() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::load(&bed.server, &bed.server_if, &["7002/udp"]);
    let mut serve = Running(
        pw.command(&["serve", "--listen", "127.0.0.1:9814"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let config = TestFile::new("prometheus.yml");
    config.write(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: portwatch\n    static_configs:\n      \
         - targets: ['127.0.0.1:9814']\n",
    );
    let data = TestFile::new("prometheus-data");
    std::fs::create_dir(&data.path).unwrap();
    let _prometheus = Running(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", bed.server.name))
            .args(["prometheus", "--web.listen-address=127.0.0.1:9090", "--log.level=error"])
            .arg(format!("--config.file={}", config.as_str()))
            .arg(format!("--storage.tsdb.path={}", data.as_str()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian's prometheus package; .ci/bootstrap installs it)"),
    );
    let series = "portwatch_port_bytes_total{port=\"7002\",proto=\"udp\",direction=\"ingress\"}";
    let sent = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 40, 400).unwrap();
    let seen = query_until(&bed, series, |v| v == Some(sent as f64));
    assert_eq!(seen, Some(sent as f64));

    pw.json(&["reset", "--json"]);
    // A few scrapes after the reset: the series did not go down, and Prometheus saw no reset.
    std::thread::sleep(portwatch_tests::bound(3.0));
    let more = bed.send_udp(CLIENT_V4[1], SERVER_V4, 7002, 10, 400).unwrap();
    let total = (sent + more) as f64;
    assert_eq!(query_until(&bed, series, |v| v == Some(total)), Some(total));
    assert_eq!(
        query_until(&bed, &format!("resets({series}[1m])"), |v| v.is_some()),
        Some(0.0)
    );
    assert_eq!(
        query_until(&bed, &format!("min_over_time({series}[1m])"), |v| v.is_some()),
        Some(sent as f64)
    );

    // serve itself: after an unload it still answers, with portwatch_loaded 0; `/` points to
    // /metrics, anything else is a 404; SIGTERM ends it with exit 0.
    pw.ok(&["unload"]);
    let (code, body) = bed.server.http_get("127.0.0.1:9814", "/metrics").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(metric_samples(&body, "portwatch_loaded")[""], 0.0, "{body}");
    let (code, body) = bed.server.http_get("127.0.0.1:9814", "/").unwrap();
    assert_eq!((code, body.contains("/metrics")), (200, true), "{body}");
    let (code, _) = bed.server.http_get("127.0.0.1:9814", "/nothing").unwrap();
    assert_eq!(code, 404);
    let status = serve.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let _ = std::fs::remove_dir_all(&data.path);
}

/// `--per-ip`, `--per-cidr` and `--max-series`: the documented series, never more than the cap,
/// and what is folded away still adds up to the port's total.
#[kernel_test]
fn per_remote_series_and_the_cap() {
    let lo = Pw::on_loopback("remotes", &[]);
    let pw = &lo.pw;
    pw.ok(&["ports", "add", "53/udp"]);
    // Port 443/tcp: 10 remotes in 198.18.0.0/24 sending 10..19 bytes; 53/udp: 4 remotes in
    // 2001:db8::/64 sending 100..103.
    let mut entries: Vec<(Key, Counters)> = (0..10u64)
        .map(|i| {
            (
                key(&format!("198.18.0.{}", i + 1), 443, IPPROTO_TCP, IN),
                Counters {
                    bytes: 10 + i,
                    packets: 1,
                },
            )
        })
        .collect();
    entries.extend((0..4u64).map(|i| {
        (
            key(&format!("2001:db8::{}", i + 1), 53, IPPROTO_UDP, IN),
            Counters {
                bytes: 100 + i,
                packets: 2,
            },
        )
    }));
    fill_counters(&pw.pin, 0, &entries).unwrap();
    let remote = |text: &str| metric_samples(text, "portwatch_remote_bytes_total");
    let sum = |series: &BTreeMap<String, f64>, port: &str| -> f64 {
        series
            .iter()
            .filter(|(l, _)| l.contains(&format!("port=\"{port}\"")))
            .map(|(_, v)| v)
            .sum()
    };

    let top3 = pw.ok(&["metrics", "--per-ip", "3"]);
    promtool_accepts(&top3);
    let series = remote(&top3);
    let l = |remote: &str, port: u16, proto: &str| {
        format!("{{direction=\"ingress\",port=\"{port}\",proto=\"{proto}\",remote=\"{remote}\"}}")
    };
    let want: BTreeMap<String, f64> = [
        (l("198.18.0.10", 443, "tcp"), 19.0),
        (l("198.18.0.9", 443, "tcp"), 18.0),
        (l("198.18.0.8", 443, "tcp"), 17.0),
        (l("other", 443, "tcp"), (10..=16).sum::<u64>() as f64),
        (l("2001:db8::4", 53, "udp"), 103.0),
        (l("2001:db8::3", 53, "udp"), 102.0),
        (l("2001:db8::2", 53, "udp"), 101.0),
        (l("other", 53, "udp"), 100.0),
    ]
    .into();
    assert_eq!(series, want);
    assert_eq!(metric_samples(&top3, "portwatch_series_dropped")[""], 0.0);

    let prefixes = remote(&pw.ok(&["metrics", "--per-cidr", "24,64"]));
    let want: BTreeMap<String, f64> = [
        (l("198.18.0.0/24", 443, "tcp"), (10..=19).sum::<u64>() as f64),
        (l("2001:db8::/64", 53, "udp"), (100..=103).sum::<u64>() as f64),
    ]
    .into();
    assert_eq!(prefixes, want);

    // The cap: 3 + 3 named series and 2 `other` ones do not fit in 5: the 3 smallest named ones
    // are folded, and every byte is still in a series.
    let capped = pw.ok(&["metrics", "--per-ip", "3", "--max-series", "5"]);
    promtool_accepts(&capped);
    let series = remote(&capped);
    assert_eq!(series.len(), 5, "{series:#?}");
    assert_eq!(metric_samples(&capped, "portwatch_series_dropped")[""], 3.0);
    assert_eq!(sum(&series, "443"), (10..=19).sum::<u64>() as f64);
    assert_eq!(sum(&series, "53"), (100..=103).sum::<u64>() as f64);
    // A cap below the number of ports: the largest `other` only.
    let one = remote(&pw.ok(&["metrics", "--per-ip", "3", "--max-series", "1"]));
    assert_eq!(one.len(), 1, "{one:#?}");
    assert_eq!(one[&l("other", 53, "udp")], (100..=103).sum::<u64>() as f64);
}

/// `metrics --output FILE` replaces the file whole: a reader reading it in a loop while it is
/// written again and again never sees part of one.
#[kernel_test]
fn the_textfile_is_never_seen_half_written() {
    let lo = Pw::on_loopback("textfile", &[]);
    let pw = &lo.pw;
    fill_counters(&pw.pin, 0, &portwatch_tests::synthetic_entries(2000)).unwrap();
    let dir = TestFile::new("textfile");
    std::fs::create_dir(&dir.path).unwrap();
    let file = dir.path.join("portwatch.prom");
    pw.ok(&["metrics", "--per-ip", "500", "--output", file.to_str().unwrap()]);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (file, done) = (file.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let text = std::fs::read_to_string(&file).unwrap();
                // The last family, and the end of its line: the whole file.
                assert!(
                    text.ends_with('\n') && text.contains("\nportwatch_unwatched_packets_total 0\n"),
                    "a partial file: {} bytes",
                    text.len()
                );
                reads += 1;
            }
            reads
        })
    };
    for _ in 0..30 {
        pw.ok(&["metrics", "--per-ip", "500", "--output", file.to_str().unwrap()]);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads > 30, "the reader read {reads} times");
    let left: Vec<_> = std::fs::read_dir(&dir.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["portwatch.prom"], "no temporary file left");
    std::fs::remove_file(&file).unwrap();
}

/// `top --interval S --count K --json`: K JSON lines, each with rates that match its counts and
/// the previous ones; `--csv` prints its header once.
#[kernel_test]
fn top_streams_json_lines() {
    let bed = std::sync::Arc::new(Bed::new(false).unwrap());
    let pw = Pw::load(&bed.server, &bed.server_if, &["7002/udp"]);
    let sender = {
        let bed = bed.clone();
        std::thread::spawn(move || {
            for _ in 0..12 {
                bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 5, 100).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = pw.ok(&["top", "--interval", "0.4", "--count", "3", "--json"]);
    sender.join().unwrap();
    let objects: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects.len(), 3, "{out}");
    for pair in objects.windows(2) {
        let (before, now) = (&pair[0]["rows"][0], &pair[1]["rows"][0]);
        let secs = pair[1]["interval_secs"].as_f64().unwrap();
        let grew = now["bytes"].as_f64().unwrap() - before["bytes"].as_f64().unwrap();
        let rate = now["bytes_per_sec"].as_f64().unwrap();
        assert!(
            (rate * secs - grew).abs() <= 1e-6 * grew.max(1.0),
            "rate {rate} over {secs} s, grew {grew}"
        );
    }
    let csv = pw.ok(&["top", "--interval", "0.2", "--count", "2", "--csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "time,ip,bytes,packets,bytes_per_sec,packets_per_sec");
    assert_eq!(lines.iter().filter(|l| l.starts_with("time,")).count(), 1);
    assert_eq!(lines.len(), 3, "{csv}");
}
