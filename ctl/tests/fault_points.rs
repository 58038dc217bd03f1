//! `ctl/src/fault.rs` documents every fault point: each `fault::point("NAME")` in `ctl/src` is a
//! `//! - \`NAME\`: ...` line of its documentation, and each such line names a point of the code.

use std::{collections::BTreeSet, path::Path};

fn src() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The names given to `fault::point` in `ctl/src`, with the file of each; a call whose argument is
/// not a string literal fails the test (its name could not be checked).
fn points_in_code() -> BTreeSet<(String, String)> {
    const CALL: &str = "fault::point(";
    fn walk(dir: &Path, out: &mut BTreeSet<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let file = path.strip_prefix(src()).unwrap().display().to_string();
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                let mut rest = line;
                while let Some(at) = rest.find(CALL) {
                    rest = &rest[at + CALL.len()..];
                    let name = rest
                        .strip_prefix('"')
                        .and_then(|r| r.split_once('"'))
                        .map(|(name, _)| name)
                        .unwrap_or_else(|| panic!("{file}: a fault point not named by a string literal: {line}"));
                    out.insert((name.to_string(), file.clone()));
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&src(), &mut out);
    out
}

/// The names of the list items of `fault.rs`'s module documentation (`//! - \`NAME\`: ...`).
fn points_documented() -> Vec<String> {
    std::fs::read_to_string(src().join("fault.rs"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("//! - `"))
        .map(|l| {
            l.split_once("`:")
                .unwrap_or_else(|| panic!("not `NAME`: ...: {l}"))
                .0
                .to_string()
        })
        .collect()
}

#[test]
fn every_fault_point_is_documented_and_every_documented_one_exists() {
    let in_code = points_in_code();
    let documented = points_documented();
    let code_names: BTreeSet<&str> = in_code.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        !code_names.is_empty(),
        "no fault::point(\"...\") found under {}",
        src().display()
    );

    let undocumented: Vec<String> = in_code
        .iter()
        .filter(|(n, _)| !documented.contains(n))
        .map(|(n, file)| format!("{n} ({file})"))
        .collect();
    assert!(
        undocumented.is_empty(),
        "fault points missing from ctl/src/fault.rs's list: {undocumented:?}"
    );

    let gone: Vec<&String> = documented.iter().filter(|n| !code_names.contains(n.as_str())).collect();
    assert!(
        gone.is_empty(),
        "ctl/src/fault.rs lists fault points the code does not have: {gone:?}"
    );

    let unique: BTreeSet<&String> = documented.iter().collect();
    assert_eq!(
        unique.len(),
        documented.len(),
        "listed twice in ctl/src/fault.rs: {documented:?}"
    );
}
