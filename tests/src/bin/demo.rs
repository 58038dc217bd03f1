//! portwatch's demo: two throwaway network namespaces joined by a veth pair, `portwatch load` on
//! the server's end, real TCP and UDP traffic from three client addresses over IPv4 and IPv6, a
//! live `ports add`, then what portwatch counted. Each portwatch command is printed as it runs;
//! every one is a separate process that exits (counting goes on in the kernel). Everything the
//! demo creates is removed when it exits.
//!
//!     examples/demo.sh

use anyhow::{Context, Result};
use portwatch_tests::{
    cli::Pw,
    netns::{Bed, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6},
};

fn step(pw: &Pw, args: &[&str]) -> Result<()> {
    println!("\n$ portwatch {}", args.join(" "));
    let r = pw.run(args);
    print!("{}", r.stdout);
    eprint!("{}", r.stderr);
    anyhow::ensure!(
        r.code == 0,
        "portwatch {} failed with exit code {}",
        args.join(" "),
        r.code
    );
    Ok(())
}

fn main() -> Result<()> {
    let bed = Bed::new(true).context("creating the demo namespaces (needs root)")?;
    let pw = Pw::new(Some(&bed.server));
    println!(
        "demo: namespaces {} (server, {SERVER_V4} {SERVER_V6}) and {} (clients {} {} {} ...), veth {}",
        bed.server.name, bed.client.name, CLIENT_V4[0], CLIENT_V4[1], CLIENT_V6[0], bed.server_if
    );
    println!(
        "demo: portwatch runs in the server namespace with --pin-path {}",
        pw.pin.display()
    );

    step(
        &pw,
        &["load", "--iface", &bed.server_if, "--port", "443", "--port", "53/udp"],
    )?;
    println!(
        "\n(traffic: 3 MB tcp/443 from {} and 1 MB from {}, udp/53 from {} and {}, udp/8080 from {})",
        CLIENT_V4[0], CLIENT_V6[0], CLIENT_V4[1], CLIENT_V6[1], CLIENT_V4[2]
    );
    bed.tcp_transfer(CLIENT_V4[0], SERVER_V4, 443, 3_000_000)?;
    bed.tcp_transfer(CLIENT_V6[0], SERVER_V6, 443, 1_000_000)?;
    bed.send_udp(CLIENT_V4[1], SERVER_V4, 53, 200, 512)?;
    bed.send_udp(CLIENT_V6[1], SERVER_V6, 53, 100, 512)?;
    bed.send_udp(CLIENT_V4[2], SERVER_V4, 8080, 50, 1200)?; // not watched yet
    step(&pw, &["ports", "add", "8080/udp"])?;
    println!("\n(traffic: udp/8080 from {} again, now watched)", CLIENT_V4[2]);
    bed.send_udp(CLIENT_V4[2], SERVER_V4, 8080, 50, 1200)?;

    step(&pw, &["status"])?;
    println!("\ncounters per remote IP, read from the pinned maps:");
    let mut rows: Vec<_> = pw.counters().into_iter().collect();
    rows.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes));
    println!(
        "{:<16} {:>5} {:<5} {:<8} {:>12} {:>9}",
        "REMOTE IP", "PORT", "PROTO", "DIR", "BYTES", "PACKETS"
    );
    for (k, c) in rows {
        let ip = std::net::Ipv6Addr::from(k.remote_ip_octets());
        let ip = ip
            .to_ipv4_mapped()
            .map(|v4| v4.to_string())
            .unwrap_or_else(|| ip.to_string());
        let proto = if k.proto == ctl_common::IPPROTO_TCP {
            "tcp"
        } else {
            "udp"
        };
        let dir = portwatch::pinned::direction_name(k.direction);
        println!(
            "{ip:<16} {:>5} {proto:<5} {dir:<8} {:>12} {:>9}",
            k.port, c.bytes, c.packets
        );
    }
    step(&pw, &["unload"])?;
    Ok(())
}
