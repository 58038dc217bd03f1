//! The shape of `ctl/src`: no module imports a module that imports it back, directly or through
//! others, no verb (`cmd::<verb>`) uses another verb, and `unsafe` is only in `sys/`. A module's imports are the paths it
//! names: `crate::a::b` (in `use` trees too), `super::x`, and `child::x` for a child module it
//! declares.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

type Module = String;

/// Every module of the crate, by path (`crate`, `crate::cmd`, `crate::cmd::top`...), with its source.
fn modules() -> BTreeMap<Module, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<Module, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src()).unwrap().with_extension("");
                let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
                if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                    parts.pop();
                }
                if parts == ["main"] {
                    continue; // the binary: `portwatch::main` only
                }
                let name = std::iter::once("crate".to_string())
                    .chain(parts)
                    .collect::<Vec<_>>()
                    .join("::");
                out.insert(name, strip_comments(&std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &mut out);
    out
}

fn src() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code that imports: without `//` comments (doc comments included), so that prose naming a
/// path does not count; without the unit tests (`#[cfg(test)]` to the end, where they live), whose
/// `use super::*` is their own module's; without `pub(in path)` visibilities.
fn strip_comments(code: &str) -> String {
    let code = code.split("#[cfg(test)]").next().unwrap();
    let code = code
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("pub(in ") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        rest = &rest[rest.find(')').map_or(rest.len(), |e| e + 1)..];
    }
    out.push_str(rest);
    out
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths a `use` tree after `prefix::` names: `a::b`, `{a, b::{c, self}}`.
fn use_tree(text: &str, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let text_chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut path = prefix.to_vec();
    loop {
        while i < text_chars.len() && text_chars[i].is_whitespace() {
            i += 1;
        }
        if i < text_chars.len() && text_chars[i] == '{' {
            i += 1;
            loop {
                let rest: String = text_chars[i..].iter().collect();
                i += use_tree(&rest, &path, out);
                while i < text_chars.len() && text_chars[i].is_whitespace() {
                    i += 1;
                }
                match text_chars.get(i) {
                    Some(',') => {
                        i += 1;
                        while i < text_chars.len() && text_chars[i].is_whitespace() {
                            i += 1;
                        }
                        if text_chars.get(i) == Some(&'}') {
                            return i + 1;
                        }
                    }
                    Some('}') => return i + 1,
                    _ => return i,
                }
            }
        }
        let start = i;
        while i < text_chars.len() && is_ident_char(text_chars[i]) {
            i += 1;
        }
        let ident: String = text_chars[start..i].iter().collect();
        if ident.is_empty() {
            out.push(path);
            return i;
        }
        if ident != "self" {
            path.push(ident);
        }
        if text_chars.get(i) == Some(&':') && text_chars.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            out.push(path);
            return i;
        }
    }
}

/// The modules `module` imports.
fn imports(module: &str, code: &str, all: &BTreeMap<Module, String>) -> BTreeSet<Module> {
    let segments: Vec<String> = module.split("::").map(String::from).collect();
    let children: BTreeSet<&str> = all
        .keys()
        .filter_map(|m| m.strip_prefix(&format!("{module}::")))
        .filter(|rest| !rest.contains("::"))
        .collect();
    let mut paths: Vec<Vec<String>> = vec![];
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !is_ident_char(chars[i - 1]) && chars[i - 1] != ':';
        if !boundary || !is_ident_char(chars[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident_char(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if !(chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':')) {
            continue;
        }
        let rest: String = chars[i + 2..].iter().collect();
        match word.as_str() {
            "crate" => {
                i += 2 + use_tree(&rest, &["crate".to_string()], &mut paths);
            }
            "super" => {
                let parent = segments[..segments.len() - 1].to_vec();
                i += 2 + use_tree(&rest, &parent, &mut paths);
            }
            child if children.contains(child) => {
                let mut here = segments.clone();
                here.push(child.to_string());
                i += 2 + use_tree(&rest, &here, &mut paths);
            }
            _ => {}
        }
    }
    paths
        .into_iter()
        .filter_map(|p| {
            // The longest prefix of the path that is a module.
            (1..=p.len())
                .rev()
                .map(|n| p[..n].join("::"))
                .find(|m| all.contains_key(m))
        })
        .filter(|m| m != module)
        .collect()
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let all = modules();
    all.iter()
        .map(|(m, code)| (m.clone(), imports(m, code, &all)))
        .collect()
}

#[test]
fn the_import_graph_is_read_right() {
    // Known edges, so that a parser that finds nothing cannot pass the tests below.
    let g = graph();
    for (from, to) in [
        ("crate::cmd", "crate::cmd::load"),
        ("crate::cmd", "crate::cli"),
        ("crate::cmd::reset", "crate::reset"),
        ("crate::reset", "crate::generation"),
        ("crate::cmd::top", "crate::cmd::top::watch"),
        ("crate::cmd::top::watch", "crate::output"),
        ("crate::output", "crate::report"),
        ("crate::pinned", "crate::error"),
        ("crate::attach", "crate::sys::netlink"),
    ] {
        assert!(
            g[from].contains(to),
            "{from} should import {to}: it imports {:?}",
            g[from]
        );
    }
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let g = graph();
    // Every module from which `start` can be reached again is on a cycle with it.
    for start in g.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(Module, Vec<Module>)> = vec![(start.clone(), vec![start.clone()])];
        while let Some((m, path)) = stack.pop() {
            for next in &g[&m] {
                if next == start {
                    panic!("an import cycle: {} -> {start}", path.join(" -> "));
                }
                if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
}

#[test]
fn no_verb_uses_another_verb() {
    let g = graph();
    let verb_of = |m: &str| {
        m.strip_prefix("crate::cmd::")
            .map(|rest| rest.split("::").next().unwrap().to_string())
    };
    for (m, imported) in &g {
        let Some(verb) = verb_of(m) else { continue };
        for other in imported {
            if let Some(other_verb) = verb_of(other) {
                assert_eq!(
                    other_verb, verb,
                    "{m} uses {other}: share it through the module of its concept"
                );
            }
            assert_ne!(other, "crate::cmd", "{m} uses the dispatcher");
        }
    }
}

/// Raw system calls and byte views live in `sys/` (and in `portwatch-common`'s `Pod` impls): every
/// other module is safe Rust. The word itself is looked for, in code, comments and unit tests alike,
/// as `grep -rln unsafe ctl/src` would.
#[test]
fn unsafe_is_only_in_sys() {
    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut all = vec![];
    files(&src(), &mut all);
    assert!(all.len() > 20, "the sources were found");
    let sys = src().join("sys");
    assert!(
        all.iter()
            .filter(|p| p.starts_with(&sys))
            .any(|p| std::fs::read_to_string(p).unwrap().contains("unsafe")),
        "the check can see an unsafe block"
    );
    let outside: Vec<_> = all
        .iter()
        .filter(|p| !p.starts_with(&sys))
        .filter(|p| std::fs::read_to_string(p).unwrap().contains("unsafe"))
        .map(|p| p.strip_prefix(src()).unwrap().display().to_string())
        .collect();
    assert!(
        outside.is_empty(),
        "unsafe outside ctl/src/sys: {outside:?} (put the system call or byte view in sys/, behind a safe function)"
    );
}
