//! One module per verb, all of the same shape: open the pinned state for what the verb does
//! (`Pinned::open` / `probe` / `create`, see `pinned`), act, print, return (the lock goes with
//! the state). The environment every verb needs (privileges, bpffs) is checked here, once, before
//! any verb runs. No verb calls another verb: what two verbs share lives in the module of its
//! concept (`attach`, `ports`, `report`, `output`, `generations`...).

mod apply;
mod attach;
mod check;
mod completions;
mod config;
mod load;
mod metrics;
mod ports;
mod reset;
mod serve;
mod status;
mod top;
mod unload;
mod watch;

use anyhow::Result;

use crate::{
    cli::{Cli, Command},
    lifecycle,
    pinned::{check_privileges, ensure_bpffs, Needs, PinPath},
};

/// The capabilities a verb needs: CAP_BPF to read and write pinned maps, and CAP_NET_ADMIN too to
/// load TC programs and attach them (README, "Privileges").
fn needs(command: &Command) -> Needs {
    match command {
        Command::Status { .. }
        | Command::Top(_)
        | Command::Ports(_)
        | Command::Reset(_)
        | Command::Config(_)
        | Command::Metrics { .. }
        | Command::Serve { .. } => Needs::Maps,
        Command::Load(_)
        | Command::Attach { .. }
        | Command::Detach { .. }
        | Command::Unload { .. }
        | Command::Apply(_)
        | Command::Watch { .. }
        | Command::Check
        | Command::Completions { .. }
        | Command::Man => Needs::Network,
    }
}

/// Runs the command line's verb.
pub(crate) fn run(cli: &Cli) -> Result<()> {
    let pin = PinPath::new(&cli.pin_path);
    // Printing text made from the command line itself needs nothing of the system.
    match &cli.command {
        Command::Completions { shell } => return completions::completions(*shell),
        Command::Man => return completions::man(),
        _ => {}
    }
    check_privileges(needs(&cli.command))?;
    crate::sys::bpf::lift_memlock_limit();
    // `check` pins nothing: it needs no bpffs.
    if !matches!(cli.command, Command::Check) {
        ensure_bpffs(&pin)?;
    }
    // What a crash interrupted (a reset, an attach) is finished or rolled back by the next command
    // that takes the lock (reset and unload do it under their own lock, and refuse to go on
    // without it).
    let takes_lock = !matches!(
        cli.command,
        Command::Status { .. }
            | Command::Top(_)
            | Command::Check
            | Command::Config(_)
            | Command::Ports(crate::cli::PortsCommand::List { .. })
            | Command::Reset(_)
            | Command::Unload { .. }
    );
    if takes_lock {
        if let Err(e) = lifecycle::recover_interrupted(&pin, &mut |note| eprintln!("portwatch: {note}")) {
            eprintln!("portwatch: warning: {e:#}");
        }
    }
    match &cli.command {
        Command::Load(args) => load::run(&pin, args),
        Command::Attach {
            iface,
            direction,
            mode,
            netns,
        } => attach::attach(&pin, iface, netns.as_deref(), direction.map(Into::into), *mode),
        Command::Detach { iface, netns } => attach::detach(&pin, iface, netns.as_deref()),
        Command::Ports(command) => ports::run(&pin, command),
        Command::Status { json } => status::run(&pin, *json),
        Command::Top(args) => top::run(&pin, args),
        Command::Reset(args) => reset::run(&pin, args),
        Command::Unload { drain_to, force } => unload::run(&pin, drain_to.as_deref(), *force),
        Command::Check => check::run(),
        Command::Apply(args) => apply::run(&pin, args),
        Command::Watch { file } => watch::run(&pin, file),
        Command::Config(crate::cli::ConfigCommand::Show) => config::show(&pin),
        Command::Metrics { output, export } => metrics::run(&pin, output.as_deref(), &export.into()),
        Command::Serve { listen, export } => serve::run(&pin, listen, &export.into()),
        Command::Completions { .. } | Command::Man => unreachable!("handled above"),
    }
}
