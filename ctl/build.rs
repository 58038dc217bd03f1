//! Builds the kernel program (`ctl-ebpf`) for `bpfel-unknown-none` and leaves the object in
//! `OUT_DIR`, where `src/object.rs` embeds it: `target/*/portwatch` is one self-contained file.
//!
//! The recipe is `.ci/bootstrap`'s: Debian's `rustc-web` (which ships a prebuilt `core` for the BPF
//! target, so no `-Z build-std`), `bpf-linker` built against LLVM 22, and `RUSTC_BOOTSTRAP=1`
//! because `aya-ebpf` uses `asm_experimental_arch`. The userspace crates keep rustup's toolchain.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const BOOTSTRAP_HINT: &str = "run `.ci/bootstrap` (as root) in the repository to install it";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let ebpf_dir = root.join("ctl-ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());

    for path in [
        "ctl-ebpf/src",
        "ctl-ebpf/Cargo.toml",
        "ctl-ebpf/Cargo.lock",
        "ctl-common/src",
        "ctl-common/Cargo.toml",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(path).display());
    }
    for var in ["PORTWATCH_BPF_CARGO", "PORTWATCH_BPF_RUSTC", "PORTWATCH_BPF_LINKER"] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let cargo = tool(
        "PORTWATCH_BPF_CARGO",
        "/usr/bin/cargo",
        "Debian's cargo (package cargo-web)",
    );
    let rustc = tool(
        "PORTWATCH_BPF_RUSTC",
        "/usr/bin/rustc",
        "Debian's rustc (package rustc-web)",
    );
    if !Path::new("/usr/lib/rustlib/bpfel-unknown-none").exists() && env::var_os("PORTWATCH_BPF_RUSTC").is_none() {
        fail("the prebuilt `core` for bpfel-unknown-none (package libstd-rust-web-dev-bpf) is missing");
    }
    let linker = env::var_os("PORTWATCH_BPF_LINKER")
        .map(PathBuf::from)
        .or_else(find_bpf_linker)
        .unwrap_or_else(|| {
            fail("bpf-linker 0.13.0 is not installed (not on PATH nor in $CARGO_HOME/bin)");
        });

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(&cargo);
    // Start from a clean slate: the outer cargo's variables (RUSTC, RUSTFLAGS, CARGO_ENCODED_RUSTFLAGS,
    // CARGO_TARGET_DIR, profile settings...) belong to the host build, not to this one.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO") && key != "CARGO_HOME") || key.starts_with("RUST") {
            cmd.env_remove(&*key);
        }
    }
    cmd.current_dir(&ebpf_dir)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        // Keep debug info: the linker turns it into the BTF that aya needs.
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir);
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("could not run {}: {e}", cargo.display())));
    if !status.success() {
        panic!("building the kernel program (ctl-ebpf) failed: see the compiler output above");
    }
    // `portwatch` is embedded; the benchmark's comparison programs and the tests' probe are only
    // left beside it.
    for bin in ["portwatch", "noop", "linear_probe", "bench_update"] {
        let object = target_dir.join("bpfel-unknown-none/release").join(bin);
        std::fs::copy(&object, out_dir.join(format!("{bin}.bpf.o")))
            .unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
    }
}

fn tool(var: &str, default: &str, what: &str) -> PathBuf {
    let path = env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    if !path.exists() {
        fail(&format!("{what} is missing: {} does not exist", path.display()));
    }
    path
}

fn find_bpf_linker() -> Option<PathBuf> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    env::var_os("PATH")
        .into_iter()
        .flat_map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .chain(cargo_home.map(|h| h.join("bin")))
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}

fn fail(what: &str) -> ! {
    eprintln!("error: cannot build portwatch's kernel program: {what}; {BOOTSTRAP_HINT}");
    panic!("{what}; {BOOTSTRAP_HINT}");
}
