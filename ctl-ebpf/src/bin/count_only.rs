//! A TC classifier that does only what portwatch does per matched packet after parsing: one
//! per-CPU hash lookup of a fixed 20-byte `CounterKey` and an in-place increment. Benchmarks use it
//! to split portwatch's cost into "the kernel's hash map" and "portwatch's own work". Not embedded.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::PerCpuHashMap,
    programs::TcContext,
};
use portwatch_common::{CounterKey, Counters};

#[map(name = "counters")]
static COUNTERS: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::with_max_entries(65538, 0);

#[classifier]
pub fn count_only(ctx: TcContext) -> i32 {
    let key = CounterKey {
        remote_ip: [0, 0, 0xffff_0000, ctx.len()],
        port: 443,
        proto: 6,
        direction: 0,
    };
    match COUNTERS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of a live element.
        Some(v) => unsafe {
            (*v).bytes += 100;
            (*v).packets += 1;
        },
        None => {
            let _ = COUNTERS.insert(&key, &Counters { bytes: 100, packets: 1 }, BPF_NOEXIST as u64);
        }
    }
    TC_ACT_UNSPEC
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
