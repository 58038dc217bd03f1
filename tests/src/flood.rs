//! A spoofed flood without traffic: frames from as many distinct remote addresses as asked, run
//! with `BPF_PROG_TEST_RUN` through the programs a `portwatch load` pinned, so that they count into
//! that installation's pinned maps exactly as attached programs would.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::{ensure, Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use portwatch::generation::Key;
use portwatch_common::{Counters, Direction, IPPROTO_TCP};

use crate::packet::Packet;

/// The local (server) addresses and the watched port the flood is aimed at.
pub const LOCAL_V4: &str = "198.18.0.1";
pub const LOCAL_V6: &str = "2001:db8::1";
pub const PORT: u16 = 443;

/// Remote addresses available in 198.18.0.0/15 before the flood moves on to 2001:db8::/32.
pub const V4_REMOTES: u64 = 1 << 17;

/// The `i`th distinct remote address: the 131,072 of 198.18.0.0/15 first, then 2001:db8:1::/48
/// (the documentation ranges: nothing here leaves the machine anyway).
pub fn remote(i: u64) -> IpAddr {
    if i < V4_REMOTES {
        IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32))
    } else {
        let n = i - V4_REMOTES;
        IpAddr::V6(Ipv6Addr::new(0x2001, 0x0db8, 1, 0, 0, 0, (n >> 16) as u16, n as u16))
    }
}

/// A TCP frame between `remote` and the watched port: to it (ingress) or from it (egress), with
/// `payload` bytes.
pub fn frame(remote: IpAddr, direction: Direction, payload: usize) -> Packet {
    let local = match remote {
        IpAddr::V4(_) => LOCAL_V4,
        IpAddr::V6(_) => LOCAL_V6,
    };
    let remote = remote.to_string();
    let p = match (remote.contains(':'), direction) {
        (false, Direction::Ingress) => Packet::tcp4(&remote, 40000, local, PORT),
        (false, Direction::Egress) => Packet::tcp4(local, PORT, &remote, 40000),
        (true, Direction::Ingress) => Packet::tcp6(&remote, 40000, local, PORT),
        (true, Direction::Egress) => Packet::tcp6(local, PORT, &remote, 40000),
    };
    p.payload(payload)
}

/// The counter key and counters of one `frame`.
pub fn counted(remote: IpAddr, direction: Direction, p: &Packet) -> (Key, Counters) {
    let octets = match remote {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    (
        Key::ip(octets, PORT, IPPROTO_TCP, direction),
        Counters {
            bytes: p.l3_len() as u64,
            packets: 1,
        },
    )
}

/// The two programs pinned under a pin path, to run frames through.
pub struct PinnedPrograms {
    ingress: SchedClassifier,
    egress: SchedClassifier,
}

impl PinnedPrograms {
    pub fn open(pin: &Path) -> Result<PinnedPrograms> {
        let open = |name: &str| {
            let path = pin.join("progs").join(name);
            SchedClassifier::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        Ok(PinnedPrograms {
            ingress: open("ingress")?,
            egress: open("egress")?,
        })
    }

    /// Runs the program of `direction` on `frame` `repeat` times (at least once); returns the mean
    /// nanoseconds per run the kernel measured.
    pub fn run(&mut self, direction: Direction, frame: &[u8], repeat: u32) -> Result<u64> {
        let prog = match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        };
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })?;
        ensure!(
            r.return_value as i32 == -1,
            "returned {}, not TC_ACT_UNSPEC",
            r.return_value as i32
        );
        Ok(r.duration.as_nanos() as u64)
    }
}
