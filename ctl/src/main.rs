//! `portwatch`: count, in the kernel, the traffic each remote IP sends to your ports.

use std::process::ExitCode;

use clap::Parser;
use portwatch::{
    cli::{Cli, Command},
    cmd,
    error::{self, exit},
    pinned::PinPath,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like every other failure: clap's first line without its "error: ".
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            eprintln!(
                "portwatch: {} (see `portwatch --help`)",
                message.trim_start_matches("error: ")
            );
            return ExitCode::from(exit::USAGE);
        }
    };
    let pin = PinPath::new(&cli.pin_path);
    let result = match &cli.command {
        Command::Load(args) => cmd::load::run(&pin, args),
        Command::Attach { iface, direction, mode } => cmd::attach::attach(&pin, iface, *direction, *mode),
        Command::Detach { iface } => cmd::attach::detach(&pin, iface),
        Command::Ports(command) => cmd::ports::run(&pin, command),
        Command::Status { json } => cmd::status::run(&pin, *json),
        Command::Top(args) => cmd::top::run(&pin, args),
        Command::Reset(args) => cmd::reset::run(&pin, args),
        Command::Unload => cmd::unload::run(&pin),
        Command::Check => cmd::check::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portwatch: {e:#}");
            ExitCode::from(error::exit_code(&e))
        }
    }
}
