//! The deployment kit in `examples/` cannot rot: every systemd unit passes `systemd-analyze
//! verify` without a warning, the cron line is one, and every example configuration applies in
//! namespaces the test makes with the interfaces it names, and round-trips through `config show`.

use std::path::{Path, PathBuf};

use portwatch_tests::{cli::Pw, kernel_test, netns::Netns, TestFile};
use serde_json::{json, Value};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("examples")
}

fn files(ending: &[&str]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| ending.iter().any(|e| p.to_str().unwrap().ends_with(e)))
        .collect();
    found.sort();
    found
}

/// Each unit, with the installed binary's path (`/usr/local/sbin/portwatch`) pointing at the one
/// under test: systemd checks that it exists. The timer's service sits beside it.
#[test]
fn systemd_units_verify() {
    let bin = portwatch_tests::cli::portwatch_bin();
    let dir = TestFile::new("units");
    std::fs::create_dir(&dir.path).unwrap();
    let units = files(&[".service", ".timer"]);
    assert!(units.len() >= 5, "{units:?}");
    for unit in &units {
        let text = std::fs::read_to_string(unit).unwrap();
        assert!(text.contains("/usr/local/sbin/portwatch") || unit.extension().unwrap() == "timer");
        let copy = dir.path.join(unit.file_name().unwrap());
        std::fs::write(&copy, text.replace("/usr/local/sbin/portwatch", bin.to_str().unwrap())).unwrap();
    }
    for unit in &units {
        let copy = dir.path.join(unit.file_name().unwrap());
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze (Debian's systemd package; .ci/bootstrap installs it)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{}: {stderr}",
            unit.display()
        );
    }
    for f in std::fs::read_dir(&dir.path).unwrap() {
        let _ = std::fs::remove_file(f.unwrap().path());
    }
}

/// The cron file's job line: five time fields, a user, and the reset command with its log.
#[test]
fn the_cron_line_is_one() {
    let text = std::fs::read_to_string(examples().join("portwatch.cron")).unwrap();
    let jobs: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && !l.contains('='))
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let fields: Vec<&str> = jobs[0].split_whitespace().collect();
    assert_eq!(&fields[..6], ["*/5", "*", "*", "*", "*", "root"]);
    assert!(jobs[0].contains("portwatch reset --json --output /var/log/portwatch/portwatch.jsonl"));
}

/// portwatch.yaml as an operator edits it: the commented `interfaces:` list under the shipped
/// `interfaces: []` taken in its place.
fn with_example_interfaces(text: &str) -> String {
    let mut edited = String::new();
    let mut in_list = false;
    for line in text.lines() {
        if line == "interfaces: []" {
            continue;
        }
        in_list = line == "#interfaces:" || (in_list && line.starts_with("#  "));
        edited.push_str(if in_list { &line[1..] } else { line });
        edited.push('\n');
    }
    assert_ne!(edited, text, "portwatch.yaml has no commented `#interfaces:` list");
    edited
}

/// Every example configuration applies: in a namespace with the interfaces it names (and a second
/// one for `netns: web`), with the test's own pin path, then `config show` round-trips.
/// portwatch.yaml (the package's /etc/portwatch/portwatch.yaml) attaches nothing as shipped, and
/// what its comment says once its example list is taken in.
#[kernel_test]
fn example_configurations_apply() {
    let configs = files(&[".yaml"]);
    assert!(!configs.is_empty());
    let mut variants = vec![];
    for config in configs {
        let text = std::fs::read_to_string(&config).unwrap();
        if config.ends_with("portwatch.yaml") {
            variants.push((config.clone(), with_example_interfaces(&text), true));
        }
        variants.push((config, text, false));
    }
    for (config, text, edited) in variants {
        let home = Netns::new("home").unwrap();
        let web = Netns::new("web").unwrap();
        for iface in ["eth0", "eth1"] {
            home.add_veth(iface, &format!("{iface}p")).unwrap();
        }
        web.add_veth("eth0", "eth0p").unwrap();
        let pw = Pw::new(Some(&home));
        let text = text
            .replace(
                "pin_path: /sys/fs/bpf/portwatch",
                &format!("pin_path: {}", pw.pin.display()),
            )
            .replace("netns: web", &format!("netns: {}", web.name));
        let file = TestFile::new("example.yaml");
        file.write(&text);
        let out = pw.ok(&["apply", "-f", file.as_str()]);
        assert!(out.starts_with("+ load"), "{}: {out}", config.display());
        let status = pw.status();
        let attached: Vec<(Value, Value, Value)> = status["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["interface"].clone(), a["netns"].clone(), a["direction"].clone()))
            .collect();
        if config.ends_with("portwatch.yaml") && !edited {
            assert!(
                attached.is_empty(),
                "as shipped, portwatch.yaml attaches nothing: {attached:?}"
            );
        }
        if edited {
            assert_eq!(
                attached,
                [
                    (json!("eth0"), json!(null), json!("ingress")),
                    (json!("eth0"), json!(null), json!("egress")),
                    (json!("eth1"), json!(null), json!("ingress")),
                    (json!("eth0"), json!(web.name), json!("ingress")),
                    (json!("eth0"), json!(web.name), json!("egress")),
                ]
            );
            assert_eq!(pw.ok(&["ports", "list"]), "53/udp\n443\n8000-8100/tcp\n");
        }
        let shown = TestFile::new("shown.yaml");
        shown.write(&pw.ok(&["config", "show"]));
        assert_eq!(
            pw.ok(&["apply", "-f", shown.as_str()]),
            "no changes\n",
            "{}",
            config.display()
        );
        pw.ok(&["unload"]);
    }
}

/// The Prometheus examples: promtool accepts the scrape configuration and the rules.
#[test]
fn prometheus_examples_pass_promtool() {
    let dir = examples().join("prometheus");
    for (what, file) in [("config", "prometheus.yml"), ("rules", "portwatch-rules.yml")] {
        let out = std::process::Command::new("promtool")
            .args(["check", what])
            .arg(dir.join(file))
            .output()
            .expect("promtool (Debian's prometheus package; .ci/bootstrap installs it)");
        assert!(
            out.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every metric the rules and the Grafana dashboard use is one `portwatch metrics` exports (with
/// per-remote series on and the programs' run time counted).
#[kernel_test]
fn prometheus_examples_use_exported_metrics() {
    let lo = Pw::on_loopback("names", &[]);
    portwatch_tests::fill_counters(&lo.pw.pin, 0, &portwatch_tests::synthetic_entries(10)).unwrap();
    let stats = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(stats).unwrap();
    std::fs::write(stats, "1").unwrap();
    let exported = lo.pw.ok(&["metrics", "--per-ip", "1"]);
    std::fs::write(stats, was.trim()).unwrap();
    let names = regex::Regex::new(r"portwatch_[a-z_]+").unwrap();
    let dir = examples().join("prometheus");
    for file in ["portwatch-rules.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for name in names.find_iter(&text).map(|m| m.as_str()) {
            assert!(
                exported.lines().any(|l| l.starts_with(&format!("# TYPE {name} "))),
                "{file} uses {name}, which is not exported"
            );
        }
    }
    serde_json::from_str::<Value>(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap()).unwrap();
}
