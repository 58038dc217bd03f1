//! The rtnetlink requests aya does not offer: whether an interface's clsact qdisc still holds any
//! filter, and deleting that qdisc (`unload` uses them to take away a clsact qdisc that portwatch
//! itself added, once nothing of portwatch's or anyone's is attached to it); and the bpf filters
//! of a clsact list with their program ids (to find a filter an interrupted `attach` made).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_GETQDISC: u16 = 38;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const TCA_KIND: u16 = 1;
/// `TC_H_CLSACT` (the same value as `TC_H_INGRESS`): the clsact qdisc's parent.
const TC_H_CLSACT: u32 = 0xffff_fff1;
/// The clsact qdisc's own handle, `ffff:`.
const CLSACT_HANDLE: u32 = 0xffff_0000;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)` and `..._EGRESS`: the two filter lists.
const CLSACT_INGRESS: u32 = 0xffff_fff2;
const CLSACT_EGRESS: u32 = 0xffff_fff3;
const NLMSG_HDRLEN: usize = 16;

struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the fd is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: the buffer is valid for its length; the kernel is the default destination.
        let n = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads replies to request `seq`, handing each message's type to `each`, until
    /// `NLMSG_DONE` or an `NLMSG_ERROR` (an error code of 0 is the acknowledgement).
    fn replies(&self, seq: u32, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: recv into a buffer we own, within its length.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut at = 0;
            let n = n as usize;
            while at + NLMSG_HDRLEN <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                let msg_seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap());
                if len < NLMSG_HDRLEN || at + len > n {
                    return Err(io::Error::other("a truncated netlink message"));
                }
                if msg_seq == seq {
                    match kind {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            let code = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap());
                            return if code == 0 {
                                Ok(())
                            } else {
                                Err(io::Error::from_raw_os_error(-code))
                            };
                        }
                        _ => each(kind, &buf[at..at + len]),
                    }
                }
                at += len.next_multiple_of(4);
            }
        }
    }
}

/// A netlink header and a `tcmsg`, with room for attributes after it.
fn tc_request(kind: u16, flags: u16, seq: u32, ifindex: u32, handle: u32, parent: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]); // family, padding
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&handle.to_ne_bytes());
    msg.extend_from_slice(&parent.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // info
    msg
}

fn finish(mut msg: Vec<u8>) -> Vec<u8> {
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

/// How many filters the clsact qdisc of `ifindex` holds, ingress and egress together (0 when the
/// interface has no clsact qdisc).
pub fn clsact_filter_count(ifindex: u32) -> io::Result<usize> {
    Ok(filters(ifindex, CLSACT_INGRESS)?.len() + filters(ifindex, CLSACT_EGRESS)?.len())
}

/// Deletes the clsact qdisc of `ifindex` (and only a clsact one: the kernel checks the kind).
pub fn delete_clsact(ifindex: u32) -> io::Result<()> {
    let socket = Socket::open()?;
    let mut msg = tc_request(RTM_DELQDISC, NLM_F_ACK, 1, ifindex, CLSACT_HANDLE, TC_H_CLSACT);
    let kind = b"clsact\0";
    msg.extend_from_slice(&((4 + kind.len()) as u16).to_ne_bytes());
    msg.extend_from_slice(&TCA_KIND.to_ne_bytes());
    msg.extend_from_slice(kind);
    msg.resize(msg.len().next_multiple_of(4), 0);
    socket.send(&finish(msg))?;
    socket.replies(1, |_, _| {})
}

const TCA_OPTIONS: u16 = 2;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The attributes of `bytes` (a run of netlink attributes): (type, payload).
fn attributes(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = vec![];
    while bytes.len() >= 4 {
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            break;
        }
        out.push((kind, &bytes[4..len]));
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
    }
    out
}

/// Dumps `request` (`RTM_GETTFILTER`, `RTM_GETQDISC`) for `ifindex` under `parent`, handing
/// each reply (its type, the whole message) to `each`. A missing qdisc or interface is an empty
/// dump, not an error: the one rule of every dump here.
fn dump(request: u16, ifindex: u32, parent: u32, each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let socket = Socket::open()?;
    socket.send(&finish(tc_request(request, NLM_F_DUMP, 1, ifindex, 0, parent)))?;
    match socket.replies(1, each) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL) | Some(libc::ENOENT) | Some(libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        dumped => dumped,
    }
}

/// A filter of a clsact list.
struct Filter {
    priority: u16,
    handle: u32,
    /// The id of its program, for a bpf filter.
    bpf_id: Option<u32>,
}

/// The filters on `ifindex`'s clsact list `parent` (`CLSACT_INGRESS`, `CLSACT_EGRESS`).
fn filters(ifindex: u32, parent: u32) -> io::Result<Vec<Filter>> {
    let mut found = vec![];
    dump(RTM_GETTFILTER, ifindex, parent, |kind, msg| {
        // nlmsghdr (16), tcmsg (20), then attributes.
        if kind != RTM_NEWTFILTER || msg.len() < NLMSG_HDRLEN + 20 {
            return;
        }
        let tcm = &msg[NLMSG_HDRLEN..NLMSG_HDRLEN + 20];
        let info = u32::from_ne_bytes(tcm[16..20].try_into().unwrap());
        let bpf_id = attributes(&msg[NLMSG_HDRLEN + 20..])
            .into_iter()
            .filter(|(kind, _)| *kind == TCA_OPTIONS)
            .flat_map(|(_, payload)| attributes(payload))
            .find(|(kind, value)| *kind == TCA_BPF_ID && value.len() >= 4)
            .map(|(_, value)| u32::from_ne_bytes(value[..4].try_into().unwrap()));
        found.push(Filter {
            priority: (info >> 16) as u16,
            handle: u32::from_ne_bytes(tcm[8..12].try_into().unwrap()),
            bpf_id,
        });
    })?;
    Ok(found)
}

/// The bpf filters on the ingress (`egress` false) or egress list of `ifindex`'s clsact qdisc:
/// (priority, handle, program id). Empty when there is no clsact qdisc.
pub fn bpf_filters(ifindex: u32, egress: bool) -> io::Result<Vec<(u16, u32, u32)>> {
    let parent = if egress { CLSACT_EGRESS } else { CLSACT_INGRESS };
    Ok(filters(ifindex, parent)?
        .into_iter()
        .filter_map(|f| Some((f.priority, f.handle, f.bpf_id?)))
        .collect())
}

/// Whether `ifindex` has a clsact qdisc. (A filter dump cannot tell: it answers an empty list for
/// a qdisc that does not exist.)
pub fn has_clsact(ifindex: u32) -> io::Result<bool> {
    let mut found = false;
    dump(RTM_GETQDISC, ifindex, 0, |kind, msg| {
        if kind != RTM_NEWQDISC || msg.len() < NLMSG_HDRLEN + 20 {
            return;
        }
        let index = i32::from_ne_bytes(msg[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].try_into().unwrap());
        if index as u32 != ifindex {
            return;
        }
        found |= attributes(&msg[NLMSG_HDRLEN + 20..])
            .iter()
            .any(|(kind, value)| *kind == TCA_KIND && value.starts_with(b"clsact\0"));
    })?;
    Ok(found)
}
