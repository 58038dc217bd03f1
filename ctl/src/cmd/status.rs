//! `portwatch status`: loaded or not, the programs, each attachment, the watched ports, how full
//! the counter map is, and the global statistics.

use anyhow::{Context, Result};
use aya::programs::{links::PinnedLink, SchedClassifier};
use portwatch_common::{Stats, ATTACH_MODE_TCX, DIRECTION_EGRESS, DIRECTION_INGRESS, LAYOUT_VERSION};
use serde_json::{json, Value};

use crate::{
    attach,
    cli::Direction,
    maps, output,
    pinned::{check_privileges, direction_name, ensure_bpffs, PinPath, Pinned},
    ports,
};

pub fn run(pin: &PinPath, as_json: bool) -> Result<()> {
    check_privileges()?;
    ensure_bpffs(pin)?;
    if !pin.is_loaded() {
        if as_json {
            output::print_json(&json!({ "loaded": false, "pin_path": pin.root }));
        } else {
            println!("portwatch is not loaded at {}", pin.root.display());
        }
        return Ok(());
    }
    let pinned = Pinned::open(pin)?;
    let report = collect(&pinned)?;
    if as_json {
        output::print_json(&report);
    } else {
        print_human(&report);
    }
    Ok(())
}

fn collect(pinned: &Pinned) -> Result<Value> {
    let pin = &pinned.pin;
    let mut programs = vec![];
    for d in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
        let prog = SchedClassifier::from_pin(pin.prog(d)).context("opening a pinned program")?;
        let info = prog.info()?;
        programs
            .push(json!({ "direction": direction_name(d), "id": info.id(), "tag": format!("{:016x}", info.tag()) }));
    }
    let mut attachments = vec![];
    for entry in pinned.attachments()?.iter() {
        let (key, record) = entry?;
        let current = attach::ifname_of(key.ifindex);
        let link_id = if record.mode == ATTACH_MODE_TCX {
            PinnedLink::from_pin(pin.link(key.ifindex, key.direction))
                .ok()
                .and_then(|l| {
                    let fd: aya::programs::links::FdLink = l.into();
                    fd.info().ok().map(|i| i.id())
                })
        } else {
            None
        };
        attachments.push(json!({
            "interface": current.clone().unwrap_or_else(|| attach::recorded_name(&record)),
            "ifindex": key.ifindex,
            "present": current.is_some(),
            "direction": direction_name(key.direction),
            "mode": attach::mode_name(record.mode),
            "link_id": link_id,
            "tc_priority": (record.mode != ATTACH_MODE_TCX).then_some(record.priority),
            "tc_handle": (record.mode != ATTACH_MODE_TCX).then(|| format!("{:x}", record.handle)),
        }));
    }
    attachments.sort_by_key(|a| {
        (
            a["interface"].as_str().unwrap_or("").to_string(),
            a["direction"] != "ingress",
        )
    });

    let mut table = vec![0u8; portwatch_common::PORT_COUNT as usize];
    for (port, flags) in pinned.watched_ports()?.iter().enumerate() {
        table[port] = flags?;
    }
    let watched: Vec<Value> = ports::fold(&table).iter().map(super::ports::spec_json).collect();

    let generation = pinned.config()?.get(&0, 0)?.generation & 1;
    let used = maps::read_generation(pinned, generation)?
        .iter()
        .filter(|(k, _)| !k.is_overflow())
        .count();
    let stats: Stats = maps::read_stats(&pinned.stats()?)?;
    Ok(json!({
        "loaded": true,
        "pin_path": pin.root,
        "layout_version": LAYOUT_VERSION,
        "direction": Direction::from_bits(pinned.meta.directions),
        "programs": programs,
        "attachments": attachments,
        "watched_ports": watched,
        "counters": { "generation": generation, "entries": used, "max_entries": pinned.meta.max_entries },
        "stats": {
            "matched_packets": stats.matched_packets,
            "matched_bytes": stats.matched_bytes,
            "unwatched_packets": stats.unwatched_packets,
            "not_counted": {
                "non_ip": stats.non_ip_packets,
                "unknown_l4": stats.unknown_l4_packets,
                "fragment": stats.fragment_packets,
                "truncated": stats.truncated_packets,
                "malformed": stats.malformed_packets,
                "header_limit": stats.ext_header_limit_packets,
            },
            "map_full_packets": stats.map_full_packets,
            "map_full_bytes": stats.map_full_bytes,
            "overflow_missing_packets": stats.overflow_missing_packets,
        },
    }))
}

fn print_human(r: &Value) {
    println!(
        "portwatch loaded at {} (layout {}, direction {})",
        r["pin_path"].as_str().unwrap_or(""),
        r["layout_version"],
        r["direction"].as_str().unwrap_or("")
    );
    for p in r["programs"].as_array().into_iter().flatten() {
        println!(
            "  program {:<8} id {} tag {}",
            p["direction"].as_str().unwrap_or(""),
            p["id"],
            p["tag"].as_str().unwrap_or("")
        );
    }
    let attachments = r["attachments"].as_array().cloned().unwrap_or_default();
    if attachments.is_empty() {
        println!("attached nowhere (attach with `portwatch attach IF`)");
    }
    for a in attachments {
        let what = match a["link_id"].as_u64() {
            Some(id) => format!("link {id}"),
            None if a["mode"] == "tc" => format!(
                "prio {} handle {}",
                a["tc_priority"],
                a["tc_handle"].as_str().unwrap_or("")
            ),
            None => "link missing".into(),
        };
        let vanished = if a["present"] == false {
            "  (interface vanished: `portwatch detach` removes this)"
        } else {
            ""
        };
        println!(
            "attached {:<16} {:<8} {:<4} {what}{vanished}",
            a["interface"].as_str().unwrap_or(""),
            a["direction"].as_str().unwrap_or(""),
            a["mode"].as_str().unwrap_or("")
        );
    }
    let ports: Vec<&str> = r["watched_ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["spec"].as_str())
        .collect();
    println!(
        "watching {}",
        if ports.is_empty() {
            "no port".to_string()
        } else {
            ports.join(", ")
        }
    );
    let c = &r["counters"];
    println!(
        "counter entries {} of {} (generation {})",
        c["entries"], c["max_entries"], c["generation"]
    );
    let s = &r["stats"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    println!(
        "matched {} packets, {} ({} bytes)",
        n(&s["matched_packets"]),
        output::human_bytes(n(&s["matched_bytes"])),
        n(&s["matched_bytes"])
    );
    println!("unwatched {} packets", n(&s["unwatched_packets"]));
    let nc = &s["not_counted"];
    println!(
        "not counted: non-IP {}, other protocol {}, non-first fragment {}, truncated {}, malformed {}, too many headers {}",
        n(&nc["non_ip"]), n(&nc["unknown_l4"]), n(&nc["fragment"]), n(&nc["truncated"]), n(&nc["malformed"]), n(&nc["header_limit"])
    );
    println!(
        "map full: {} packets, {} ({} bytes) in the overflow entry",
        n(&s["map_full_packets"]),
        output::human_bytes(n(&s["map_full_bytes"])),
        n(&s["map_full_bytes"])
    );
}
