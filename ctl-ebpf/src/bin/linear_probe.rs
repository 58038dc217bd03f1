//! A TC classifier pair for tests, not embedded: for every packet it records the skb's length and
//! the length of its linear part (`data_end - data`), per direction, so that a test can show which
//! of the frames it sent reached portwatch's program with headers outside the linear part, where
//! portwatch reads them with `bpf_skb_load_bytes`. `linear_seen`, eight `u64`: at `direction * 4`
//! the packets seen, then the last one's `skb->len`, then its linear length (0 ingress, 1 egress).
#![no_std]
#![no_main]

#[path = "../runtime.rs"]
mod runtime;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, macros::map, maps::Array, programs::TcContext};

#[map(name = "linear_seen")]
static LINEAR_SEEN: Array<u64> = Array::with_max_entries(8, 0);

#[classifier]
pub fn linear_probe_ingress(ctx: TcContext) -> i32 {
    record(&ctx, 0);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn linear_probe_egress(ctx: TcContext) -> i32 {
    record(&ctx, 4);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn record(ctx: &TcContext, slot: u32) {
    // A pointer difference, which the verifier allows a privileged loader (the tests run as root).
    let linear = (ctx.data_end() - ctx.data()) as u64;
    // The test sends one frame at a time and waits for it: plain stores, no atomics needed.
    // SAFETY: slots of a live array; the indexes are below its size.
    unsafe {
        if let Some(p) = LINEAR_SEEN.get_ptr_mut(slot + 1) {
            *p = ctx.len() as u64;
        }
        if let Some(p) = LINEAR_SEEN.get_ptr_mut(slot + 2) {
            *p = linear;
        }
        if let Some(p) = LINEAR_SEEN.get_ptr_mut(slot) {
            *p += 1;
        }
    }
}
