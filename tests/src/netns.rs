//! Throwaway network namespaces joined by a veth pair, removed on drop (a failing test included).
//! Addresses come from 198.18.0.0/15 and 2001:db8::/32 and exist only inside these namespaces.

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Runs a command and fails with its stderr if it fails.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns`), deleted on drop.
pub struct Netns {
    pub name: String,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        let name = format!(
            "pwt-{role}-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// A veth pair with both ends in this namespace (`name`, and `peer`), down: an interface to
    /// attach to when no traffic is needed.
    pub fn add_veth(&self, name: &str, peer: &str) -> Result<()> {
        self.ip(&["link", "add", name, "type", "veth", "peer", "name", peer])
            .map(|_| ())
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// Runs `f` on this thread inside the namespace, then returns the thread to where it was.
    /// Sockets, netlink and interface names used inside `f` are the namespace's.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        let original = File::open("/proc/thread-self/ns/net").context("opening the current netns")?;
        let target = File::open(format!("/run/netns/{}", self.name)).context("opening the test netns")?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).context("setns into the test netns")?;
        let result = f();
        setns(original.as_fd(), CloneFlags::CLONE_NEWNET).context("setns back")?;
        Ok(result)
    }
}

impl Netns {
    /// `GET path` from `addr` inside the namespace (HTTP/1.0, so the server closes when done):
    /// the status code and the body. `path` is sent as given (percent-encode a query).
    pub fn http_get(&self, addr: &str, path: &str) -> Result<(u16, String)> {
        self.enter(|| -> Result<(u16, String)> {
            let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
            stream.set_read_timeout(Some(crate::bound(30.0)))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response")?;
            let code = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .context("an HTTP status line")?;
            Ok((code, body.to_string()))
        })?
    }
}

/// `text` percent-encoded for a URL's query.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Two namespaces, `server` and `client`, joined by a veth pair (`server_if` in the server,
/// `client_if` in the client), with IPv4 and IPv6 addresses on both ends.
pub struct Bed {
    pub server: Netns,
    pub client: Netns,
    pub server_if: String,
    pub client_if: String,
}

pub const SERVER_V4: &str = "198.18.0.1";
pub const SERVER_V6: &str = "2001:db8::1";
/// Client addresses: the first of each family is the primary, the rest are extra sources.
pub const CLIENT_V4: [&str; 3] = ["198.18.0.2", "198.18.0.3", "198.18.0.4"];
pub const CLIENT_V6: [&str; 3] = ["2001:db8::2", "2001:db8::3", "2001:db8::4"];
/// Addresses of the second link (`Bed::add_second_link`).
pub const SERVER2_V4: &str = "198.19.0.1";
pub const CLIENT2_V4: &str = "198.19.0.2";

impl Bed {
    /// With `offloads` false, TSO/GSO/GRO are off on both ends, so every skb is one wire packet
    /// and an nftables counter sees exactly the packets the program sees.
    pub fn new(offloads: bool) -> Result<Self> {
        let server = Netns::new("srv")?;
        let client = Netns::new("cli")?;
        let server_if = "pw0".to_string();
        let client_if = "pw1".to_string();
        server.ip(&[
            "link",
            "add",
            &server_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            &client.name,
        ])?;
        server.ip(&["addr", "add", &format!("{SERVER_V4}/24"), "dev", &server_if])?;
        server.ip(&["addr", "add", &format!("{SERVER_V6}/64"), "dev", &server_if, "nodad"])?;
        for a in CLIENT_V4 {
            client.ip(&["addr", "add", &format!("{a}/24"), "dev", &client_if])?;
        }
        for a in CLIENT_V6 {
            client.ip(&["addr", "add", &format!("{a}/64"), "dev", &client_if, "nodad"])?;
        }
        server.ip(&["link", "set", &server_if, "up"])?;
        client.ip(&["link", "set", &client_if, "up"])?;
        if !offloads {
            server.exec(&["ethtool", "-K", &server_if, "tso", "off", "gso", "off", "gro", "off"])?;
            client.exec(&["ethtool", "-K", &client_if, "tso", "off", "gso", "off", "gro", "off"])?;
        }
        let bed = Bed {
            server,
            client,
            server_if,
            client_if,
        };
        // Resolve the server's neighbour entries now (one datagram to the discard port, which no
        // test watches): a burst sent while ARP/NDP is pending would be cut to the queue's length.
        bed.send_udp(CLIENT_V4[0], SERVER_V4, 9, 1, 1)?;
        bed.send_udp(CLIENT_V6[0], SERVER_V6, 9, 1, 1)?;
        std::thread::sleep(crate::bound(0.3));
        Ok(bed)
    }

    /// A second veth pair between the same namespaces (`pw2` in the server, `pw3` in the client)
    /// on 198.19.0.0/24: server 198.19.0.1, client 198.19.0.2.
    pub fn add_second_link(&self) -> Result<()> {
        self.server.ip(&[
            "link",
            "add",
            "pw2",
            "type",
            "veth",
            "peer",
            "name",
            "pw3",
            "netns",
            &self.client.name,
        ])?;
        self.server
            .ip(&["addr", "add", &format!("{SERVER2_V4}/24"), "dev", "pw2"])?;
        self.client
            .ip(&["addr", "add", &format!("{CLIENT2_V4}/24"), "dev", "pw3"])?;
        self.server.ip(&["link", "set", "pw2", "up"])?;
        self.client.ip(&["link", "set", "pw3", "up"])?;
        self.send_udp(CLIENT2_V4, SERVER2_V4, 9, 1, 1)?;
        std::thread::sleep(crate::bound(0.3));
        Ok(())
    }

    /// The sum of the named counters of the server namespace's `/proc/net/snmp` (`"Udp:NoPorts"`,
    /// `"Tcp:InSegs"`) and `/proc/net/snmp6` (`"Udp6NoPorts"`).
    pub(crate) fn server_snmp(&self, wanted: &[&str]) -> Result<u64> {
        self.server.enter(|| -> Result<u64> {
            let mut total = 0;
            let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            let lines: Vec<&str> = snmp.lines().collect();
            // Pairs of lines: "Udp: Name Name ..." then "Udp: 1 2 ...".
            for pair in lines.chunks(2) {
                let [names, values] = pair else { continue };
                let mut names = names.split_whitespace();
                let table = names.next().unwrap_or("");
                for (name, value) in names.zip(values.split_whitespace().skip(1)) {
                    if wanted.contains(&format!("{table}{name}").as_str()) {
                        total += value.parse::<u64>()?;
                    }
                }
            }
            for line in std::fs::read_to_string("/proc/thread-self/net/snmp6")?.lines() {
                let mut fields = line.split_whitespace();
                if let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                    if wanted.contains(&name) {
                        total += value.parse::<u64>()?;
                    }
                }
            }
            Ok(total)
        })?
    }

    /// UDP datagrams the server's stack has taken in (IPv4 and IPv6: delivered, to no socket, or
    /// in error): each one has passed the interface's TC ingress hook.
    pub(crate) fn udp_received(&self) -> Result<u64> {
        self.server_snmp(&[
            "Udp:InDatagrams",
            "Udp:NoPorts",
            "Udp:InErrors",
            "Udp6InDatagrams",
            "Udp6NoPorts",
            "Udp6InErrors",
        ])
    }

    /// Waits until `what` has grown by `count` since `before` (bounded: 5 s, scaled).
    fn wait_for(&self, what: impl Fn() -> Result<u64>, before: u64, count: u64, label: &str) -> Result<()> {
        let started = std::time::Instant::now();
        loop {
            let arrived = what()? - before;
            if arrived >= count {
                return Ok(());
            }
            if started.elapsed() > crate::bound(5.0) {
                bail!(
                    "only {arrived} of {count} {label} reached the server in {:?}",
                    crate::bound(5.0)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends `count` UDP datagrams of `size` payload bytes from `src` (a client address) to
    /// `dst:port` (a server address), and returns once the server's stack has taken them all in
    /// (a busy machine may process a veth's backlog after `sendto` returns; bounded: 5 s). Returns
    /// the L3 bytes sent.
    pub fn send_udp(&self, src: &str, dst: &str, port: u16, count: usize, size: usize) -> Result<u64> {
        let src: SocketAddr = SocketAddr::new(src.parse()?, 0);
        let dst: SocketAddr = SocketAddr::new(dst.parse()?, port);
        let before = self.udp_received()?;
        self.client.enter(|| -> Result<()> {
            let sock = UdpSocket::bind(src)?;
            let buf = vec![0x5a; size];
            for _ in 0..count {
                // ENOBUFS under a burst is possible on a small qdisc: retry a bounded number of times.
                let mut tries = 0;
                while let Err(e) = sock.send_to(&buf, dst) {
                    tries += 1;
                    if tries > 100 {
                        return Err(e.into());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(())
        })??;
        self.wait_for(
            || self.udp_received(),
            before,
            count as u64,
            &format!("datagrams to {dst}"),
        )?;
        let ip_header = if dst.is_ipv4() { 20 } else { 40 };
        Ok((count * (ip_header + 8 + size)) as u64)
    }

    /// Turns the server's reverse-path filter off, so that datagrams from any source address reach
    /// its stack (`send_spoofed_udp`).
    pub fn accept_any_source(&self) -> Result<()> {
        self.server.exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])?;
        self.server.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{}.rp_filter=0", self.server_if),
        ])?;
        Ok(())
    }

    /// Sends one UDP datagram of `size` payload bytes to `dst:port` (a server address) from each of
    /// `sources`, whatever they are: a raw socket writes them into the IP header, so thousands of
    /// remote addresses need no address on any interface (call `accept_any_source` first).
    /// Returns once the server's stack has taken them all in, with the L3 bytes of each datagram.
    pub fn send_spoofed_udp(&self, sources: &[IpAddr], dst: &str, port: u16, size: usize) -> Result<u64> {
        let dst: IpAddr = dst.parse()?;
        let datagrams: Vec<Spoofed> = sources
            .iter()
            .map(|&src| Spoofed {
                src,
                dst,
                port,
                payload: size,
            })
            .collect();
        self.send_spoofed(&datagrams)?;
        Ok(datagrams.first().map_or(0, |d| d.l3_len()))
    }

    /// Sends `datagrams` in their order, each from its own source, whatever it is (see
    /// `send_spoofed_udp`), and returns once the server's stack has taken every one in. They go
    /// out in runs of `SPOOFED_RUN`, each taken in before the next is sent: a veth hands what it
    /// sends to the receiving CPU's backlog, which drops past `net.core.netdev_max_backlog` (1000)
    /// packets, silently, if the softirq that empties it falls behind (it does once ksoftirqd takes
    /// it over); a run never fills it. Bounded: 5 s per run.
    pub fn send_spoofed(&self, datagrams: &[Spoofed]) -> Result<()> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // One raw socket per family, opened in the client: a socket stays in the namespace it was
        // made in, whichever this thread is in when it sends.
        let [v4, v6] = self.client.enter(|| -> Result<[OwnedFd; 2]> {
            let open = |family| -> Result<OwnedFd> {
                // IPPROTO_RAW: the datagram is sent with the IP header it has (IPv6: IPV6_HDRINCL
                // is implied), so its source is whatever it says.
                // SAFETY: a plain socket(2); the fd is owned at once.
                let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
                anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
                // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            };
            Ok([open(libc::AF_INET)?, open(libc::AF_INET6)?])
        })??;
        for run in datagrams.chunks(SPOOFED_RUN) {
            let before = self.udp_received()?;
            for d in run {
                let packet = spoofed_udp(d.src, d.dst, 40000, d.port, d.payload);
                let sent = match d.dst {
                    IpAddr::V4(dst) => nix::sys::socket::sendto(
                        v4.as_raw_fd(),
                        &packet,
                        &nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0)),
                        nix::sys::socket::MsgFlags::empty(),
                    ),
                    IpAddr::V6(dst) => nix::sys::socket::sendto(
                        v6.as_raw_fd(),
                        &packet,
                        &nix::sys::socket::SockaddrIn6::from(std::net::SocketAddrV6::new(dst, 0, 0, 0)),
                        nix::sys::socket::MsgFlags::empty(),
                    ),
                };
                sent.with_context(|| format!("sending from {} to {}:{}", d.src, d.dst, d.port))?;
            }
            self.wait_for(|| self.udp_received(), before, run.len() as u64, "spoofed datagrams")?;
        }
        Ok(())
    }

    /// Opens a TCP listener on the server side, connects from `src`, sends `bytes` bytes, waits for
    /// the server to read them all and closes both ends. Returns what the client's TCP counted
    /// (`TCP_INFO`): the wire segments it sent and received, GSO super-packets counted per segment.
    pub fn tcp_transfer(&self, src: &str, dst: &str, port: u16, bytes: usize) -> Result<TcpSegments> {
        let listen: SocketAddr = SocketAddr::new(dst.parse()?, port);
        let listener = self.server.enter(|| TcpListener::bind(listen))??;
        // The client tells the server how many segments it sent.
        let (client_done, wait_for_client) = std::sync::mpsc::channel::<u64>();
        let server = std::thread::spawn(move || -> Result<(usize, u64)> {
            let (mut conn, _) = listener.accept()?;
            let mut total = 0;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n;
            }
            conn.write_all(b"done")?;
            conn.shutdown(std::net::Shutdown::Write)?;
            // Keep the socket until the client has seen everything, so its count is final, then
            // until this socket has taken in every segment the client sent (so each has passed the
            // TC ingress hook before anyone reads counters; a busy machine may process the veth's
            // backlog late). `tcpi_segs_in` counts a GRO packet per segment. Bounded: 5 s.
            let sent = wait_for_client.recv_timeout(crate::bound(10.0)).unwrap_or(0);
            let started = std::time::Instant::now();
            while u64::from(tcp_info(&conn)?.tcpi_segs_in) < sent {
                if started.elapsed() > crate::bound(5.0) {
                    bail!(
                        "the server took in {} of {sent} client segments in {:?}",
                        tcp_info(&conn)?.tcpi_segs_in,
                        crate::bound(5.0)
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok((total, tcp_info(&conn)?.tcpi_bytes_sent))
        });
        let src: SocketAddr = SocketAddr::new(src.parse()?, 0);
        let segments = self.client.enter(|| -> Result<TcpSegments> {
            let mut conn = nix_tcp_socket(src, listen)?;
            conn.set_read_timeout(Some(crate::bound(10.0)))?;
            let chunk = vec![0x42u8; 16384];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                conn.write_all(&chunk[..n])?;
                left -= n;
            }
            conn.shutdown(std::net::Shutdown::Write)?;
            let mut reply = Vec::new();
            conn.read_to_end(&mut reply)?;
            if reply != b"done" {
                bail!("server did not confirm");
            }
            // The server's FIN has arrived (read_to_end returned); give the ACK of it time to leave,
            // then this socket sends nothing more (close from FIN_WAIT_2/TIME_WAIT is silent).
            std::thread::sleep(Duration::from_millis(100));
            let info = tcp_info(&conn)?;
            Ok(TcpSegments {
                sent: info.tcpi_segs_out as u64,
                received: info.tcpi_segs_in as u64,
                client_payload: info.tcpi_bytes_sent,
                server_payload: 0,
            })
        });
        let segments = segments.and_then(|s| s);
        let _ = client_done.send(segments.as_ref().map(|s| s.sent).unwrap_or(0));
        let mut segments = segments?;
        let (received, server_payload) = server.join().expect("server thread panicked")?;
        if received != bytes {
            bail!("server read {received} bytes, {bytes} were sent");
        }
        segments.server_payload = server_payload;
        Ok(segments)
    }
}

/// What the client's TCP counted for one connection (`TCP_INFO`): wire segments each way (GSO
/// super-packets counted per segment) and payload bytes put on the wire, retransmissions included.
#[derive(Clone, Copy, Debug)]
pub struct TcpSegments {
    pub sent: u64,
    pub received: u64,
    /// Payload bytes the client sent (`tcpi_bytes_sent`: retransmitted bytes count again).
    pub client_payload: u64,
    /// Payload bytes the server sent.
    pub server_payload: u64,
}

fn tcp_info(conn: &TcpStream) -> Result<libc::tcp_info> {
    use std::os::fd::AsRawFd;
    // SAFETY: getsockopt writes at most `len` bytes into a zeroed tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("getsockopt(TCP_INFO): {}", std::io::Error::last_os_error());
    }
    Ok(info)
}

/// A TCP connection from a chosen local address (std's TcpStream cannot bind before connecting).
fn nix_tcp_socket(src: SocketAddr, dst: SocketAddr) -> Result<TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = if src.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(src))?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(dst))?;
    Ok(TcpStream::from(fd))
}

/// Datagrams `Bed::send_spoofed` sends in one run before it waits for the server to take them
/// in: well below the receiving backlog's 1000 packets.
pub const SPOOFED_RUN: usize = 250;

/// A UDP datagram from any source address (`Bed::send_spoofed`): `payload` zero bytes from
/// `src`, port 40000, to `dst:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spoofed {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub payload: usize,
}

impl Spoofed {
    /// Its bytes from the IP header on, as portwatch and nftables count them.
    pub fn l3_len(&self) -> u64 {
        let ip_header = if self.dst.is_ipv4() { 20 } else { 40 };
        (ip_header + 8 + self.payload) as u64
    }
}

/// An IP header and a UDP datagram of `size` zero bytes, for a raw socket (`IPPROTO_RAW`): the
/// kernel fills in the IPv4 header checksum; the UDP checksum is computed (IPv6 needs it).
pub(crate) fn spoofed_udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, size: usize) -> Vec<u8> {
    let udp_len = 8 + size;
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.resize(udp_len, 0);
    let (src_bytes, dst_bytes) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (s.octets().to_vec(), d.octets().to_vec()),
        (IpAddr::V6(s), IpAddr::V6(d)) => (s.octets().to_vec(), d.octets().to_vec()),
        _ => panic!("{src} and {dst} are of different families"),
    };
    // The pseudo-header checksum of RFC 768 / RFC 8200.
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src_bytes);
    add(&dst_bytes);
    add(&[0, 17]);
    add(&(udp_len as u32).to_be_bytes());
    add(&udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    let mut packet = Vec::with_capacity(40 + udp_len);
    if src.is_ipv4() {
        let total = (20 + udp_len) as u16;
        packet.extend_from_slice(&[0x45, 0]);
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    } else {
        packet.extend_from_slice(&[0x60, 0, 0, 0]);
        packet.extend_from_slice(&(udp_len as u16).to_be_bytes());
        packet.extend_from_slice(&[17, 64]);
    }
    packet.extend_from_slice(&src_bytes);
    packet.extend_from_slice(&dst_bytes);
    packet.extend_from_slice(&udp);
    packet
}

/// Two namespaces joined by a veth pair with nothing else on it (`left_if` in `left`, `right_if`
/// in `right`): no addresses, IPv6 off (no neighbour discovery, no MLD), GRO off, so the only
/// frames that cross are those a test writes with a `RawSocket`.
pub struct Wire {
    pub left: Netns,
    pub right: Netns,
    pub left_if: String,
    pub right_if: String,
}

impl Wire {
    pub fn new(mtu: u32) -> Result<Wire> {
        let left = Netns::new("wl")?;
        let right = Netns::new("wr")?;
        for ns in [&left, &right] {
            ns.exec(&[
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])?;
        }
        let (left_if, right_if) = ("pwl".to_string(), "pwr".to_string());
        left.ip(&[
            "link",
            "add",
            &left_if,
            "type",
            "veth",
            "peer",
            "name",
            &right_if,
            "netns",
            &right.name,
        ])?;
        for (ns, iface) in [(&left, &left_if), (&right, &right_if)] {
            ns.ip(&["link", "set", iface, "mtu", &mtu.to_string()])?;
            ns.exec(&["ethtool", "-K", iface, "gro", "off"])?;
            ns.ip(&["link", "set", iface, "up"])?;
        }
        Ok(Wire {
            left,
            right,
            left_if,
            right_if,
        })
    }
}

/// An AF_PACKET socket that writes whole Ethernet frames on one interface, each behind a
/// virtio-net header whose `hdr_len` sets how many of the frame's first bytes the kernel puts in
/// the skb's linear part (at least the 14 of the Ethernet header): a frame that, with the
/// device's headroom, does not fit in a page gets only those bytes linear and the rest in page
/// fragments (`packet_snd`, `packet_alloc_skb` in net/packet/af_packet.c). Smaller frames are
/// linear whatever `hdr_len` says.
pub struct RawSocket {
    fd: std::os::fd::OwnedFd,
}

impl RawSocket {
    pub fn new(ns: &Netns, iface: &str) -> Result<RawSocket> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let iface = std::ffi::CString::new(iface)?;
        ns.enter(|| -> Result<RawSocket> {
            // SAFETY: plain socket calls on a descriptor this function owns.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let one: libc::c_int = 1;
                if libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_VNET_HDR,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                ) != 0
                {
                    bail!("PACKET_VNET_HDR: {}", std::io::Error::last_os_error());
                }
                let ifindex = libc::if_nametoindex(iface.as_ptr());
                if ifindex == 0 {
                    bail!("no interface {iface:?}: {}", std::io::Error::last_os_error());
                }
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = ifindex as i32;
                if libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                ) != 0
                {
                    bail!("bind(AF_PACKET): {}", std::io::Error::last_os_error());
                }
                Ok(RawSocket { fd })
            }
        })?
    }

    /// Writes `frame` with `linear` bytes asked for in the linear part (`hdr_len`; 0 asks for
    /// none, which the kernel raises to the Ethernet header).
    pub fn send(&self, frame: &[u8], linear: u16) -> Result<()> {
        use std::os::fd::AsRawFd;
        // struct virtio_net_hdr, little-endian: flags, gso_type (none), hdr_len, gso_size,
        // csum_start, csum_offset.
        let mut buf = vec![0u8; 10];
        buf[2..4].copy_from_slice(&linear.to_le_bytes());
        buf.extend_from_slice(frame);
        // SAFETY: a write of an owned buffer on an owned descriptor.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if sent != buf.len() as isize {
            bail!(
                "writing a {}-byte frame: {}",
                frame.len(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}
