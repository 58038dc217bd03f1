//! The Kubernetes manifests in `examples/kubernetes/` cannot rot: kubernetes-validate (the version
//! `.ci/bootstrap` pins) accepts every object with `--strict` against the schemas it carries (all
//! but the ServiceMonitor, a custom resource it has no schema for: that one is held to the rules
//! below only), the ConfigMap's portwatch.yaml applies with the portwatch under test, and the rules
//! that no schema knows hold. Each rule has a name, which a broken copy of the manifests must make
//! fire (the negative cases below).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use portwatch_tests::{cli::Pw, kernel_test, netns::Netns, TestDir, TestFile};
use serde::Deserialize;
use serde_yaml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn manifest_dir() -> PathBuf {
    root().join("examples/kubernetes")
}

/// Every manifest file, in `kubectl apply -f` order, its subdirectories' too.
fn manifest_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                found.push(path);
            }
        }
    }
    let mut found = vec![];
    walk(&manifest_dir(), &mut found);
    found
}

/// One object of a manifest file.
#[derive(Clone)]
struct Doc {
    file: String,
    value: Value,
}

fn load() -> Vec<Doc> {
    let mut docs = vec![];
    for path in manifest_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.strip_prefix(manifest_dir()).unwrap().display().to_string();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).unwrap_or_else(|e| panic!("{file}: {e}"));
            if !value.is_null() {
                docs.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    docs
}

fn kind(doc: &Doc) -> &str {
    doc.value["kind"].as_str().unwrap_or("")
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn one<'a>(docs: &'a [Doc], of_kind: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs.iter().filter(|d| kind(d) == of_kind).collect();
    assert_eq!(found.len(), 1, "one {of_kind} in examples/kubernetes");
    found[0]
}

/// The pod templates (the DaemonSet's), with the file they are in.
fn pod_specs(docs: &[Doc]) -> Vec<(&Doc, &Value)> {
    docs.iter()
        .filter(|d| matches!(kind(d), "DaemonSet" | "Deployment" | "StatefulSet" | "Job"))
        .map(|d| (d, &d.value["spec"]["template"]["spec"]))
        .collect()
}

/// Every container of a pod, init containers first.
fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    seq(&pod["initContainers"]).iter().chain(seq(&pod["containers"]))
}

/// A container's command line and arguments, as one string (a shell script included).
fn command_line(container: &Value) -> String {
    seq(&container["command"])
        .iter()
        .chain(seq(&container["args"]))
        .map(str_of)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The portwatch verbs a container runs (`apply`, `serve`, `reset`, `history`...).
fn verbs(container: &Value) -> BTreeSet<String> {
    let re = regex::Regex::new(r"(?:^|[\s/])portwatch\s+(?:--pin-path\s+\S+\s+)?([a-z]+)").unwrap();
    re.captures_iter(&command_line(container))
        .map(|c| c[1].to_string())
        .collect()
}

/// The capabilities a verb needs (README, "Privileges").
fn needs(verb: &str) -> &'static [&'static str] {
    match verb {
        "load" | "attach" | "detach" | "unload" | "apply" | "watch" | "check" => &["BPF", "NET_ADMIN"],
        "history" | "completions" | "man" => &[],
        _ => &["BPF"],
    }
}

/// What a loader may have beyond what the dispatcher checks, each justified in the DaemonSet's
/// comments: the verifier's rules for a CAP_PERFMON loader, setns(2) into `netns:` namespaces,
/// RLIMIT_MEMLOCK on kernels before 5.11.
const LOADER_EXTRAS: &[&str] = &["PERFMON", "SYS_ADMIN", "SYS_RESOURCE"];

/// The hostPath mounts a container may write, and why; every other one is read-only.
const WRITES: &[(&str, &str, &str)] = &[
    ("apply", "/sys/fs/bpf", "creates and removes the pins"),
    ("apply", "/var/log/portwatch", "a reload drains the counters here"),
    (
        "reset",
        "/sys/fs/bpf",
        "the exclusive lock makes sure the pin directory is mode 0700",
    ),
    ("reset", "/var/log/portwatch", "appends the reset records"),
    ("reset", "/var/lib/portwatch", "the history store"),
];

/// The Service's port of this name.
fn service_port<'a>(service: &'a Doc, name: &str) -> Option<&'a Value> {
    seq(&service.value["spec"]["ports"])
        .iter()
        .find(|p| str_of(&p["name"]) == name)
}

/// `selector` (a label map) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Every rule no schema knows, over a set of manifests: one line per violation, led by the rule's
/// name.
fn violations(docs: &[Doc]) -> Vec<String> {
    let mut found = vec![];
    let mut say = |rule: &str, what: String| found.push(format!("{rule}: {what}"));
    let pods = pod_specs(docs);
    if pods.is_empty() {
        say("pods", "no pod template in examples/kubernetes".into());
    }
    let host_paths = |pod: &Value| -> BTreeMap<String, String> {
        seq(&pod["volumes"])
            .iter()
            .filter(|v| v["hostPath"].is_mapping())
            .map(|v| {
                (
                    str_of(&v["name"]).to_string(),
                    str_of(&v["hostPath"]["path"]).to_string(),
                )
            })
            .collect()
    };
    for (doc, pod) in &pods {
        let at = |c: &Value| format!("{} container {}", doc.file, str_of(&c["name"]));
        let host = host_paths(pod);
        if pod["hostNetwork"] != Value::Bool(true) {
            say(
                "host-network",
                format!(
                    "{}: an attachment is recorded in the network namespace portwatch runs in: the node's",
                    doc.file
                ),
            );
        }
        if pod["automountServiceAccountToken"] != Value::Bool(false) {
            say(
                "no-token",
                format!("{}: portwatch uses no API: mount no token", doc.file),
            );
        }
        for c in containers(pod) {
            let sc = &c["securityContext"];
            let privileged = sc["privileged"] == Value::Bool(true);
            for m in seq(&c["volumeMounts"]) {
                let name = str_of(&m["name"]);
                if str_of(&m["mountPropagation"]) == "Bidirectional" && !privileged {
                    say(
                        "bidirectional-needs-privileged",
                        format!("{}: {name} is Bidirectional but the container is not privileged", at(c)),
                    );
                }
                if let Some(path) = host.get(name) {
                    let writes = WRITES.iter().any(|(who, p, _)| *who == str_of(&c["name"]) && p == path);
                    if !writes && m["readOnly"] != Value::Bool(true) {
                        say(
                            "host-path-read-only",
                            format!(
                                "{}: hostPath {path} is writable, and nothing in it is written by this container",
                                at(c)
                            ),
                        );
                    }
                }
            }
            let requests = &c["resources"]["requests"];
            if requests["cpu"].is_null() || requests["memory"].is_null() || c["resources"]["limits"]["memory"].is_null()
            {
                say(
                    "resources",
                    format!("{}: needs requests (cpu, memory) and a memory limit", at(c)),
                );
            }
            let caps = &sc["capabilities"];
            if seq(&caps["drop"]).iter().map(str_of).collect::<Vec<_>>() != ["ALL"] {
                say("drop-all", format!("{}: capabilities must drop ALL", at(c)));
            }
            if sc["allowPrivilegeEscalation"] != Value::Bool(false) {
                say(
                    "no-privilege-escalation",
                    format!("{}: allowPrivilegeEscalation: false", at(c)),
                );
            }
            if sc["readOnlyRootFilesystem"] != Value::Bool(true) {
                say("read-only-root", format!("{}: readOnlyRootFilesystem: true", at(c)));
            }
            if privileged
                && !seq(&c["volumeMounts"])
                    .iter()
                    .any(|m| str_of(&m["mountPropagation"]) == "Bidirectional")
            {
                say(
                    "privileged-only-for-bidirectional",
                    format!(
                        "{}: privileged without a Bidirectional mount, the only thing that needs it",
                        at(c)
                    ),
                );
            }
            let verbs = verbs(c);
            let added: BTreeSet<&str> = seq(&caps["add"]).iter().map(str_of).collect();
            let needed: BTreeSet<&str> = verbs.iter().flat_map(|v| needs(v).iter().copied()).collect();
            let loader = needed.contains("NET_ADMIN");
            for cap in &needed {
                if !added.contains(cap) {
                    say("capabilities", format!("{}: runs {verbs:?}, which need {cap}", at(c)));
                }
            }
            for cap in &added {
                if !(needed.contains(cap) || loader && LOADER_EXTRAS.contains(cap)) {
                    say(
                        "capabilities",
                        format!("{}: adds {cap}, which {verbs:?} do not need", at(c)),
                    );
                }
            }
            if !verbs.is_empty() && verbs.iter().any(|v| !needs(v).is_empty()) {
                let bpffs = seq(&c["volumeMounts"]).iter().any(|m| {
                    str_of(&m["mountPath"]) == "/sys/fs/bpf"
                        && host.get(str_of(&m["name"])).is_some_and(|p| p == "/sys/fs/bpf")
                });
                if !bpffs {
                    say(
                        "bpffs-mounted",
                        format!(
                            "{}: runs portwatch without the node's /sys/fs/bpf at /sys/fs/bpf",
                            at(c)
                        ),
                    );
                }
            }
        }
        for v in seq(&pod["volumes"]) {
            if let Some(mode) = v["configMap"]["defaultMode"].as_u64() {
                if mode & 0o022 != 0 {
                    say(
                        "config-mode",
                        format!("{}: mode {mode:o} lets users other than root change portwatch.yaml, which portwatch refuses", doc.file),
                    );
                }
            }
        }
    }

    // The ConfigMap holds a portwatch.yaml, where `apply -f` reads it, with its pins on the node's
    // bpffs.
    let config_map = one(docs, "ConfigMap");
    let text = str_of(&config_map.value["data"]["portwatch.yaml"]);
    let pin_path = serde_yaml::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["pin_path"].as_str().map(String::from))
        .unwrap_or_default();
    if !pin_path.starts_with("/sys/fs/bpf/") {
        say(
            "pin-path",
            format!("portwatch.yaml's pin_path {pin_path:?} is not on the node's bpffs"),
        );
    }
    let applies = regex::Regex::new(r"apply\s+(?:-f|--file)\s+(\S+)").unwrap();
    for (doc, pod) in &pods {
        for c in containers(pod) {
            let line = command_line(c);
            for file in applies.captures_iter(&line) {
                let file = Path::new(&file[1]);
                let mounted = seq(&c["volumeMounts"]).iter().any(|m| {
                    Path::new(str_of(&m["mountPath"])) == file.parent().unwrap()
                        && seq(&pod["volumes"]).iter().any(|v| {
                            v["name"] == m["name"] && v["configMap"]["name"] == config_map.value["metadata"]["name"]
                        })
                });
                if !mounted || file.file_name().unwrap() != "portwatch.yaml" {
                    say(
                        "config-mounted",
                        format!(
                            "{}: applies {}, which is not the ConfigMap's portwatch.yaml",
                            doc.file,
                            file.display()
                        ),
                    );
                }
            }
        }
    }

    // The reset is portwatch-reset.service's, command line for command line.
    let unit = std::fs::read_to_string(root().join("examples/portwatch-reset.service")).unwrap();
    let resets: Vec<String> = pods
        .iter()
        .flat_map(|(_, pod)| containers(pod))
        .filter(|c| verbs(c).contains("reset"))
        .map(command_line)
        .collect();
    if resets.len() != 1 {
        say(
            "reset",
            format!("{} containers reset the counters, not one", resets.len()),
        );
    }
    for line in unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart=").or(l.strip_prefix("ExecStartPost=")))
    {
        let command = line
            .trim_start_matches('-')
            .replace("/usr/local/sbin/portwatch", "portwatch");
        if !resets.iter().any(|r| r.contains(&command)) {
            say(
                "reset",
                format!("the reset container does not run `{command}` (portwatch-reset.service)"),
            );
        }
    }

    // One port from serve's --listen to the ServiceMonitor.
    let service = one(docs, "Service");
    let monitor = docs.iter().find(|d| kind(d) == "ServiceMonitor");
    let listen = regex::Regex::new(r"--listen[ =](\S+)").unwrap();
    for (doc, pod) in &pods {
        if !selects(
            &service.value["spec"]["selector"],
            &doc.value["spec"]["template"]["metadata"]["labels"],
        ) {
            say(
                "ports-agree",
                format!("the Service does not select {}'s pods", doc.file),
            );
        }
        for c in containers(pod).filter(|c| verbs(c).contains("serve")) {
            let line = command_line(c);
            let port: Option<u64> = listen
                .captures(&line)
                .and_then(|m| m[1].rsplit(':').next().and_then(|p| p.parse().ok()));
            let named: Vec<(&str, u64)> = seq(&c["ports"])
                .iter()
                .map(|p| (str_of(&p["name"]), p["containerPort"].as_u64().unwrap_or(0)))
                .collect();
            if port.is_none() || named.iter().all(|(_, p)| Some(*p) != port) {
                say(
                    "ports-agree",
                    format!("serve listens on {port:?}, no container port is that: {named:?}"),
                );
            }
            let resolves = |target: &Value| match target {
                Value::Number(n) => n.as_u64() == port,
                Value::String(name) => named.iter().any(|(n, p)| n == name && Some(*p) == port),
                _ => false,
            };
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let target = &c[probe]["httpGet"]["port"];
                if !target.is_null() && !resolves(target) {
                    say(
                        "ports-agree",
                        format!("{probe} port {target:?} is not serve's {port:?}"),
                    );
                }
            }
            let metrics = service_port(service, "metrics");
            if !metrics.is_some_and(|p| resolves(&p["targetPort"]) && p["port"].as_u64() == port) {
                say(
                    "ports-agree",
                    format!("the Service's port `metrics` does not lead to serve's {port:?}"),
                );
            }
        }
    }
    match monitor {
        None => say("ports-agree", "no ServiceMonitor".into()),
        Some(monitor) => {
            let spec = &monitor.value["spec"];
            if !selects(&spec["selector"]["matchLabels"], &service.value["metadata"]["labels"]) {
                say("ports-agree", "the ServiceMonitor does not select the Service".into());
            }
            let namespace = &service.value["metadata"]["namespace"];
            if !seq(&spec["namespaceSelector"]["matchNames"]).contains(namespace) {
                say(
                    "ports-agree",
                    "the ServiceMonitor does not look in the Service's namespace".into(),
                );
            }
            for e in seq(&spec["endpoints"]) {
                if service_port(service, str_of(&e["port"])).is_none() || str_of(&e["path"]) != "/metrics" {
                    say(
                        "ports-agree",
                        format!("ServiceMonitor endpoint {e:?}: not the Service's port and /metrics"),
                    );
                }
            }
        }
    }

    // Everything in the one namespace, with its service account, which mounts no token.
    let namespace = str_of(&one(docs, "Namespace").value["metadata"]["name"]).to_string();
    for doc in docs.iter().filter(|d| kind(d) != "Namespace") {
        if str_of(&doc.value["metadata"]["namespace"]) != namespace {
            say("namespace", format!("{} {} is not in {namespace}", doc.file, kind(doc)));
        }
    }
    let account = one(docs, "ServiceAccount");
    if account.value["automountServiceAccountToken"] != Value::Bool(false) {
        say("no-token", "the ServiceAccount mounts a token".into());
    }
    for (doc, pod) in &pods {
        if pod["serviceAccountName"] != account.value["metadata"]["name"] {
            say("no-token", format!("{} runs as another service account", doc.file));
        }
    }
    found
}

#[test]
fn the_manifests_keep_the_rules() {
    let docs = load();
    let kinds: BTreeSet<&str> = docs.iter().map(kind).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ])
    );
    let found = violations(&docs);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// A copy of the manifests with one change; the rule's name must be among what it breaks.
fn breaks(rule: &str, change: impl FnOnce(&mut Vec<Doc>)) {
    let mut docs = load();
    change(&mut docs);
    let found = violations(&docs);
    assert!(
        found.iter().any(|v| v.starts_with(&format!("{rule}: "))),
        "the change should break {rule}, found: {found:#?}"
    );
}

fn doc_mut<'a>(docs: &'a mut [Doc], of_kind: &str) -> &'a mut Value {
    &mut docs.iter_mut().find(|d| kind(d) == of_kind).unwrap().value
}

fn container_mut<'a>(docs: &'a mut [Doc], name: &str) -> &'a mut Value {
    let pod = &mut doc_mut(docs, "DaemonSet")["spec"]["template"]["spec"];
    let all: Vec<&mut Value> = pod
        .as_mapping_mut()
        .unwrap()
        .iter_mut()
        .filter(|(k, _)| *k == "initContainers" || *k == "containers")
        .flat_map(|(_, v)| v.as_sequence_mut().unwrap().iter_mut())
        .collect();
    all.into_iter().find(|c| c["name"] == name).unwrap()
}

fn mount_mut<'a>(container: &'a mut Value, path: &str) -> &'a mut Value {
    container["volumeMounts"]
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|m| m["mountPath"] == path)
        .unwrap()
}

#[test]
fn a_broken_copy_breaks_its_rule() {
    breaks("bidirectional-needs-privileged", |d| {
        mount_mut(container_mut(d, "apply"), "/sys/fs/bpf")["mountPropagation"] = "Bidirectional".into();
    });
    breaks("privileged-only-for-bidirectional", |d| {
        container_mut(d, "serve")["securityContext"]["privileged"] = true.into();
    });
    breaks("host-path-read-only", |d| {
        mount_mut(container_mut(d, "serve"), "/sys/fs/bpf")["readOnly"] = false.into();
    });
    breaks("host-path-read-only", |d| {
        mount_mut(container_mut(d, "serve"), "/sys/fs/bpf")
            .as_mapping_mut()
            .unwrap()
            .remove("readOnly");
    });
    breaks("resources", |d| {
        container_mut(d, "reset").as_mapping_mut().unwrap().remove("resources");
    });
    breaks("resources", |d| {
        container_mut(d, "serve")["resources"]["limits"]
            .as_mapping_mut()
            .unwrap()
            .remove("memory");
    });
    breaks("drop-all", |d| {
        container_mut(d, "serve")["securityContext"]["capabilities"]["drop"] =
            serde_yaml::from_str("[NET_RAW]").unwrap();
    });
    breaks("no-privilege-escalation", |d| {
        container_mut(d, "apply")["securityContext"]["allowPrivilegeEscalation"] = true.into();
    });
    breaks("read-only-root", |d| {
        container_mut(d, "reset")["securityContext"]["readOnlyRootFilesystem"] = false.into();
    });
    breaks("capabilities", |d| {
        container_mut(d, "serve")["securityContext"]["capabilities"]["add"] =
            serde_yaml::from_str("[BPF, NET_ADMIN]").unwrap();
    });
    breaks("capabilities", |d| {
        container_mut(d, "apply")["securityContext"]["capabilities"]["add"] = serde_yaml::from_str("[BPF]").unwrap();
    });
    breaks("bpffs-mounted", |d| {
        container_mut(d, "reset")["volumeMounts"]
            .as_sequence_mut()
            .unwrap()
            .retain(|m| m["mountPath"] != "/sys/fs/bpf");
    });
    breaks("config-mode", |d| {
        let pod = &mut doc_mut(d, "DaemonSet")["spec"]["template"]["spec"];
        for v in pod["volumes"].as_sequence_mut().unwrap() {
            if v["configMap"].is_mapping() {
                v["configMap"]["defaultMode"] = 0o666.into();
            }
        }
    });
    breaks("config-mounted", |d| {
        container_mut(d, "apply")["command"] =
            serde_yaml::from_str("[portwatch, apply, -f, /etc/portwatch.yaml]").unwrap();
    });
    breaks("pin-path", |d| {
        let data = &mut doc_mut(d, "ConfigMap")["data"]["portwatch.yaml"];
        *data = str_of(data).replace("/sys/fs/bpf/portwatch", "/run/portwatch").into();
    });
    breaks("reset", |d| {
        let c = container_mut(d, "reset");
        c["command"][2] = str_of(&c["command"][2]).replace("--json ", "").into();
    });
    breaks("ports-agree", |d| {
        container_mut(d, "serve")["command"][3] = "0.0.0.0:9815".into();
    });
    breaks("ports-agree", |d| {
        doc_mut(d, "Service")["spec"]["ports"][0]["port"] = 9815.into();
    });
    breaks("ports-agree", |d| {
        doc_mut(d, "ServiceMonitor")["spec"]["endpoints"][0]["port"] = "http".into();
    });
    breaks("ports-agree", |d| {
        doc_mut(d, "Service")["spec"]["selector"]["app.kubernetes.io/name"] = "other".into();
    });
    breaks("host-network", |d| {
        doc_mut(d, "DaemonSet")["spec"]["template"]["spec"]["hostNetwork"] = false.into();
    });
    breaks("no-token", |d| {
        doc_mut(d, "ServiceAccount")["automountServiceAccountToken"] = true.into();
    });
    breaks("namespace", |d| {
        doc_mut(d, "Service")["metadata"]["namespace"] = "default".into();
    });
}

/// `.ci/bootstrap`'s `NAME=value` line.
fn bootstrap_setting(name: &str) -> String {
    let text = std::fs::read_to_string(root().join(".ci/bootstrap")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!(".ci/bootstrap sets no {name}"))
        .to_string()
}

/// The validator `.ci/bootstrap` installs, of the version it pins (which docs/kubernetes.md names).
fn kubernetes_validate() -> (PathBuf, String) {
    let version = bootstrap_setting("KUBERNETES_VALIDATE_VERSION");
    let venv = bootstrap_setting("KUBERNETES_VALIDATE_VENV").replace("$KUBERNETES_VALIDATE_VERSION", &version);
    let bin = Path::new(&venv).join("bin/kubernetes-validate");
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}: run .ci/bootstrap (as root) to install it", bin.display()));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        version,
        "{}",
        bin.display()
    );
    (bin, version)
}

fn validate(bin: &Path, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(bin).arg("--strict").args(files).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn kubernetes_validate_strict_accepts_the_manifests() {
    let (bin, version) = kubernetes_validate();
    let files = manifest_files();
    let (ok, text) = validate(&bin, &files);
    assert!(ok, "{text}");
    // Every object passes against a schema, but the ServiceMonitor, whose CRD the validator does not
    // carry: that, and only that, is a warning.
    let docs = load();
    let mut passed = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with("INFO ") && line.contains(" passed for resource ") {
            passed += 1;
        } else {
            assert!(
                line.starts_with("WARN ")
                    && line.contains(
                        "Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1"
                    ),
                "kubernetes-validate {version}: {line}"
            );
        }
    }
    assert_eq!(
        passed,
        docs.iter().filter(|d| kind(d) != "ServiceMonitor").count(),
        "{text}"
    );
    let guide = std::fs::read_to_string(root().join("docs/kubernetes.md")).unwrap();
    assert!(
        guide.contains(&format!("kubernetes-validate {version}")),
        "docs/kubernetes.md names another validator than kubernetes-validate {version}"
    );

    // Strict: a misspelt field, and a port of the wrong type, are refused.
    let dir = TestDir::new("k8s");
    let daemonset = std::fs::read_to_string(manifest_dir().join("30-daemonset.yaml")).unwrap();
    for (from, to, expected) in [
        ("hostNetwork: true", "hostNetwrok: true", "'hostNetwrok' was unexpected"),
        (
            "containerPort: 9814",
            "containerPort: \"9814\"",
            "is not of type 'integer'",
        ),
    ] {
        assert!(daemonset.contains(from));
        let copy = dir.join("30-daemonset.yaml");
        std::fs::write(&copy, daemonset.replacen(from, to, 1)).unwrap();
        let (ok, text) = validate(&bin, &[copy]);
        assert!(!ok && text.contains(expected), "{to}: {text}");
    }
}

/// The apply container's command line, run by the portwatch under test on the ConfigMap's
/// portwatch.yaml (in a namespace with the interfaces it names, with the test's own pin path and
/// log): it loads; again, it finds no changes; with a new max_entries it reloads and drains the
/// counters to the log, where the reset container appends too. A copy with a misspelt field is
/// refused with its line and column.
#[kernel_test]
fn the_config_map_applies() {
    let docs = load();
    let text = str_of(&one(&docs, "ConfigMap").value["data"]["portwatch.yaml"]).to_string();
    let config: Value = serde_yaml::from_str(&text).unwrap();
    let daemonset = one(&docs, "DaemonSet");
    let apply = containers(&daemonset.value["spec"]["template"]["spec"])
        .find(|c| verbs(c).contains("apply"))
        .unwrap();
    let home = Netns::new("k8s").unwrap();
    let interfaces: BTreeSet<&str> = seq(&config["interfaces"]).iter().map(|i| str_of(&i["name"])).collect();
    assert!(!interfaces.is_empty());
    for (n, iface) in interfaces.iter().enumerate() {
        home.add_veth(iface, &format!("k8sp{n}")).unwrap();
    }
    let pw = Pw::new(Some(&home));
    let file = TestFile::new("portwatch.yaml");
    let log = TestFile::new("portwatch.jsonl");
    let with_pin = |text: &str| {
        text.replace(
            &format!("pin_path: {}", str_of(&config["pin_path"])),
            &format!("pin_path: {}", pw.pin.display()),
        )
    };
    let command: Vec<String> = seq(&apply["command"])
        .iter()
        .skip(1)
        .map(|a| {
            str_of(a)
                .replace("/etc/portwatch/portwatch.yaml", file.as_str())
                .replace("/var/log/portwatch/portwatch.jsonl", log.as_str())
        })
        .collect();
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    assert_eq!(str_of(&apply["command"][0]), "portwatch");
    assert!(
        args.contains(&file.as_str()) && args.contains(&log.as_str()),
        "{args:?}"
    );
    file.write(&with_pin(&text));
    let out = pw.ok(&args);
    assert!(out.starts_with("+ load"), "{out}");
    assert_eq!(pw.ok(&args), "no changes\n");
    assert!(!log.path.exists());
    let max = config["max_entries"].as_u64().unwrap();
    file.write(&with_pin(&text).replace(&format!("max_entries: {max}"), &format!("max_entries: {}", max * 2)));
    let out = pw.ok(&args);
    assert!(out.contains("reload"), "{out}");
    assert_eq!(portwatch_tests::json_lines(&log.path).len(), 1, "{out}");
    pw.ok(&["unload"]);

    let broken = TestFile::new("broken.yaml");
    broken.write(&text.replacen("ports:", "prots:", 1));
    let ran = pw.run(&["apply", "--dry-run", "-f", broken.as_str()]);
    let line = 1 + text.lines().position(|l| l.starts_with("ports:")).unwrap();
    assert!(
        ran.code != 0
            && ran
                .stderr
                .contains(&format!("{}:{line}:1: unknown field `prots`", broken.as_str())),
        "{}",
        ran.stderr
    );
}
