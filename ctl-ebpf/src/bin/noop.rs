//! A do-nothing TC classifier: the floor that BENCHMARKS.md measures portwatch's program against
//! (same hook, same test-run harness, no work). Not embedded in `portwatch`.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};

#[classifier]
pub fn noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
