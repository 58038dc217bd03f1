//! portwatch's demo: two throwaway network namespaces joined by a veth pair, `portwatch load` on
//! the server's end, real TCP and UDP traffic from three client addresses over IPv4 and IPv6, a
//! live `ports add`, then what portwatch counted (`top`), a `reset` that prints what it zeroed, and
//! what is counted after it. Each portwatch command is printed as it runs;
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
    step(&pw, &["top"])?;
    step(&pw, &["top", "--by", "ip-port", "--exact"])?;
    step(&pw, &["reset", "--json"])?;
    println!("\n(traffic: 500 kB tcp/443 from {} after the reset)", CLIENT_V4[1]);
    bed.tcp_transfer(CLIENT_V4[1], SERVER_V4, 443, 500_000)?;
    step(&pw, &["top", "--by", "port"])?;
    step(&pw, &["unload"])?;
    Ok(())
}
