//! A do-nothing TC classifier: the floor that BENCHMARKS.md measures portwatch's program against
//! (same hook, same test-run harness, no work). Not embedded in `portwatch`.
#![no_std]
#![no_main]

#[path = "../runtime.rs"]
mod runtime;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};

#[classifier]
pub fn noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}
