//! The few bpf(2) commands aya 0.14 does not offer: batch lookups, updates and deletes, and the
//! map-in-map whose update makes the kernel wait for running programs (the reset's barrier).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_OBJ_PIN: u32 = 6;
const BPF_MAP_LOOKUP_BATCH: u32 = 24;
const BPF_MAP_UPDATE_BATCH: u32 = 26;
const BPF_MAP_DELETE_BATCH: u32 = 27;

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// `union bpf_attr`, as bytes: each command fills the fields it uses at their offsets; the rest
/// stays zero, as the kernel requires.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, offset: usize, v: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, offset: usize, v: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.0[offset..offset + 4].try_into().unwrap())
    }
}

fn bpf(cmd: u32, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable bpf_attr-sized buffer for the duration of the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr.0.as_mut_ptr(), attr.0.len()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn create_map(
    map_type: u32,
    key: u32,
    value: u32,
    entries: u32,
    inner_fd: Option<BorrowedFd>,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, map_type).u32(4, key).u32(8, value).u32(12, entries);
    if let Some(fd) = inner_fd {
        attr.u32(20, fd.as_raw_fd() as u32);
    }
    let name = name.as_bytes();
    attr.0[28..28 + name.len().min(15)].copy_from_slice(&name[..name.len().min(15)]);
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Creates the barrier map (an `ARRAY_OF_MAPS` of one slot) and pins it at `path`.
pub fn create_barrier(path: &Path) -> io::Result<()> {
    let inner = create_map(BPF_MAP_TYPE_ARRAY, 4, 4, 1, None, "pw_barrier_in")?;
    let outer = create_map(
        BPF_MAP_TYPE_ARRAY_OF_MAPS,
        4,
        4,
        1,
        Some(std::os::fd::AsFd::as_fd(&inner)),
        "pw_barrier",
    )?;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr::new();
    attr.u64(0, c_path.as_ptr() as u64).u32(8, outer.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}

/// Returns once every BPF program that was running when it was called has finished: an update of
/// an `ARRAY_OF_MAPS` makes the kernel `synchronize_rcu()` before returning
/// (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c). TC programs run inside RCU read-side
/// sections, so after this no program still holds a value it read before the call.
pub fn wait_for_running_programs(barrier: BorrowedFd) -> io::Result<()> {
    let inner = create_map(BPF_MAP_TYPE_ARRAY, 4, 4, 1, None, "pw_barrier_in")?;
    let key: u32 = 0;
    let value: u32 = inner.as_raw_fd() as u32;
    let mut attr = Attr::new();
    attr.u32(0, barrier.as_raw_fd() as u32)
        .u64(8, &key as *const u32 as u64)
        .u64(16, &value as *const u32 as u64)
        .u64(24, 0);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    Ok(())
}

/// Lifts RLIMIT_MEMLOCK. Kernels before 5.11 charge BPF maps against it (later ones against the
/// memory cgroup), and its old default of 64 KiB refuses even the reset's one-entry barrier map
/// with EPERM; libbpf lifts it the same way. Best effort: without CAP_SYS_RESOURCE it stays.
pub(crate) fn lift_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid, initialized struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// Whether an error means "this kernel has no batch operations for this map".
pub fn batch_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(524 /* ENOTSUPP */)
    )
}

/// Every (key, value) of a hash map through `BPF_MAP_LOOKUP_BATCH`, `chunk` entries per call, handed to `each` one call's worth at a time (keys and values
/// concatenated, and how many), so that reading a large map holds one chunk, not the map.
/// `value_size` is the bytes of one value as the syscall returns it (for per-CPU maps: the
/// 8-byte-rounded value times the possible CPUs).
pub fn lookup_batch(
    map: BorrowedFd,
    key_size: usize,
    value_size: usize,
    chunk: usize,
    mut each: impl FnMut(&[u8], &[u8], usize),
) -> io::Result<()> {
    let mut chunk = chunk.max(1);
    let mut keys = vec![0u8; chunk * key_size];
    let mut values = vec![0u8; chunk * value_size];
    let mut token = [0u64; 1];
    let mut first = true;
    loop {
        let mut out_token = [0u64; 1];
        let mut attr = Attr::new();
        attr.u64(0, if first { 0 } else { token.as_ptr() as u64 })
            .u64(8, out_token.as_mut_ptr() as u64)
            .u64(16, keys.as_mut_ptr() as u64)
            .u64(24, values.as_mut_ptr() as u64)
            .u32(32, chunk as u32)
            .u32(36, map.as_raw_fd() as u32);
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.get_u32(32) as usize;
        match result {
            Ok(_) => each(&keys[..got * key_size], &values[..got * value_size], got),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                each(&keys[..got * key_size], &values[..got * value_size], got);
                return Ok(());
            }
            // A bucket holds more entries than the buffer: retry the same position with more room.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                chunk *= 2;
                keys.resize(chunk * key_size, 0);
                values.resize(chunk * value_size, 0);
                continue;
            }
            Err(e) => return Err(e),
        }
        token = out_token;
        first = false;
    }
}

/// Deletes `count` keys (concatenated in `keys`) with `BPF_MAP_DELETE_BATCH`.
pub fn delete_batch(map: BorrowedFd, keys: &[u8], count: usize) -> io::Result<()> {
    write_batch(
        BPF_MAP_DELETE_BATCH,
        "BPF_MAP_DELETE_BATCH deleted",
        map,
        keys,
        None,
        count,
    )
}

/// Writes `count` entries (keys and values concatenated, values as `lookup_batch` returns them)
/// with `BPF_MAP_UPDATE_BATCH` (the tests and benchmarks fill counter maps with it).
pub fn update_batch(map: BorrowedFd, keys: &[u8], values: &[u8], count: usize) -> io::Result<()> {
    write_batch(
        BPF_MAP_UPDATE_BATCH,
        "BPF_MAP_UPDATE_BATCH wrote",
        map,
        keys,
        Some(values),
        count,
    )
}

/// One batch command over `count` entries; fails unless the kernel did them all (`did` says what
/// it did, for the error).
fn write_batch(
    cmd: u32,
    did: &str,
    map: BorrowedFd,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
) -> io::Result<()> {
    if count == 0 {
        return Ok(());
    }
    let mut attr = Attr::new();
    attr.u64(16, keys.as_ptr() as u64)
        .u32(32, count as u32)
        .u32(36, map.as_raw_fd() as u32);
    if let Some(values) = values {
        attr.u64(24, values.as_ptr() as u64);
    }
    bpf(cmd, &mut attr)?;
    let done = attr.get_u32(32) as usize;
    if done != count {
        return Err(io::Error::other(format!("{did} {done} of {count} entries")));
    }
    Ok(())
}
