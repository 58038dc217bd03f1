//! `portwatch`: count, in the kernel, the traffic each remote IP sends to your ports.

use std::process::ExitCode;

use anyhow::{Context, Result};
use aya::programs::SchedClassifier;
use clap::{Parser, Subcommand};
use ctl_common::{program_names, LAYOUT_VERSION};

#[derive(Parser)]
#[command(
    name = "portwatch",
    version,
    about,
    after_help = "Examples:\n  portwatch check    # can this kernel run portwatch's program?"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the embedded kernel program through the verifier, report, and unload it. Changes nothing.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check => check(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check() -> Result<()> {
    let mut ebpf = portwatch::object::load(65536).context(
        "loading the embedded object failed (are you root, or do you have CAP_BPF and CAP_NET_ADMIN?)",
    )?;
    for name in [program_names::INGRESS, program_names::EGRESS] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .context("program missing from the object")?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel's verifier refused {name}"))?;
        let info = prog.info()?;
        println!(
            "{name}: loaded and verified (tag {:016x}, {} bytes JITed)",
            info.tag(),
            info.size_jitted()
        );
    }
    println!("layout version {LAYOUT_VERSION}; everything was unloaded again");
    Ok(())
}
