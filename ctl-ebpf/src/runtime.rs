//! What every `no_std` eBPF binary of this crate needs once: a panic handler (never reached: the
//! verifier rejects a program that could panic) and the licence section. `main.rs` has it as a
//! module; the benchmark and test programs in `bin/` include it by path.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
