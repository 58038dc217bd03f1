//! `portwatch apply -f FILE`, `config show` and `unload --drain-to` on real interfaces, in
//! namespaces the tests create: from nothing, again (no changes, the same ids), an edited file
//! (ports and interfaces added and removed, one in a second network namespace), `--dry-run`, a
//! change that needs a reload (refused, then `--reload --drain-to` losing no byte), the round trip
//! through `config show`, and every way a file is refused before anything changes.

use portwatch_common::{Counters, Direction::Ingress as IN, IPPROTO_UDP as UDP, LAYOUT_VERSION};
use portwatch_tests::{
    cli::{counters_of, Pw, Running},
    kernel_test, key,
    netns::{sh, Bed, Netns, CLIENT2_V4, CLIENT_V4, SERVER2_V4, SERVER_V4},
    TestFile,
};
use serde_json::{json, Value};

/// What `status --json` says that a file decides: attachments (interface, netns, direction) and
/// the watched ports.
fn shape(pw: &Pw) -> (Vec<(Value, Value, Value)>, Vec<Value>) {
    let s = pw.status();
    let attachments = s["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["interface"].clone(), a["netns"].clone(), a["direction"].clone()))
        .collect();
    let ports = s["watched_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["spec"].clone())
        .collect();
    (attachments, ports)
}

/// Program ids, link ids and map ids: what stays the same when nothing changes.
fn ids(pw: &Pw) -> Vec<String> {
    let s = pw.status();
    let mut ids: Vec<String> = s["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].to_string())
        .collect();
    ids.extend(
        s["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["link_id"].to_string()),
    );
    for map in ["counters_0", "counters_1", "watched_ports", "attachments"] {
        let path = pw.pin.join("maps").join(map);
        let info: Value =
            serde_json::from_str(&sh(&["bpftool", "-j", "map", "show", "pinned", path.to_str().unwrap()]).unwrap())
                .unwrap();
        ids.push(info["id"].to_string());
    }
    ids
}

fn apply(pw: &Pw, file: &TestFile, more: &[&str]) -> String {
    let mut args = vec!["apply", "-f", file.as_str()];
    args.extend_from_slice(more);
    pw.ok(&args)
}

#[kernel_test]
fn apply_makes_the_pinned_state_match_the_file() {
    let bed = Bed::new(false).unwrap();
    bed.add_second_link().unwrap();
    let other = Netns::new("other").unwrap();
    other.add_veth("pw9", "pw9p").unwrap();
    let pw = Pw::new(Some(&bed.server));
    let pin = pw.pin.display().to_string();
    let a = TestFile::new("a.yaml");
    a.write(&format!(
        "pin_path: {pin}\nports: [7002/udp, 7003/udp]\ninterfaces:\n  - name: pw0\n  - name: pw2\n    direction: ingress\n"
    ));

    // From nothing.
    let out = apply(&pw, &a, &[]);
    // The load's maps, weighed (tests/tests/memory.rs checks the figure).
    let (load, rest) = out.split_once('\n').unwrap();
    let (maps, rest) = rest.split_once('\n').unwrap();
    assert!(maps.starts_with("  maps: ") && maps.ends_with(" bytes)"), "{out}");
    assert_eq!(
        format!("{load}\n{rest}"),
        format!(
            "+ load {pin} (layout {LAYOUT_VERSION}, 65536 counter entries, direction both)\n+ port 7002-7003/udp\n\
             + attach pw0 ingress\n+ attach pw0 egress\n+ attach pw2 ingress\n"
        )
    );
    let shape_a = (
        vec![
            (json!("pw0"), json!(null), json!("ingress")),
            (json!("pw0"), json!(null), json!("egress")),
            (json!("pw2"), json!(null), json!("ingress")),
        ],
        vec![json!("7002-7003/udp")],
    );
    assert_eq!(shape(&pw), shape_a);

    // Again: nothing changes, not even an id.
    let before = ids(&pw);
    assert_eq!(apply(&pw, &a, &[]), "no changes\n");
    assert_eq!(ids(&pw), before);

    // Counting, kept through the edit below.
    let sent = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 20, 200).unwrap();
    let k = key(CLIENT_V4[0], 7002, UDP, IN);
    assert_eq!(
        pw.counters()[&k],
        Counters {
            bytes: sent,
            packets: 20
        }
    );

    // An edit: a port range cut and a port added, an interface and a direction removed, an
    // interface of another network namespace added.
    let b = TestFile::new("b.yaml");
    b.write(&format!(
        "pin_path: {pin}\nports: [7002/udp, 8080/tcp]\ninterfaces:\n  - name: pw0\n    direction: ingress\n  \
         - name: pw9\n    netns: {}\n",
        other.name
    ));
    let plan = format!(
        "- attach pw0 egress\n- attach pw2 ingress\n- port 7003/udp\n+ port 8080/tcp\n\
         + attach pw9 ingress in network namespace {0}\n+ attach pw9 egress in network namespace {0}\n",
        other.name
    );
    // --dry-run prints the same lines and changes nothing.
    assert_eq!(apply(&pw, &b, &["--dry-run"]), plan);
    assert_eq!(shape(&pw), shape_a);
    assert_eq!(ids(&pw), before);
    assert_eq!(apply(&pw, &b, &[]), plan);
    let shape_b = (
        vec![
            (json!("pw0"), json!(null), json!("ingress")),
            (json!("pw9"), json!(other.name), json!("ingress")),
            (json!("pw9"), json!(other.name), json!("egress")),
        ],
        vec![json!("7002/udp"), json!("8080/tcp")],
    );
    assert_eq!(shape(&pw), shape_b);
    let more = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 10, 200).unwrap();
    bed.send_udp(CLIENT2_V4, SERVER2_V4, 7002, 10, 200).unwrap(); // pw2: no longer counted
    assert_eq!(
        pw.counters()[&k],
        Counters {
            bytes: sent + more,
            packets: 30
        },
        "counts kept through the edit"
    );
    assert_eq!(pw.counters().get(&key(CLIENT2_V4, 7002, UDP, IN)), None);

    // The round trip: what `config show` prints, `apply` finds nothing to change in.
    let shown = TestFile::new("shown.yaml");
    shown.write(&pw.ok(&["config", "show"]));
    assert_eq!(apply(&pw, &shown, &[]), "no changes\n");

    // A change that needs a reload is refused, and changes nothing.
    let c = TestFile::new("c.yaml");
    c.write(&format!(
        "pin_path: {pin}\nmax_entries: 1000\nports: [7002/udp]\ninterfaces:\n  - name: pw0\n"
    ));
    let r = pw.run(&["apply", "-f", c.as_str()]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("max_entries 65536") && r.stderr.contains("--reload --drain-to"),
        "{}",
        r.stderr
    );
    assert_eq!(shape(&pw), shape_b);

    // --reload --drain-to: every counted byte is in the log or in the new counters, none in both.
    let log = TestFile::new("drain.jsonl");
    let out = apply(&pw, &c, &["--reload", "--drain-to", log.as_str()]);
    assert!(
        // The prefix tiers' sizes derive from max_entries: they change with it.
        out.starts_with(&format!(
            "~ reload {pin}: max_entries 65536 -> 1000, prefix_entries 16384 -> 1024, wide_prefix_entries 4096 -> 256;"
        )),
        "{out}"
    );
    let after = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 5, 200).unwrap();
    let drained: Vec<Value> = portwatch_tests::json_lines(&log.path);
    assert_eq!(drained.len(), 1);
    assert_eq!(drained[0]["reset"], true);
    assert_eq!(
        counters_of(&drained[0]["totals"]),
        Counters {
            bytes: sent + more,
            packets: 30
        }
    );
    assert_eq!(
        pw.counters()[&k],
        Counters {
            bytes: after,
            packets: 5
        }
    );
    assert_eq!(pw.status()["counters"]["max_entries"], 1000);

    // unload --drain-to: the same, on the way out.
    pw.ok(&["unload", "--drain-to", log.as_str()]);
    let lines: Vec<Value> = portwatch_tests::json_lines(&log.path);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        counters_of(&lines[1]["totals"]),
        Counters {
            bytes: after,
            packets: 5
        }
    );
    assert!(!pw.pin.exists());
}

/// Every file that cannot be used is refused in one line that names it (and the line and column
/// where there is one), with the documented exit code, and nothing is loaded or changed.
#[kernel_test]
fn bad_files_are_refused_before_anything_changes() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::new(Some(&bed.server));
    let pin = pw.pin.display().to_string();
    let head = format!("pin_path: {pin}\n");
    let cases: Vec<(String, i32, &str)> = vec![
        (
            format!("{head}prots: [443]\n"),
            2,
            ":2:1: unknown field `prots`, expected one of",
        ),
        (
            format!("{head}ports: [0]\n"),
            2,
            ":2:9: ports[0]: 0: port 0 cannot be watched",
        ),
        (format!("{head}ports: [70000]\n"), 2, "70000 is out of range"),
        (
            format!("{head}ports: [80/icmp]\n"),
            2,
            "the protocol must be tcp or udp",
        ),
        (
            format!("{head}direction: sideways\n"),
            2,
            ":2:12: direction: unknown variant `sideways`",
        ),
        (
            format!("{head}max_entries: 0\n"),
            2,
            ":2:14: max_entries: 0 is not from 1 to",
        ),
        (
            format!("{head}interfaces:\n  - name: pw0\n    mode: fast\n"),
            2,
            ":4:11: interfaces[0].mode: unknown variant `fast`",
        ),
        (
            format!("{head}interfaces:\n  - name: pw0\n    colour: red\n"),
            2,
            "unknown field `colour`",
        ),
        (format!("{head}ports: [443\n"), 2, ":3:1:"),
        (
            format!("{head}interfaces:\n  - name: pw0\n  - name: pw0\n"),
            2,
            "interface pw0 is listed twice",
        ),
        (
            format!("{head}interfaces:\n  - name: nosuch0\n"),
            6,
            "interfaces[0]: no interface named \"nosuch0\"",
        ),
        (
            format!("{head}interfaces:\n  - name: pw0\n    netns: nosuch-ns\n"),
            6,
            "no network namespace \"nosuch-ns\"",
        ),
        ("# only a comment\n".to_string(), 2, "holds no configuration"),
    ];
    for (text, code, says) in &cases {
        let f = TestFile::new("bad.yaml");
        f.write(text);
        let r = pw.run(&["apply", "-f", f.as_str()]);
        assert_eq!(r.code, *code, "{text:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{text:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(f.as_str()) && r.stderr.contains(says),
            "{text:?}: {:?} lacks {says:?}",
            r.stderr
        );
        assert!(!pw.pin.exists(), "{text:?}: something was pinned");
    }

    // The file itself.
    let f = TestFile::new("file.yaml");
    let ok = format!("{head}ports: [443]\ninterfaces:\n  - name: pw0\n");
    let refused = |f: &TestFile, says: &str| {
        let r = pw.run(&["apply", "-f", f.as_str()]);
        assert_eq!(r.code, 2, "{says}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains(says), "{:?} lacks {says:?}", r.stderr);
        assert!(!pw.pin.exists());
    };
    refused(&f, "cannot read it"); // missing
    f.write("");
    refused(&f, "is empty");
    f.write(&ok);
    sh(&["chmod", "664", f.as_str()]).unwrap();
    refused(&f, "can be changed by users other than root (mode 664)");
    sh(&["chmod", "644", f.as_str()]).unwrap();
    sh(&["chown", "65534", f.as_str()]).unwrap();
    refused(&f, "belongs to uid 65534");
    sh(&["chown", "0", f.as_str()]).unwrap();
    std::fs::write(&f.path, [0x7f, b'E', b'L', b'F', 0, 1, 2]).unwrap();
    refused(&f, "is not text");
    f.write(&format!("{ok}# {}\n", "x".repeat(1 << 20)));
    refused(&f, "a configuration file is at most 1 MiB");
    let dir = TestFile::new("dir.yaml");
    std::fs::create_dir(&dir.path).unwrap();
    refused(&dir, "is a directory");

    // And a good one then applies.
    f.write(&ok);
    pw.ok(&["apply", "-f", f.as_str()]);
    pw.ok(&["unload"]);
}

/// Polls `status` until the watched ports are `want` (bounded: 10 s, scaled); returns how long it took.
fn wait_for_ports(pw: &Pw, want: &[&str]) -> std::time::Duration {
    let started = std::time::Instant::now();
    loop {
        let now = pw.run(&["ports", "list"]);
        if now.code == 0 && now.stdout.lines().collect::<Vec<_>>() == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < portwatch_tests::bound(10.0),
            "the ports did not become {want:?} within {:?}: {}{}",
            portwatch_tests::bound(10.0),
            now.stdout,
            now.stderr
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `watch -f FILE` follows the file: edited in place, replaced by a rename (as editors save),
/// deleted and created again. A file that cannot be applied is reported on stderr with its line
/// and column, and the state stays as it was. SIGTERM ends it with exit 0, and counting goes on.
#[kernel_test]
fn watch_follows_the_file() {
    use std::process::Stdio;
    let bed = Bed::new(false).unwrap();
    let pw = Pw::new(Some(&bed.server));
    let pin = pw.pin.display().to_string();
    let file = TestFile::new("watched.yaml");
    let text = |port: u16| format!("pin_path: {pin}\nports: [{port}/udp]\ninterfaces:\n  - name: pw0\n");
    file.write(&text(7100));
    let out = TestFile::new("watch.out");
    let err = TestFile::new("watch.err");
    let mut watch = pw.command(&["watch", "-f", file.as_str()]);
    watch
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out.path).unwrap())
        .stderr(std::fs::File::create(&err.path).unwrap());
    // Killed, whatever happens below.
    let mut child = Running(watch.spawn().unwrap());
    let mut took = vec![];
    wait_for_ports(&pw, &["7100/udp"]);

    // Edited in place (the same inode).
    std::fs::write(&file.path, text(7101)).unwrap();
    took.push(wait_for_ports(&pw, &["7101/udp"]));
    // Replaced by a rename.
    let new = TestFile::new("watched.yaml.new");
    new.write(&text(7102));
    std::fs::rename(&new.path, &file.path).unwrap();
    took.push(wait_for_ports(&pw, &["7102/udp"]));
    // Deleted: reported, and the state stays.
    std::fs::remove_file(&file.path).unwrap();
    std::thread::sleep(portwatch_tests::bound(1.0));
    assert_eq!(pw.ok(&["ports", "list"]), "7102/udp\n");
    // Created again.
    file.write(&text(7103));
    took.push(wait_for_ports(&pw, &["7103/udp"]));
    // Invalid: reported with its line and column, and the state stays.
    file.write(&format!("pin_path: {pin}\nports: [7104/udp\n"));
    std::thread::sleep(portwatch_tests::bound(1.0));
    assert_eq!(pw.ok(&["ports", "list"]), "7103/udp\n");
    // Valid again.
    file.write(&text(7105));
    took.push(wait_for_ports(&pw, &["7105/udp"]));
    eprintln!("watch applied each change after {took:?}");

    // SIGTERM: exit 0, and the kernel state stays.
    let status = child.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let stderr = std::fs::read_to_string(&err.path).unwrap();
    // (On a kernel without TCX, stderr also says that each attachment fell back to tc.)
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains(file.as_str())).collect();
    assert_eq!(
        errors.len(),
        2,
        "one line for the deleted file, one for the invalid one: {stderr}"
    );
    assert!(
        errors[0].contains("cannot read it") && errors[0].contains("the state stays as it was"),
        "{stderr}"
    );
    assert!(
        errors[1].contains(&format!("{}:3:1:", file.as_str())),
        "line and column: {stderr}"
    );
    let sent = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7105, 10, 100).unwrap();
    assert_eq!(
        pw.counters()[&key(CLIENT_V4[0], 7105, UDP, IN)],
        Counters {
            bytes: sent,
            packets: 10
        }
    );
    assert!(std::fs::read_to_string(&out.path).unwrap().contains("+ port 7105/udp"));
    pw.ok(&["unload"]);
}

/// A step that fails midway undoes those before it: the state is the one before `apply`. The
/// failure: attaching pw2 with TCX, whose link pin path something else already holds (on a kernel
/// without TCX, the TCX attach itself fails first).
#[kernel_test]
fn a_failed_apply_leaves_the_state_as_it_was() {
    let bed = Bed::new(false).unwrap();
    bed.add_second_link().unwrap();
    let pw = Pw::new(Some(&bed.server));
    let pin = pw.pin.display().to_string();
    let a = TestFile::new("a.yaml");
    a.write(&format!(
        "pin_path: {pin}\nports: [7002/udp]\ninterfaces:\n  - name: pw0\n"
    ));
    apply(&pw, &a, &[]);
    let before = shape(&pw);

    let netns = std::fs::metadata(format!("/run/netns/{}", bed.server.name)).unwrap();
    let links: Value = serde_json::from_str(&bed.server.ip(&["-j", "link", "show", "pw2"]).unwrap()).unwrap();
    let ifindex = &links[0]["ifindex"];
    let taken = pw.pin.join("links").join(format!(
        "{}-{ifindex}-ingress",
        std::os::unix::fs::MetadataExt::ino(&netns)
    ));
    portwatch_tests::pin_foreign_map(&taken).unwrap();
    let b = TestFile::new("b.yaml");
    b.write(&format!(
        "pin_path: {pin}\nports: [7003/udp]\ninterfaces:\n  - name: pw0\n    direction: ingress\n  \
         - name: pw2\n    mode: tcx\n"
    ));
    let r = pw.run(&["apply", "-f", b.as_str()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("apply failed; what it had changed is undone"),
        "{}",
        r.stderr
    );
    assert_eq!(shape(&pw), before, "pw0 egress attached again, the ports as they were");
    let sent = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 10, 100).unwrap();
    assert_eq!(
        pw.counters()[&key(CLIENT_V4[0], 7002, UDP, IN)],
        Counters {
            bytes: sent,
            packets: 10
        }
    );
    std::fs::remove_file(&taken).unwrap();
    pw.ok(&["unload"]);
}
