//! Many operators at once: for 60 s (`PORTWATCH_CONCURRENCY_SECS`) under traffic from thousands of
//! remote addresses (raw-socket UDP from 4,096 IPv4 and 1,024 IPv6 sources), four workers run
//! `ports add/del`, `top`, `reset --output`, `status`, `metrics` and `apply` at random (seeded:
//! `PORTWATCH_CONCURRENCY_SEED`). None may fail, and the reset records plus the final counters
//! equal what the senders sent, key by key.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use portwatch::generation::Key;
use portwatch_common::{Counters, Direction::Ingress as IN, IPPROTO_TCP, IPPROTO_UDP};
use portwatch_tests::{
    cli::{counters_of, Pw},
    kernel_test, key,
    netns::{Bed, SERVER_V4, SERVER_V6},
    rng::{seed_from_env, Rng},
};
use serde_json::Value;

const PORTS: [u16; 2] = [7202, 7204];

#[kernel_test]
fn many_commands_at_once_under_traffic_fail_none_and_lose_nothing() {
    let secs: u64 = std::env::var("PORTWATCH_CONCURRENCY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = seed_from_env("PORTWATCH_CONCURRENCY_SEED");
    eprintln!("PORTWATCH_CONCURRENCY_SEED={seed}");
    let bed = Arc::new(Bed::new(false).unwrap());
    let pw = Arc::new(Pw::load(&bed.server, &bed.server_if, &["7202/udp", "7204/udp"]));
    let dir = std::env::temp_dir().join(format!("pwt-concurrency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _dir = RemoveDir(dir.clone());
    let log = dir.join("resets.jsonl");
    let config = dir.join("portwatch.yaml");
    std::fs::write(
        &config,
        format!(
            "pin_path: {}\ninterfaces:\n  - name: {}\nports: [7202/udp, 7204/udp, 9100/udp]\n",
            pw.pin.display(),
            bed.server_if,
        ),
    )
    .unwrap();

    let v4: Vec<IpAddr> = (0..4096u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + i)))
        .collect();
    let v6: Vec<IpAddr> = (0..1024u128)
        .map(|i| {
            IpAddr::V6(Ipv6Addr::from(
                u128::from("2001:db8:1::".parse::<Ipv6Addr>().unwrap()) + i + 1,
            ))
        })
        .collect();
    bed.accept_any_source().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (bed, stop) = (bed.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut sent: BTreeMap<Key, Counters> = BTreeMap::new();
            let mut round = 0usize;
            // Every source at least once (24 rounds), then until stopped; bounded: 10,000 rounds.
            while (!stop.load(Ordering::SeqCst) || round < 24) && round < 10_000 {
                let (sources, dst, nth) = if round % 4 < 3 {
                    (&v4, SERVER_V4, round / 4 * 3 + round % 4)
                } else {
                    (&v6, SERVER_V6, round / 4)
                };
                // The next slice of 256 sources, to both ports: every source sends many times.
                let start = (nth * 256) % sources.len();
                let slice = &sources[start..start + 256];
                let size = 20 + round % 50;
                for port in PORTS {
                    let l3 = bed.send_spoofed_udp(slice, dst, port, size).unwrap();
                    for src in slice {
                        *sent.entry(key(&src.to_string(), port, IPPROTO_UDP, IN)).or_default() +=
                            Counters { bytes: l3, packets: 1 };
                    }
                }
                round += 1;
            }
            eprintln!("the sender sent {round} rounds of 2 x 256 datagrams");
            sent
        })
    };

    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let ran = Arc::new(Mutex::new(BTreeMap::<&'static str, usize>::new()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (pw, failures, ran) = (pw.clone(), failures.clone(), ran.clone());
            let (log, config) = (log.clone(), config.clone());
            let mut rng = Rng::new(seed ^ (w + 1));
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let port = format!("{}/udp", 9000 + rng.below(64));
                    let (name, args): (&'static str, Vec<String>) = match rng.below(8) {
                        0 => ("ports add", vec!["ports".into(), "add".into(), port]),
                        1 => ("ports del", vec!["ports".into(), "del".into(), port]),
                        2 => ("top", vec!["top".into(), "--json".into(), "-n".into(), "5".into()]),
                        3 | 4 => (
                            "reset",
                            vec![
                                "reset".into(),
                                "--json".into(),
                                "--output".into(),
                                log.display().to_string(),
                            ],
                        ),
                        5 => ("status", vec!["status".into(), "--json".into()]),
                        6 => ("metrics", vec!["metrics".into()]),
                        _ => ("apply", vec!["apply".into(), "-f".into(), config.display().to_string()]),
                    };
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let r = pw.run(&args);
                    // `ports del` of a port that is not watched is a usage error (exit 2) by design.
                    let ok = r.code == 0 || (name == "ports del" && r.code == 2);
                    if !ok {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{args:?} exited {}: {}", r.code, r.stderr));
                    }
                    *ran.lock().unwrap().entry(name).or_default() += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().unwrap();
    eprintln!("commands run: {:?}", ran.lock().unwrap());
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{} commands failed: {failures:#?}", failures.len());
    let remotes: std::collections::BTreeSet<_> = sent.keys().map(|k| k.remote).collect();
    assert!(remotes.len() > 4096, "traffic from {} remote addresses", remotes.len());

    // The conservation check: every record in the log, plus a last reset, against what was sent.
    pw.ok(&["reset", "--json", "--output", log.to_str().unwrap()]);
    let mut counted: BTreeMap<Key, Counters> = BTreeMap::new();
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(counters_of(&v["overflow"]), Counters::default());
        for r in v["rows"].as_array().unwrap() {
            let proto = if r["proto"] == "tcp" { IPPROTO_TCP } else { IPPROTO_UDP };
            let k = key(r["ip"].as_str().unwrap(), r["port"].as_u64().unwrap() as u16, proto, IN);
            *counted.entry(k).or_default() += counters_of(r);
        }
    }
    let last = pw.json(&["top", "--by", "ip-port", "-n", "0", "--json"]);
    assert!(last["rows"].as_array().unwrap().is_empty(), "{last}");
    assert_eq!(counted.len(), sent.len());
    assert!(counted == sent, "records + counters differ from what was sent");
}
