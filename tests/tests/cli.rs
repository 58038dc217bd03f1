//! The control plane as an operator uses it: the real `portwatch` binary, one short-lived process
//! per command, real traffic between network namespaces the tests create, and the pinned state
//! checked directly. Nothing stays resident: counting goes on in the kernel after `load` exits.

use aya::programs::{SchedClassifier, TcAttachType};
use portwatch_common::{
    Counters,
    Direction::{Egress as EG, Ingress as IN},
    IPPROTO_TCP as TCP, IPPROTO_UDP as UDP,
};
use portwatch_tests::{
    cli::Pw,
    kernel_test, key,
    netns::{sh, Bed, Netns, CLIENT2_V4, CLIENT_V4, CLIENT_V6, SERVER2_V4, SERVER_V4, SERVER_V6},
    nft,
};
use serde_json::json;

/// TCX programs attached to `iface` in `ns`, both directions.
fn tcx_programs(ns: &Netns, iface: &str) -> Vec<u32> {
    ns.enter(|| {
        let mut ids = vec![];
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            if let Ok((_, progs)) = SchedClassifier::query_tcx(iface, t) {
                ids.extend(progs.iter().map(|p| p.id()));
            }
        }
        ids
    })
    .unwrap()
}

/// Classic tc filters on `iface` in `ns`, both directions (an absent clsact qdisc has none).
fn tc_filters(ns: &Netns, iface: &str) -> usize {
    ["ingress", "egress"]
        .iter()
        .map(|d| {
            let out = ns
                .exec(&["tc", "-j", "filter", "show", "dev", iface, d])
                .unwrap_or_else(|_| "[]".into());
            let v: serde_json::Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).unwrap();
            v.as_array()
                .unwrap()
                .iter()
                .filter(|f| f.get("options").is_some())
                .count()
        })
        .sum()
}

/// How many of its programs portwatch has attached to `iface` in `ns` in `mode` (`tcx`: TCX links;
/// `tc`: cls_bpf filters on the clsact qdisc).
fn attached(ns: &Netns, iface: &str, mode: &str) -> usize {
    match mode {
        "tcx" => tcx_programs(ns, iface).len(),
        _ => tc_filters(ns, iface),
    }
}

/// Whether `iface` in `ns` has a clsact qdisc.
fn has_clsact(ns: &Netns, iface: &str) -> bool {
    let out = ns.exec(&["tc", "-j", "qdisc", "show", "dev", iface]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array().unwrap().iter().any(|q| q["kind"] == "clsact")
}

/// No TCX program, no tc filter, and no clsact qdisc (the tests never add one of their own here:
/// one left is portwatch's).
fn assert_nothing_attached(bed: &Bed, ifaces: &[&str]) {
    for iface in ifaces {
        assert_eq!(
            tcx_programs(&bed.server, iface),
            Vec::<u32>::new(),
            "TCX programs left on {iface}"
        );
        assert_eq!(tc_filters(&bed.server, iface), 0, "tc filters left on {iface}");
        assert!(!has_clsact(&bed.server, iface), "a clsact qdisc left on {iface}");
    }
}

/// portwatch removes only a clsact qdisc it added itself, and only once nothing is attached to
/// it: a qdisc that was there before stays, and so does one that another tool's filter now uses.
#[kernel_test]
fn unload_removes_only_its_own_empty_clsact_qdisc() {
    let bed = Bed::new(false).unwrap();
    bed.add_second_link().unwrap();
    let foreign = ["protocol", "all", "prio", "49000", "u32", "match", "u32", "0", "0"];
    // pw0: a clsact qdisc that was there before portwatch (empty).
    bed.server
        .exec(&["tc", "qdisc", "add", "dev", "pw0", "clsact"])
        .unwrap();
    let pw = Pw::load_with(&bed.server, "pw0", &["443"], &["--iface", "pw2", "--mode", "tc"]);
    assert!(has_clsact(&bed.server, "pw2"), "load --mode tc adds a clsact qdisc");
    // pw2: portwatch added the qdisc, then another tool put a filter on it.
    let mut add = vec!["tc", "filter", "add", "dev", "pw2", "ingress"];
    add.extend_from_slice(&foreign);
    bed.server.exec(&add).unwrap();
    // tc lists a u32 filter as more than one entry: count what the other tool added.
    let theirs = tc_filters(&bed.server, "pw2") - 2;
    assert!(theirs > 0);

    // Detaching one interface at a time: pw0's qdisc was not portwatch's.
    pw.ok(&["detach", "pw0"]);
    assert_eq!(tc_filters(&bed.server, "pw0"), 0);
    assert!(
        has_clsact(&bed.server, "pw0"),
        "the clsact qdisc that was there before is kept"
    );
    pw.ok(&["unload"]);
    assert_eq!(
        tc_filters(&bed.server, "pw2"),
        theirs,
        "the other tool's filter is untouched"
    );
    assert!(has_clsact(&bed.server, "pw2"), "a qdisc another tool uses is kept");

    // Without the other tool's filter, portwatch's qdisc goes with the last detach.
    let mut del = vec!["tc", "filter", "del", "dev", "pw2", "ingress"];
    del.extend_from_slice(&foreign[..4]);
    bed.server.exec(&del).unwrap();
    bed.server
        .exec(&["tc", "qdisc", "del", "dev", "pw2", "clsact"])
        .unwrap();
    pw.ok(&["load", "--iface", "pw2", "--port", "443", "--mode", "tc"]);
    pw.ok(&["detach", "pw2"]);
    assert!(
        !has_clsact(&bed.server, "pw2"),
        "portwatch's own empty clsact qdisc is removed"
    );
    pw.ok(&["unload"]);
}

fn program_ids(status: &serde_json::Value) -> Vec<u64> {
    status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect()
}

/// load in one process, exit, real TCP and UDP (IPv4 and IPv6) from the client namespace, and the
/// pinned counters equal the L3 bytes and packets that crossed, with no portwatch process alive.
#[kernel_test(each_mode)]
fn lifecycle(mode: &str) {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::new(Some(&bed.server));
    let out = pw.ok(&[
        "load",
        "--iface",
        &bed.server_if,
        "--port",
        "7001/tcp",
        "--port",
        "7002/udp",
        "--mode",
        mode,
    ]);
    assert!(out.contains(&format!("({mode})")), "{out}");
    let status = pw.status();
    for a in status["attachments"].as_array().unwrap() {
        assert_eq!(a["mode"], mode);
    }
    // The load process has exited: everything from here on is the kernel's doing.
    nft::install(&bed);
    let udp4 = bed.send_udp(CLIENT_V4[1], SERVER_V4, 7002, 100, 700).unwrap();
    let udp6 = bed.send_udp(CLIENT_V6[1], SERVER_V6, 7002, 100, 700).unwrap();
    let tcp4 = bed.tcp_transfer(CLIENT_V4[0], SERVER_V4, 7001, 500_000).unwrap();
    let tcp6 = bed.tcp_transfer(CLIENT_V6[0], SERVER_V6, 7001, 500_000).unwrap();

    let got = pw.counters();
    assert_eq!(
        got[&key(CLIENT_V4[1], 7002, UDP, IN)],
        Counters {
            bytes: udp4,
            packets: 100
        }
    );
    assert_eq!(
        got[&key(CLIENT_V6[1], 7002, UDP, IN)],
        Counters {
            bytes: udp6,
            packets: 100
        }
    );
    // TCP: to the byte and packet what nftables counted on the server, the independent count (the
    // stack decides the segments and their options: a loss under a busy emulator brings SACK
    // blocks and retransmissions, which a model of header sizes would miss).
    let nft = nft::counters(&bed);
    assert!(
        nft["tcp4_in"].bytes > 500_000 && nft["tcp6_in"].bytes > 500_000,
        "{nft:?}"
    );
    assert!(tcp4.sent > 0 && tcp6.sent > 0);
    assert_eq!(got[&key(CLIENT_V4[0], 7001, TCP, IN)], nft["tcp4_in"]);
    assert_eq!(got[&key(CLIENT_V4[0], 7001, TCP, EG)], nft["tcp4_out"]);
    assert_eq!(got[&key(CLIENT_V6[0], 7001, TCP, IN)], nft["tcp6_in"]);
    assert_eq!(got[&key(CLIENT_V6[0], 7001, TCP, EG)], nft["tcp6_out"]);
    assert_eq!(got.len(), 6, "{got:#?}");
    let total = portwatch::generation::sum(&got.values().copied().collect::<Vec<_>>());
    let status = pw.status();
    assert_eq!(status["stats"]["matched_packets"], total.packets);
    assert_eq!(status["stats"]["matched_bytes"], total.bytes);
    assert_eq!(status["counters"]["entries"], 6);

    pw.ok(&["unload"]);
    assert!(!pw.pin.exists(), "unload leaves the pin path");
    assert_nothing_attached(&bed, &[&bed.server_if]);
}

/// `--mode tcx` attaches with TCX links where the kernel has them; where it has not (6.1), `load`
/// fails in one line that says what to use instead, and leaves nothing behind.
#[kernel_test]
fn tcx_mode_attaches_with_tcx_or_says_what_to_use_instead() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::new(Some(&bed.server));
    let r = pw.run(&["load", "--iface", "pw0", "--port", "443", "--mode", "tcx"]);
    if portwatch_tests::has_tcx() {
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(attached(&bed.server, "pw0", "tcx"), 2);
        pw.ok(&["unload"]);
    } else {
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("no TCX") && r.stderr.contains("--mode tc") && r.stderr.contains("--mode auto"),
            "{}",
            r.stderr
        );
        assert!(!pw.pin.exists(), "{:?}", pw.tree());
    }
    assert_nothing_attached(&bed, &["pw0"]);
}

/// `--mode auto` (the default) on a kernel without TCX says "TCX refused" once per command, not
/// once for each of its four attachments (two interfaces, both directions), and attaches every one
/// with the clsact qdisc; where TCX works it says nothing of the kind.
#[kernel_test]
fn auto_mode_says_tcx_refused_once_per_command() {
    let bed = Bed::new(false).unwrap();
    bed.add_second_link().unwrap();
    let pw = Pw::new(Some(&bed.server));
    let r = pw.run(&["load", "--iface", "pw0", "--iface", "pw2", "--port", "443"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let refused = r.stderr.lines().filter(|l| l.contains("TCX refused")).count();
    let mode = if portwatch_tests::has_tcx() { "tcx" } else { "tc" };
    assert_eq!(refused, usize::from(mode == "tc"), "{}", r.stderr);
    for iface in ["pw0", "pw2"] {
        assert_eq!(attached(&bed.server, iface, mode), 2, "{iface}: {}", pw.ok(&["status"]));
    }
    pw.ok(&["unload"]);
    assert_nothing_attached(&bed, &["pw0", "pw2"]);
}

/// `ports add` while traffic flows counts from then on; `ports del` stops it; the program is never
/// reloaded (its id stays the same).
#[kernel_test]
fn port_changes_apply_live_without_reload() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::load(&bed.server, &bed.server_if, &["7001"]);
    let ids = program_ids(&pw.status());
    let src = CLIENT_V4[1];
    let k = key(src, 7003, UDP, IN);

    bed.send_udp(src, SERVER_V4, 7003, 10, 100).unwrap();
    assert_eq!(pw.counters().get(&k), None, "7003 is not watched yet");
    pw.ok(&["ports", "add", "7003/udp"]);
    let counted = bed.send_udp(src, SERVER_V4, 7003, 20, 100).unwrap();
    assert_eq!(
        pw.counters()[&k],
        Counters {
            bytes: counted,
            packets: 20
        }
    );
    pw.ok(&["ports", "del", "7003"]);
    bed.send_udp(src, SERVER_V4, 7003, 30, 100).unwrap();
    assert_eq!(
        pw.counters()[&k],
        Counters {
            bytes: counted,
            packets: 20
        },
        "nothing counted after del"
    );
    assert_eq!(program_ids(&pw.status()), ids, "no reload happened");

    // `set` replaces the whole set; `list` folds it into ranges and prints SPECs.
    pw.ok(&["ports", "set", "8000-8100/tcp", "53/udp", "https"]);
    assert_eq!(pw.ok(&["ports", "list"]), "53/udp\n443\n8000-8100/tcp\n");
    let listed: serde_json::Value = serde_json::from_str(&pw.ok(&["ports", "list", "--json"])).unwrap();
    assert_eq!(
        listed["ports"][2],
        serde_json::json!({"spec": "8000-8100/tcp", "first": 8000, "last": 8100, "protocols": ["tcp"]})
    );
}

/// `detach` of one of two interfaces keeps the other counting; `unload` then leaves no pin and no
/// attachment anywhere.
#[kernel_test(each_mode)]
fn detach_one_interface_keeps_the_other_counting(mode: &str) {
    let bed = Bed::new(false).unwrap();
    bed.add_second_link().unwrap();
    let pw = Pw::load_with(&bed.server, "pw0", &["7002/udp"], &["--iface", "pw2", "--mode", mode]);
    assert_eq!(pw.status()["attachments"].as_array().unwrap().len(), 4);
    let a = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 10, 100).unwrap();
    let b = bed.send_udp(CLIENT2_V4, SERVER2_V4, 7002, 10, 100).unwrap();
    assert_eq!(
        pw.counters()[&key(CLIENT2_V4, 7002, UDP, IN)],
        Counters { bytes: b, packets: 10 }
    );

    let out = pw.ok(&["detach", "pw2"]);
    assert!(out.contains("detached from pw2 ingress"), "{out}");
    assert_nothing_attached(&bed, &["pw2"]);
    assert_eq!(attached(&bed.server, "pw0", mode), 2);
    bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 10, 100).unwrap();
    bed.send_udp(CLIENT2_V4, SERVER2_V4, 7002, 10, 100).unwrap();
    let got = pw.counters();
    assert_eq!(
        got[&key(CLIENT_V4[0], 7002, UDP, IN)],
        Counters {
            bytes: 2 * a,
            packets: 20
        },
        "pw0 still counts"
    );
    assert_eq!(
        got[&key(CLIENT2_V4, 7002, UDP, IN)],
        Counters { bytes: b, packets: 10 },
        "pw2 no longer counts"
    );

    // Attach it again, then a second load with the same interface never attaches twice.
    pw.ok(&["attach", "pw2", "--mode", mode]);
    let out = pw.ok(&["load", "--iface", "pw2", "--iface", "pw0", "--mode", mode]);
    assert!(
        out.contains("already attached to pw2 ingress") && out.contains("already attached to pw0 egress"),
        "{out}"
    );
    assert_eq!(attached(&bed.server, "pw2", mode), 2);

    pw.ok(&["unload"]);
    assert!(pw.tree().is_empty() && !pw.pin.exists());
    assert_nothing_attached(&bed, &["pw0", "pw2"]);
    let again = pw.run(&["unload"]);
    assert_eq!(
        (again.code, again.stdout.contains("nothing is loaded")),
        (0, true),
        "{}",
        again.stdout
    );
}

/// An interface that vanishes leaves records (and, with TCX, link pins) that `status` reports and
/// `detach` removes.
#[kernel_test(each_mode)]
fn a_vanished_interface_is_reported_and_removable(mode: &str) {
    let bed = Bed::new(false).unwrap();
    bed.add_second_link().unwrap();
    let pw = Pw::load_with(&bed.server, "pw0", &[], &["--iface", "pw2", "--mode", mode]);
    bed.server.ip(&["link", "del", "pw2"]).unwrap();
    let status = pw.status();
    let gone: Vec<_> = status["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["present"] == false)
        .collect();
    assert_eq!(gone.len(), 2, "{status:#}");
    assert!(gone.iter().all(|a| a["interface"] == "pw2"));
    assert!(pw.ok(&["status"]).contains("interface vanished"));
    pw.ok(&["detach", "pw2"]);
    let left: Vec<_> = pw.status()["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["interface"].clone(), a["mode"].clone()))
        .collect();
    assert_eq!(
        left,
        vec![(json!("pw0"), json!(mode)); 2],
        "only pw0's two attachments remain"
    );
    let links: Vec<_> = pw.tree().into_iter().filter(|p| p.contains("/links/")).collect();
    let pinned_links = if mode == "tcx" { 2 } else { 0 };
    assert_eq!(links.len(), pinned_links, "only pw0's links remain: {links:?}");
    assert_eq!(attached(&bed.server, "pw0", mode), 2);
    pw.ok(&["unload"]);
    assert!(!pw.pin.exists());
    assert_nothing_attached(&bed, &["pw0"]);
}

/// A failed `load` leaves nothing pinned or attached.
#[kernel_test]
fn a_failed_load_leaves_nothing_behind() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::new(Some(&bed.server));
    let r = pw.run(&["load", "--iface", "pw0", "--iface", "nosuch0", "--port", "443"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("nosuch0"), "{}", r.stderr);
    assert!(!pw.pin.exists(), "{:?}", pw.tree());
    assert_nothing_attached(&bed, &["pw0"]);

    // A pin path whose map name is taken by something else: load fails while pinning its maps
    // and removes what it had pinned, leaving the foreign pin alone.
    std::fs::create_dir_all(pw.pin.join("maps")).unwrap();
    let foreign = pw.pin.join("maps").join("counters_0");
    portwatch_tests::pin_foreign_map(&foreign).unwrap();
    let r = pw.run(&["load", "--iface", "pw0", "--port", "443"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("counters_0"), "{}", r.stderr);
    assert_eq!(
        pw.tree(),
        vec![pw.pin.join("maps").display().to_string(), foreign.display().to_string()]
    );
    assert_nothing_attached(&bed, &["pw0"]);
    std::fs::remove_dir_all(&pw.pin).unwrap();
}

/// The state an error must not change: every pin, the attachments and the watched ports.
fn snapshot(pw: &Pw) -> (Vec<String>, serde_json::Value, serde_json::Value) {
    let s = pw.status();
    (pw.tree(), s["attachments"].clone(), s["watched_ports"].clone())
}

/// Each documented error: its exit code, a one-line message naming the problem, and the pinned
/// state unchanged.
#[kernel_test]
fn errors_say_what_to_do_and_change_nothing() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::new(Some(&bed.server));
    // Nothing loaded yet.
    for args in [
        &["ports", "add", "80"][..],
        &["ports", "list"],
        &["detach", "pw0"],
        &["attach", "pw0"],
    ] {
        let r = pw.run(args);
        assert_eq!(r.code, 4, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("nothing is loaded") && r.stderr.contains("portwatch load"),
            "{}",
            r.stderr
        );
        assert!(!pw.pin.exists());
    }

    pw.ok(&["load", "--iface", "pw0", "--port", "443", "--max-entries", "1000"]);
    let before = snapshot(&pw);
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["ports", "add", "0"], 2, "port 0"),
        (vec!["ports", "add", "65536"], 2, "out of range"),
        (vec!["ports", "add", "-1"], 2, "not a port number"),
        (vec!["ports", "add", "abc"], 2, "not a service name"),
        (vec!["ports", "add", "10-5"], 2, "starts above its end"),
        (vec!["ports", "add", "80/icmp"], 2, "tcp or udp"),
        (vec!["ports", "add"], 2, "<SPEC>"),
        (vec!["ports", "set", ""], 2, "empty port SPEC"),
        (vec!["load", "--iface", "pw0", "--max-entries", "0"], 2, "at least 1"),
        (
            vec!["load", "--iface", "pw0", "--max-entries", "5000"],
            5,
            "--max-entries 1000",
        ),
        (
            vec!["load", "--iface", "pw0", "--direction", "ingress"],
            5,
            "--direction both",
        ),
        (vec!["load", "--iface", "nosuch0"], 6, "nosuch0"),
        (vec!["attach", "nosuch0"], 6, "nosuch0"),
        (vec!["detach", "lo"], 6, "not attached"),
        (vec!["detach", "nosuch0"], 6, "not attached"),
    ];
    for (args, code, says) in cases {
        let r = pw.run(&args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: one line, got {:?}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {:?} lacks {says:?}", r.stderr);
        assert!(!r.stderr.contains("panicked") && !r.stderr.contains("backtrace"));
        assert_eq!(snapshot(&pw), before, "{args:?} changed the pinned state");
    }

    // A pin path outside bpffs.
    let out = std::process::Command::new(portwatch_tests::cli::portwatch_bin())
        .args(["--pin-path", "/tmp/pwt-not-bpffs", "status"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("not on a bpffs mount") && stderr.contains("--pin-path"),
        "{stderr}"
    );

    // Not root: names the capabilities; exit code 3. (`attach` needs both; `ports`, CAP_BPF
    // alone: tests/privilege.rs.)
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(portwatch_tests::cli::portwatch_bin())
        .arg("--pin-path")
        .arg(&pw.pin)
        .args(["attach", "lo"]);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );
    assert_eq!(snapshot(&pw), before);
}

/// Pinned state of another layout version is refused by every command, and never misread.
#[kernel_test(each_mode)]
fn another_layout_version_is_refused(mode: &str) {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::load_with(&bed.server, "pw0", &["443"], &["--mode", mode]);
    let meta = pw.pin.join("maps/meta");
    let set_version = |v: u32| {
        let mut cmd = vec![
            "bpftool",
            "map",
            "update",
            "pinned",
            meta.to_str().unwrap(),
            "key",
            "0",
            "0",
            "0",
            "0",
            "value",
        ];
        let bytes: Vec<String> = v.to_le_bytes().iter().map(|b| b.to_string()).collect();
        cmd.extend(bytes.iter().map(String::as_str));
        // max_entries 65536, directions both, reserved zero, the prefix tiers 16384 and 4096,
        // reserved zero
        cmd.extend([
            "0", "0", "1", "0", "3", "0", "0", "0", "0", "64", "0", "0", "0", "16", "0", "0", "0", "0", "0", "0",
        ]);
        sh(&cmd).unwrap();
    };
    set_version(99);
    let tree = pw.tree();
    for args in [
        &["status"][..],
        &["ports", "list"],
        &["ports", "add", "80"],
        &["detach", "pw0"],
        &["attach", "pw0"],
        &["unload"],
        &["load", "--iface", "pw0"],
    ] {
        let r = pw.run(args);
        assert_eq!(r.code, 5, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("layout version 99") && r.stderr.contains("portwatch unload"),
            "{}",
            r.stderr
        );
        assert_eq!(pw.tree(), tree);
    }
    assert_eq!(attached(&bed.server, "pw0", mode), 2, "still attached");
    set_version(portwatch_common::LAYOUT_VERSION);
    pw.ok(&["unload"]);
    assert_nothing_attached(&bed, &["pw0"]);
}

/// Commands that change state take the lock: one waits for the other.
#[kernel_test]
fn changes_wait_for_the_lock() {
    let bed = Bed::new(false).unwrap();
    let pw = Pw::load(&bed.server, "pw0", &[]);
    let marker = std::env::temp_dir().join(format!("pwt-lock-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let holder = std::process::Command::new("flock")
        .arg(&pw.pin)
        .args(["-c", &format!("sleep 1; touch {}", marker.display())])
        .spawn()
        .unwrap();
    std::thread::sleep(portwatch_tests::bound(0.2)); // let the holder take the lock first
    pw.ok(&["ports", "add", "80"]);
    assert!(marker.exists(), "ports add ran while another process held the lock");
    let mut holder = holder;
    holder.wait().unwrap();
    let _ = std::fs::remove_file(&marker);
}

/// bpffs not mounted: portwatch mounts it, in PID 1's mount namespace (where the mount outlives
/// it); not mountable (no CAP_SYS_ADMIN): a clear error. In a mount namespace of its own (what `ip
/// netns exec` gives a command), a bpffs it mounted would vanish with everything pinned in it, so
/// it refuses and names the fix. The test's namespaces: `unshare -m -p -f --mount-proc` makes a
/// mount namespace whose PID 1 (the shell) shares it; `unshare -m` alone, one that PID 1 does not.
#[kernel_test]
fn bpffs_is_mounted_when_missing() {
    let bin = portwatch_tests::cli::portwatch_bin();
    let bin = bin.to_str().unwrap();
    let with_pid1 = ["unshare", "-m", "-p", "-f", "--mount-proc", "--propagation", "private"];
    let mut mounts = with_pid1.to_vec();
    let script = format!(
        "umount /sys/fs/bpf && {bin} --pin-path /sys/fs/bpf/pwt-mount status && mountpoint -q /sys/fs/bpf && echo mounted"
    );
    mounts.extend(["sh", "-c", &script]);
    let out = sh(&mounts).unwrap();
    assert!(out.contains("not loaded") && out.contains("mounted"), "{out}");

    let run = |unshare: &[&str], prefix: &str| {
        let mut args = unshare.to_vec();
        let script = format!("umount /sys/fs/bpf && {prefix} {bin} --pin-path /sys/fs/bpf/pwt-mount load --iface lo");
        args.extend(["sh", "-c", &script]);
        let r = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
        (r.status.code(), String::from_utf8_lossy(&r.stderr).into_owned())
    };
    let (code, stderr) = run(&with_pid1, "setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin");
    assert_eq!(code, Some(7), "{stderr}");
    assert!(
        stderr.contains("bpffs is not mounted") && stderr.contains("mount -t bpf"),
        "{stderr}"
    );

    let (code, stderr) = run(&["unshare", "-m", "--propagation", "private"], "");
    assert_eq!(code, Some(7), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("would vanish") && stderr.contains("nsenter --net="),
        "{stderr}"
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/pwt-mount").exists(),
        "nothing pinned in the host's bpffs"
    );
}

/// In a mount namespace of its own that has bpffs mounted (a container with the host's
/// /sys/fs/bpf bind-mounted), portwatch pins into that bpffs: the host sees the pins.
#[kernel_test]
fn a_mount_namespace_with_bpffs_mounted_is_fine() {
    let ns = Netns::new("mnt").unwrap();
    let pin = format!("/sys/fs/bpf/pwt-mnt-{}", std::process::id());
    let bin = portwatch_tests::cli::portwatch_bin();
    let script = format!(
        "exec nsenter --net=/run/netns/{} {} --pin-path {pin} load --iface lo --port 443",
        ns.name,
        bin.display()
    );
    let out = sh(&["unshare", "-m", "--propagation", "private", "sh", "-c", &script]).unwrap();
    assert!(out.contains("counting goes on"), "{out}");
    assert!(
        std::path::Path::new(&pin).join("maps/meta").exists(),
        "the host's bpffs holds the pins"
    );
    let unload = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg(&bin)
        .args(["--pin-path", &pin, "unload"])
        .output()
        .unwrap();
    assert!(unload.status.success(), "{}", String::from_utf8_lossy(&unload.stderr));
}

/// `ip netns exec NS portwatch load` (a mount namespace of its own, with a fresh /sys) is refused:
/// it never reports success for state that vanishes when the command exits, and pins nothing
/// anywhere.
#[kernel_test]
fn ip_netns_exec_is_refused() {
    let ns = Netns::new("exec").unwrap();
    let pin = format!("/sys/fs/bpf/pwt-exec-{}", std::process::id());
    let bin = portwatch_tests::cli::portwatch_bin();
    let r = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&bin)
        .args(["--pin-path", &pin, "load", "--iface", "lo", "--port", "443"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("nsenter --net=/run/netns/NS") && stderr.contains("--netns NS"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&r.stdout).is_empty(), "it reports no success");
    assert!(
        !std::path::Path::new(&pin).exists(),
        "nothing pinned in the host's bpffs"
    );
}

/// `load --netns NS` attaches to an interface inside another network namespace (the pins stay in
/// this bpffs) and counts its traffic exactly; portwatch's own namespace has an interface of the
/// same name: the two are told apart in attaching, `status`, `detach` and `unload`.
#[kernel_test(each_mode)]
fn interfaces_of_another_network_namespace(mode: &str) {
    let bed = Bed::new(false).unwrap();
    let home = Netns::new("home").unwrap();
    home.add_veth("pw0", "pw0p").unwrap();
    let pw = Pw::new(Some(&home));
    let out = pw.ok(&[
        "load",
        "--iface",
        "pw0",
        "--netns",
        &bed.server.name,
        "--port",
        "7002/udp",
        "--mode",
        mode,
    ]);
    assert!(
        out.contains(&format!(
            "attached to pw0 ingress ({mode}) in network namespace {}",
            bed.server.name
        )),
        "{out}"
    );
    pw.ok(&["attach", "pw0", "--mode", mode]);
    let status = pw.status();
    let netns: Vec<_> = status["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["interface"].clone(), a["netns"].clone(), a["present"].clone()))
        .collect();
    assert_eq!(
        netns,
        vec![
            (json!("pw0"), json!(null), json!(true)),
            (json!("pw0"), json!(null), json!(true)),
            (json!("pw0"), json!(bed.server.name), json!(true)),
            (json!("pw0"), json!(bed.server.name), json!(true)),
        ],
        "{status:#}"
    );
    assert_eq!(attached(&bed.server, "pw0", mode), 2);
    assert_eq!(attached(&home, "pw0", mode), 2);

    let sent = bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 40, 300).unwrap();
    let k = key(CLIENT_V4[0], 7002, UDP, IN);
    assert_eq!(
        pw.counters()[&k],
        Counters {
            bytes: sent,
            packets: 40
        }
    );

    let out = pw.ok(&["detach", "pw0", "--netns", &bed.server.name]);
    assert!(
        out.contains(&format!(
            "detached from pw0 egress in network namespace {}",
            bed.server.name
        )),
        "{out}"
    );
    assert_nothing_attached(&bed, &["pw0"]);
    assert_eq!(attached(&home, "pw0", mode), 2, "portwatch's own pw0 stays attached");
    bed.send_udp(CLIENT_V4[0], SERVER_V4, 7002, 10, 300).unwrap();
    assert_eq!(
        pw.counters()[&k],
        Counters {
            bytes: sent,
            packets: 40
        },
        "no longer counted"
    );

    pw.ok(&["attach", "pw0", "--netns", &bed.server.name, "--mode", mode]);
    pw.ok(&["unload"]);
    assert_nothing_attached(&bed, &["pw0"]);
    assert_eq!(attached(&home, "pw0", mode), 0);
}
