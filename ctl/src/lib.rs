//! portwatch's userspace: the embedded kernel object, the pinned layout, map access, attaching,
//! and one module per CLI verb. `main.rs` only calls `main` here.
//!
//! The modules the test crate and the benchmarks use are public; the rest is the binary's.

pub(crate) mod attach;
pub mod cidr;
pub(crate) mod cli;
pub(crate) mod cmd;
pub(crate) mod config;
pub(crate) mod error;
pub(crate) mod fault;
pub(crate) mod filter;
pub mod generation;
pub(crate) mod history;
pub(crate) mod journal;
pub(crate) mod lifecycle;
pub mod maps;
pub(crate) mod memory;
pub(crate) mod metrics;
pub(crate) mod netns;
pub mod object;
pub(crate) mod output;
pub mod pinned;
pub(crate) mod ports;
pub(crate) mod reconcile;
pub(crate) mod record;
pub(crate) mod report;
pub(crate) mod reset;
pub mod sources;
pub mod sys;
pub(crate) mod threshold;

use std::process::ExitCode;

use clap::Parser;

/// Parses the command line, runs its verb, and turns the outcome into the documented exit code
/// (every failure one line on stderr).
pub fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like every other failure: clap's first line without its "error: ".
            // A check reports it as UNKNOWN, with its own exit code.
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            if cli::is_alert(std::env::args_os()) {
                return ExitCode::from(cmd::alert_bad_arguments(message.trim_start_matches("error: ")));
            }
            eprintln!(
                "portwatch: {} (see `portwatch --help`)",
                message.trim_start_matches("error: ")
            );
            return ExitCode::from(error::exit::USAGE);
        }
    };
    match cmd::run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("portwatch: {e:#}");
            ExitCode::from(error::exit_code(&e))
        }
    }
}
