//! The documentation leads: the README is a front page (under 150 lines) that links every file of
//! `docs/`, and every relative link of the repository's Markdown resolves, to a file that exists
//! and, with a `#fragment`, to one of its headings (GitHub's anchors). Links to other sites are
//! not fetched (the tests run without a network).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The Markdown files that are the project's documentation.
fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut files: Vec<PathBuf> = ["README.md", "CONTRIBUTING.md", "BENCHMARKS.md", "bpffs-layout.md"]
        .iter()
        .map(|f| root.join(f))
        .collect();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("a docs/ directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The lines of `text` outside fenced code blocks (and not the fences themselves).
fn outside_code_blocks(text: &str) -> impl Iterator<Item = &str> {
    let mut fenced = false;
    text.lines().filter(move |line| {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// The text outside fenced code blocks and inline code spans (a link there is not a link).
fn prose(text: &str) -> String {
    let mut out = String::new();
    for line in outside_code_blocks(text) {
        // Inline code: drop what is between backticks, keep the rest of the line.
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
                out.push(' ');
            } else if !in_code {
                out.push(c);
            } else if c == ']' || c == '(' || c == ')' {
                out.push(' ');
            } else {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// The targets of the inline links `[text](target)` of `text` (link text may hold code spans,
/// which `prose` blanked).
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut out = vec![];
    let mut rest = prose.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(end) => {
                out.push(after[..end].trim().to_string());
                rest = &after[end..];
            }
            None => break,
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of `text`'s headings (outside code blocks), numbered as GitHub numbers repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in outside_code_blocks(text).filter(|line| line.starts_with('#')) {
        let base = slug(line.trim_start_matches('#'));
        let mut anchor = base.clone();
        let mut n = 1;
        while seen.contains(&anchor) {
            anchor = format!("{base}-{n}");
            n += 1;
        }
        seen.insert(anchor);
    }
    seen
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = vec![];
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                doc.clone()
            } else {
                doc.parent().unwrap().join(path)
            };
            if !file.exists() {
                broken.push(format!("{}: {target}: no such file", doc.display()));
                continue;
            }
            if let Some(fragment) = fragment {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                if !anchors(&text).contains(fragment) {
                    broken.push(format!(
                        "{}: {target}: no heading with that anchor in {}",
                        doc.display(),
                        file.display()
                    ));
                }
            }
        }
    }
    assert!(checked > 30, "only {checked} links found: is the link parser broken?");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_a_front_page_that_links_every_doc() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines < 150, "README.md has {lines} lines: the manual belongs in docs/");
    let linked: BTreeSet<String> = links(&readme).into_iter().collect();
    for doc in documents().iter().filter(|d| d.parent().unwrap().ends_with("docs")) {
        let name = format!("docs/{}", doc.file_name().unwrap().to_str().unwrap());
        assert!(
            linked.iter().any(|l| l.split('#').next() == Some(name.as_str())),
            "README.md does not link {name}"
        );
    }
}

/// The checker itself: a heading's anchor as GitHub makes it, and links inside code not taken.
#[test]
fn the_checker_reads_links_and_anchors_as_github_does() {
    assert_eq!(
        slug(" JSON schema (`top --json`, `reset --json`)"),
        "json-schema-top---json-reset---json"
    );
    assert_eq!(
        slug(" History: the store at a month of 10,000-row records (issue 20)"),
        "history-the-store-at-a-month-of-10000-row-records-issue-20"
    );
    let text = "# A\n## A\n```\n# not a heading [x](nowhere.md)\n```\nsee [b](b.md#a-1) and `[c](c.md)`\n";
    assert_eq!(links(text), vec!["b.md#a-1".to_string()]);
    assert_eq!(anchors(text), BTreeSet::from(["a".to_string(), "a-1".to_string()]));
}
