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

/// The bytes of a memory page (sysconf(_SC_PAGESIZE)): what the kernel rounds an mmapable map to.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf only reads a constant of the system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

/// The values of a `BPF_F_MMAPABLE` array map, mapped into this process read-write (a generation's
/// filter, which userspace zeroes and refills in place); unmapped when dropped.
pub struct MappedArray {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl MappedArray {
    /// The first `len` bytes of the map behind `fd`.
    pub fn map(fd: std::os::fd::BorrowedFd, len: usize) -> std::io::Result<MappedArray> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of a map fd we hold; the kernel checks `len` against the
        // map's size and refuses a map that is not mmapable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(MappedArray { ptr, len })
    }

    /// The mapped bytes. The kernel program may read and write them meanwhile, byte by byte: only
    /// use this for a map it does not write, or with byte stores whose races are harmless.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes mapped at `ptr` for as long as `self` lives, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
