//! nftables counters on a bed's server, one per (family, protocol, direction), on the traffic of
//! TCP port 7001 and UDP port 7002: an independent count, to the byte, of what crossed. Tests with
//! rules of their own load them with `load` and read them with `table_counters`.

use std::collections::BTreeMap;

use portwatch_common::Counters;

use crate::netns::Bed;

/// nftables counters on the server, one per (family, protocol, direction), on the same traffic.
pub const RULES: &str = "
table inet pwtest {
  counter tcp4_in {}
  counter tcp6_in {}
  counter tcp4_out {}
  counter tcp6_out {}
  counter udp4_in {}
  counter udp6_in {}
  chain input {
    type filter hook input priority 0; policy accept;
    meta nfproto ipv4 tcp dport 7001 counter name tcp4_in
    meta nfproto ipv6 tcp dport 7001 counter name tcp6_in
    meta nfproto ipv4 udp dport 7002 counter name udp4_in
    meta nfproto ipv6 udp dport 7002 counter name udp6_in
  }
  chain output {
    type filter hook output priority 0; policy accept;
    meta nfproto ipv4 tcp sport 7001 counter name tcp4_out
    meta nfproto ipv6 tcp sport 7001 counter name tcp6_out
  }
}
";

/// The counters of `RULES`, by name (`tcp4_in`, `tcp6_out`...).
pub fn counters(bed: &Bed) -> BTreeMap<String, Counters> {
    table_counters(bed, "pwtest")
}

/// The named counters of the bed's server's `inet` table `table`, by name.
pub fn table_counters(bed: &Bed, table: &str) -> BTreeMap<String, Counters> {
    let json = bed
        .server
        .exec(&["nft", "-j", "list", "counters", "table", "inet", table])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut out = BTreeMap::new();
    for item in v["nftables"].as_array().unwrap() {
        if let Some(c) = item.get("counter") {
            out.insert(
                c["name"].as_str().unwrap().to_string(),
                Counters {
                    bytes: c["bytes"].as_u64().unwrap(),
                    packets: c["packets"].as_u64().unwrap(),
                },
            );
        }
    }
    out
}

/// Installs `RULES` on the bed's server.
pub fn install(bed: &Bed) {
    load(bed, RULES).unwrap();
}

/// Loads an nftables ruleset (`nft -f`) on the bed's server.
pub fn load(bed: &Bed, rules: &str) -> anyhow::Result<()> {
    // One file per call: tests of one binary run in parallel, and each removes its own.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("pwtest-nft-{}-{n}.nft", std::process::id()));
    std::fs::write(&path, rules)?;
    let loaded = bed
        .server
        .exec(&["nft", "-f", path.to_str().expect("a UTF-8 temporary path")]);
    let _ = std::fs::remove_file(&path);
    loaded.map(drop)
}
