//! The CLI's help is part of its contract: examples and documented exit codes. (Cargo also builds
//! the `portwatch` binary for these tests, before any test runs; the kernel tests in `tests/` use it.)

use std::process::Command;

fn portwatch(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_portwatch"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_has_examples_and_exit_codes() {
    let out = portwatch(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "portwatch load --iface eth0 --port 443",
        "portwatch ports add 8080",
        "Exit codes:",
        "3 not root",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
}

#[test]
fn every_verb_has_help_with_an_example() {
    for verb in [
        &["load"][..],
        &["attach"],
        &["detach"],
        &["status"],
        &["ports", "add"],
        &["ports", "del"],
        &["ports", "set"],
        &["apply"],
        &["watch"],
        &["config", "show"],
        &["metrics"],
        &["serve"],
        &["alert"],
        &["completions"],
        &["man"],
        &["unload"],
    ] {
        let mut args = verb.to_vec();
        args.push("--help");
        let out = portwatch(&args);
        assert!(out.status.success(), "{verb:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Example"), "{verb:?} --help has no example:\n{text}");
    }
}

#[test]
fn usage_errors_are_one_line_with_exit_code_2() {
    for args in [
        &["load"][..],
        &["ports", "add"],
        &["ports", "add", "0"],
        &["frobnicate"],
        &["load", "--iface", "lo", "--max-entries", "0"],
    ] {
        let out = portwatch(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("portwatch: "), "{stderr}");
    }
}

/// The verbs `portwatch --help` lists.
fn verbs() -> Vec<String> {
    let help = String::from_utf8(portwatch(&["--help"]).stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .filter(|v| v != "help")
        .collect()
}

/// Completions are generated from the command line's definitions: every verb is in them, for
/// every shell, and they need no root (no privilege check runs).
#[test]
fn completions_know_every_verb() {
    let verbs = verbs();
    assert!(verbs.len() >= 15, "{verbs:?}");
    for shell in ["bash", "zsh", "fish"] {
        let out = portwatch(&["completions", shell]);
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        for verb in &verbs {
            assert!(script.contains(verb.as_str()), "{shell} completions lack {verb}");
        }
    }
    let out = portwatch(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
}

/// The manual page has a section for every verb, with its options, from the same definitions.
#[test]
fn the_manual_page_has_every_verb() {
    let out = portwatch(&["man"]);
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH portwatch 8"), "{page}");
    for verb in verbs() {
        assert!(
            page.contains(&format!(".SH \"PORTWATCH {}\"", verb.to_uppercase())),
            "the page lacks {verb}"
        );
    }
    assert!(
        page.contains("\\-\\-drain\\-to") && page.contains("\\-\\-per\\-ip"),
        "options are in it"
    );
}
