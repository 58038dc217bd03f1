//! Least privilege: the pins are root's alone (mode 0700 directories, 0600 pins); another user
//! gets exit code 3 and a clear message from every command and cannot open a pin even with
//! CAP_BPF; the read-only commands (and the map writers) need only CAP_BPF; a pin path through a
//! symbolic link, in a directory another user owns, or outside bpffs is refused.

use std::{
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
};

use portwatch_tests::{
    cli::{portwatch_bin, Pw},
    kernel_test,
};

const NOBODY: u32 = 65534;

/// The portwatch binary copied where any user may run it (the checkout may be private), removed
/// on drop.
struct PublicBinary(PathBuf);

impl PublicBinary {
    fn new() -> PublicBinary {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pwt-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("portwatch");
        std::fs::copy(portwatch_bin(), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        PublicBinary(bin)
    }
}

impl Drop for PublicBinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

/// Every file and directory under the pin path: directories 0700, pins without group or other
/// bits, all owned by root.
#[kernel_test]
fn the_pins_are_roots_alone() {
    let lo = Pw::on_loopback("priv", &[]);
    let pw = &lo.pw;
    let mut seen = 0;
    let mut walk = vec![pw.pin.clone()];
    while let Some(path) = walk.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.uid(), 0, "{}", path.display());
        if meta.is_dir() {
            assert_eq!(meta.mode() & 0o7777, 0o700, "{}", path.display());
            walk.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(
                meta.mode() & 0o077,
                0,
                "{} is {:o}",
                path.display(),
                meta.mode() & 0o7777
            );
            seen += 1;
        }
    }
    // The maps, the barrier, two programs and two TCX links (or none with tc).
    assert!(seen >= 13, "{seen} pins");
}

/// Another user: every command fails with exit code 3 and says what it needs; the pins cannot be
/// read as files, nor opened with bpf(2) even by a user given CAP_BPF.
#[kernel_test]
fn another_user_is_refused_by_every_command_and_by_the_pins() {
    let lo = Pw::on_loopback("priv", &[]);
    let pw = &lo.pw;
    let bin = PublicBinary::new();
    let pin = pw.pin.to_str().unwrap();
    let config = std::env::temp_dir().join(format!("pwt-priv-{}.yaml", std::process::id()));
    std::fs::write(&config, "pin_path: /sys/fs/bpf/x\n").unwrap();
    let commands: Vec<Vec<&str>> = vec![
        vec!["status"],
        vec!["status", "--json"],
        vec!["top"],
        vec!["ports", "list"],
        vec!["ports", "add", "8080"],
        vec!["reset", "--json"],
        vec!["metrics"],
        vec!["serve", "--listen", "127.0.0.1:0"],
        vec!["config", "show"],
        vec!["load", "--iface", "lo", "--port", "443"],
        vec!["attach", "lo"],
        vec!["detach", "lo"],
        vec!["unload"],
        vec!["apply", "-f", config.to_str().unwrap()],
        vec!["check"],
    ];
    for args in &commands {
        let out = Command::new(&bin.0)
            .arg("--pin-path")
            .arg(pin)
            .args(args)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(
            stderr.contains("permission denied") && stderr.contains("CAP_BPF") && stderr.contains("sudo"),
            "{args:?}: {stderr}"
        );
    }
    let _ = std::fs::remove_file(&config);
    // The state is untouched.
    assert_eq!(pw.ok(&["ports", "list"]), "443\n");

    // A pin as a file, and through bpf(2) with CAP_BPF.
    let map = pw.pin.join("maps/counters_0");
    let cat = Command::new("cat").arg(&map).uid(NOBODY).gid(NOBODY).output().unwrap();
    assert!(!cat.status.success());
    assert!(String::from_utf8_lossy(&cat.stderr).contains("Permission denied"));
    let with_bpf = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+bpf",
            "--ambient-caps=-all,+bpf",
            "bpftool",
            "map",
            "show",
            "pinned",
        ])
        .arg(&map)
        .output()
        .unwrap();
    // (bpftool says "Permission denied", or that it cannot statfs the directory it may not enter.)
    let stderr = String::from_utf8_lossy(&with_bpf.stderr);
    assert!(!with_bpf.status.success(), "{stderr}");
    assert!(
        with_bpf.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&with_bpf.stdout)
    );
    // The same as root succeeds: the refusal above is the pins' permissions.
    let as_root = Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(&map)
        .output()
        .unwrap();
    assert!(as_root.status.success(), "{}", String::from_utf8_lossy(&as_root.stderr));
}

/// Run as root with CAP_BPF alone (a service's `CapabilityBoundingSet=CAP_BPF`): the commands that
/// read or write maps work; those that load or attach say CAP_NET_ADMIN is missing.
#[kernel_test]
fn map_commands_need_only_cap_bpf() {
    let lo = Pw::on_loopback("priv", &[]);
    let pw = &lo.pw;
    let only_bpf = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args([
                "--inh-caps=-all,+bpf",
                "--ambient-caps=-all,+bpf",
                "--bounding-set=-all,+bpf",
            ])
            .arg(portwatch_bin())
            .arg("--pin-path")
            .arg(&pw.pin)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [
        &["status", "--json"][..],
        &["top", "--json"],
        &["ports", "list"],
        &["ports", "add", "8080"],
        &["reset", "--json"],
        &["metrics"],
        &["config", "show"],
        &["alert", "--interval", "0.1"],
    ] {
        let (code, _, stderr) = only_bpf(args);
        assert_eq!(code, Some(0), "{args:?} with CAP_BPF alone: {stderr}");
    }
    assert_eq!(pw.ok(&["ports", "list"]), "443\n8080\n");
    for args in [&["attach", "lo"][..], &["detach", "lo"], &["unload"]] {
        let (code, _, stderr) = only_bpf(args);
        assert_eq!(code, Some(3), "{args:?}: {stderr}");
        assert!(stderr.contains("missing: CAP_NET_ADMIN"), "{args:?}: {stderr}");
    }
}

/// A pin path through a symbolic link, a pin directory another user made, and a pin path outside
/// bpffs are refused (exit code 7), with nothing created.
#[kernel_test]
fn a_pin_path_that_could_be_someone_elses_is_refused() {
    struct Cleanup(Vec<PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = std::fs::remove_file(p);
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }
    let id = std::process::id();
    let real = PathBuf::from(format!("/sys/fs/bpf/pwt-real-{id}"));
    let link = PathBuf::from(format!("/sys/fs/bpf/pwt-link-{id}"));
    let foreign = PathBuf::from(format!("/sys/fs/bpf/pwt-foreign-{id}"));
    let _cleanup = Cleanup(vec![link.clone(), real.clone(), foreign.clone()]);
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(NOBODY), Some(NOBODY)).unwrap();
    let refused = |pin: &Path, what: &str| {
        let out = Command::new(portwatch_bin())
            .arg("--pin-path")
            .arg(pin)
            .args(["ports", "add", "443"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "{}: {stderr}", pin.display());
        assert!(stderr.contains(what), "{}: {stderr}", pin.display());
    };
    refused(&link, "is a symbolic link");
    refused(&link.join("sub"), "is a symbolic link");
    refused(&foreign, "belongs to uid 65534");
    refused(Path::new("/tmp/pwt-not-bpffs"), "is not on a bpffs mount");
    assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 0);
}
