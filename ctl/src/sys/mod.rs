//! The system calls and netlink requests portwatch makes itself, where aya has no API for them.
//! Everything else goes through aya.

pub mod bpf;
pub(crate) mod netlink;

/// 64 random bits from getrandom(2); `None` where the kernel has no getrandom.
pub(crate) fn random_u64() -> Option<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom into a buffer we own, of the length given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    (n == 8).then(|| u64::from_ne_bytes(bytes))
}
