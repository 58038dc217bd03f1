//! The few bpf(2) commands aya 0.14 does not offer: batch lookups, updates and deletes over `Pod`
//! keys and values, and the map-in-map whose update makes the kernel wait for running programs
//! (the reset's barrier). Every failure is a `SyscallError` naming the command, as aya's own are.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

pub use aya::sys::SyscallError;
use aya::Pod;
use aya_obj::generated::{
    bpf_attr, bpf_attr__bindgen_ty_1 as MapCreate, bpf_attr__bindgen_ty_2 as ElemUpdate,
    bpf_attr__bindgen_ty_2__bindgen_ty_1 as ElemValue, bpf_attr__bindgen_ty_3 as Batch,
    bpf_attr__bindgen_ty_5 as ObjPin, bpf_cmd, bpf_map_type,
};

/// bpf(2) with `attr`; the error names `call`.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr, call: &'static str) -> Result<i64, SyscallError> {
    // SAFETY: attr is a valid, writable `union bpf_attr` for the duration of the call; every
    // pointer in it points into buffers the caller keeps alive and sized as the command needs.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            (attr as *mut bpf_attr).cast::<libc::c_void>(),
            size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        Err(SyscallError {
            call,
            io_error: io::Error::last_os_error(),
        })
    } else {
        Ok(ret)
    }
}

/// A `union bpf_attr` with every byte zero, as the kernel requires of the fields a command does
/// not use.
fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a union of plain integer structs: all zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// `n` values of `T`, all zero (valid: `T` is `Pod`).
fn zeroed_vec<T: Pod>(n: usize) -> Vec<T> {
    // SAFETY: a Pod type is plain bytes; all zero is one of its values.
    vec![unsafe { std::mem::zeroed::<T>() }; n]
}

fn create_map(
    map_type: bpf_map_type,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    inner_map: Option<BorrowedFd>,
    name: &str,
) -> Result<OwnedFd, SyscallError> {
    let mut create = MapCreate {
        map_type: map_type as u32,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
        inner_map_fd: inner_map.map_or(0, |fd| fd.as_raw_fd() as u32),
        numa_node: 0,
        map_name: [0; 16],
        map_ifindex: 0,
        btf_fd: 0,
        btf_key_type_id: 0,
        btf_value_type_id: 0,
        btf_vmlinux_value_type_id: 0,
        map_extra: 0,
        value_type_btf_obj_fd: 0,
        map_token_fd: 0,
    };
    for (to, from) in create.map_name.iter_mut().zip(name.bytes().take(15)) {
        *to = from as libc::c_char;
    }
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_1 = create;
    let fd = bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr, "bpf_map_create")?;
    // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The barrier map (type, key and value size, entries): an `ARRAY_OF_MAPS` of one slot, keys and
/// values 4 bytes (an index, a map fd). Not in the object: `memory::estimate` counts it from here.
pub(crate) const BARRIER: (bpf_map_type, u32, u32, u32) = (bpf_map_type::BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 1);

/// Creates the barrier map (an `ARRAY_OF_MAPS` of one slot) and pins it at `path`.
pub fn create_barrier(path: &Path) -> Result<(), SyscallError> {
    let inner = barrier_inner()?;
    let (map_type, key_size, value_size, max_entries) = BARRIER;
    let outer = create_map(
        map_type,
        key_size,
        value_size,
        max_entries,
        Some(inner.as_fd()),
        "pw_barrier",
    )?;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| SyscallError {
        call: "bpf_obj_pin",
        io_error: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4 = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: outer.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
    };
    bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr, "bpf_obj_pin")?;
    Ok(())
}

/// The one-entry array a barrier holds.
fn barrier_inner() -> Result<OwnedFd, SyscallError> {
    create_map(bpf_map_type::BPF_MAP_TYPE_ARRAY, 4, 4, 1, None, "pw_barrier_in")
}

/// Returns once every BPF program that was running when it was called has finished: an update of
/// an `ARRAY_OF_MAPS` makes the kernel `synchronize_rcu()` before returning
/// (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c). TC programs run inside RCU read-side
/// sections, so after this no program still holds a value it read before the call.
pub fn wait_for_running_programs(barrier: BorrowedFd) -> Result<(), SyscallError> {
    let inner = barrier_inner()?;
    let key: u32 = 0;
    let value: u32 = inner.as_raw_fd() as u32;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2 = ElemUpdate {
        map_fd: barrier.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        __bindgen_anon_1: ElemValue {
            value: &value as *const u32 as u64,
        },
        flags: 0,
    };
    bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr, "bpf_map_update_elem")?;
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
pub fn batch_unsupported(e: &SyscallError) -> bool {
    matches!(
        e.io_error.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(524 /* ENOTSUPP */)
    )
}

/// A batch command's attributes over `keys` (and `values`), `count` entries.
fn batch_attr<K, V>(map: BorrowedFd, keys: *const K, values: *const V, count: usize) -> bpf_attr {
    let mut attr = zeroed_attr();
    attr.batch = Batch {
        in_batch: 0,
        out_batch: 0,
        keys: keys as u64,
        values: values as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    attr
}

/// Every (key, values) of a map through `BPF_MAP_LOOKUP_BATCH`, `chunk` entries per call, handed to
/// `each` one call's worth at a time, so that reading a large map holds one chunk, not the map.
/// Each key comes with `values_per_key` values: the possible CPUs for a per-CPU map (whose
/// values the kernel rounds up to 8 bytes each: `V`'s size must be a multiple of 8 then), 1
/// otherwise. Keys are laid end to end, as `[K]` is.
pub fn lookup_batch<K: Pod, V: Pod>(
    map: BorrowedFd,
    values_per_key: usize,
    chunk: usize,
    mut each: impl FnMut(&[K], &[V]),
) -> Result<(), SyscallError> {
    assert!(
        values_per_key == 1 || size_of::<V>().is_multiple_of(8),
        "per-CPU values are 8-byte aligned"
    );
    let mut chunk = chunk.max(1);
    let mut keys: Vec<K> = zeroed_vec(chunk);
    let mut values: Vec<V> = zeroed_vec(chunk * values_per_key);
    let mut token = 0u64;
    let mut first = true;
    loop {
        let mut out_token = 0u64;
        let mut attr = batch_attr(map, keys.as_mut_ptr(), values.as_mut_ptr(), chunk);
        attr.batch.in_batch = if first { 0 } else { &token as *const u64 as u64 };
        attr.batch.out_batch = &mut out_token as *mut u64 as u64;
        let result = bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr, "bpf_map_lookup_batch");
        // SAFETY: `batch` is the member this command reads and writes.
        let got = (unsafe { attr.batch.count } as usize).min(chunk);
        match result {
            Ok(_) => each(&keys[..got], &values[..got * values_per_key]),
            Err(e) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                each(&keys[..got], &values[..got * values_per_key]);
                return Ok(());
            }
            // A bucket holds more entries than the buffer: retry the same position with more room.
            Err(e) if e.io_error.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                chunk *= 2;
                keys = zeroed_vec(chunk);
                values = zeroed_vec(chunk * values_per_key);
                continue;
            }
            Err(e) => return Err(e),
        }
        token = out_token;
        first = false;
    }
}

/// Writes `keys` with their `values` (`values.len()` a multiple of `keys.len()`: per key, one value
/// per possible CPU for a per-CPU map, else one) with `BPF_MAP_UPDATE_BATCH`; fails unless the
/// kernel wrote them all.
pub fn update_batch<K: Pod, V: Pod>(map: BorrowedFd, keys: &[K], values: &[V]) -> Result<(), SyscallError> {
    if keys.is_empty() {
        return Ok(());
    }
    assert_eq!(values.len() % keys.len(), 0, "the same number of values for every key");
    let mut attr = batch_attr(map, keys.as_ptr(), values.as_ptr(), keys.len());
    bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr, "bpf_map_update_batch")?;
    // SAFETY: `batch` is the member this command writes back.
    let done = unsafe { attr.batch.count } as usize;
    if done != keys.len() {
        return Err(SyscallError {
            call: "bpf_map_update_batch",
            io_error: io::Error::other(format!("wrote {done} of {} entries", keys.len())),
        });
    }
    Ok(())
}

/// Removes `key` from a hash map; a key that is not there is not an error (returns false).
pub fn remove_if_present<K: Pod>(map: BorrowedFd, key: &K) -> Result<bool, SyscallError> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2 = ElemUpdate {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        __bindgen_anon_1: ElemValue { value: 0 },
        flags: 0,
    };
    match bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr, "bpf_map_delete_elem") {
        Ok(_) => Ok(true),
        Err(e) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes every key of `keys` from a hash map, those not there skipped: `BPF_MAP_DELETE_BATCH`
/// (which stops at a missing key: the rest go in the next call), or one `remove_if_present` per
/// key where the kernel has no batch operations for the map.
pub fn remove_all_if_present<K: Pod>(map: BorrowedFd, keys: &[K]) -> Result<(), SyscallError> {
    let mut done = 0;
    while done < keys.len() {
        let rest = &keys[done..];
        let mut attr = batch_attr::<K, u8>(map, rest.as_ptr(), std::ptr::null(), rest.len());
        let deleted = bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr, "bpf_map_delete_batch");
        // SAFETY: `batch` is the member this command writes back.
        let count = (unsafe { attr.batch.count } as usize).min(rest.len());
        match deleted {
            Ok(_) => return Ok(()),
            // The key after the `count` deleted is not there.
            Err(e) if e.io_error.raw_os_error() == Some(libc::ENOENT) => done += count + 1,
            Err(e) if count == 0 && batch_unsupported(&e) => {
                for key in rest {
                    remove_if_present(map, key)?;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
