//! The system calls and netlink requests portwatch makes itself, where aya has no API for them.
//! Everything else goes through aya.

pub mod bpf;
pub(crate) mod netlink;
