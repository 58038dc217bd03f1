//! One module per verb, all of the same shape: open the pinned state for what the verb does
//! (`Pinned::open` / `probe` / `create`, see `pinned`), act, print, return (the lock goes with
//! the state). The environment every verb needs (privileges, bpffs) is checked here, once, before
//! any verb runs. No verb calls another verb: what two verbs share lives in the module of its
//! concept (`attach`, `ports`, `report`, `output`, `reset`...).

mod alert;
mod apply;
mod attach;
mod check;
mod completions;
mod config;
mod history;
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
    cli::{Cli, Command, ConfigCommand, PortsCommand},
    lifecycle,
    pinned::{check_privileges, ensure_bpffs, Needs, PinPath},
};

/// What the dispatcher does before a verb runs: the capabilities it checks (docs/configuration.md,
/// "Privileges"), whether the pin path must be on bpffs, and whether what a crash interrupted (a
/// reset, an attach) is finished first. Each command's is in its row of `run`'s table.
#[derive(Clone, Copy, Debug)]
struct Policy {
    /// `None`: the verb prints text made from the command line itself and needs nothing of the
    /// system.
    needs: Option<Needs>,
    bpffs: bool,
    recover_first: bool,
}

impl Policy {
    /// Text made from the command line (`completions`, `man`).
    const TEXT: Policy = Policy {
        needs: None,
        bpffs: false,
        recover_first: false,
    };
    /// Files only, no pinned state (`history`): the store and the record files' own permissions
    /// decide.
    const FILES: Policy = Policy {
        needs: None,
        bpffs: false,
        recover_first: false,
    };
    /// Reads pinned maps without the lock (`status`, `top`, `ports list`, `config show`).
    const READS: Policy = Policy {
        needs: Some(Needs::Maps),
        bpffs: true,
        recover_first: false,
    };
    /// Works on pinned maps once what a crash interrupted is finished (`ports add|del|set`,
    /// `metrics`, `serve`).
    const MAPS: Policy = Policy {
        needs: Some(Needs::Maps),
        bpffs: true,
        recover_first: true,
    };
    /// Loads or attaches programs once what a crash interrupted is finished (`load`, `attach`,
    /// `detach`, `apply`, `watch`).
    const NETWORK: Policy = Policy {
        needs: Some(Needs::Network),
        bpffs: true,
        recover_first: true,
    };
    /// `reset`: recovers under its own lock, and refuses to go on without recovering.
    const RESETS: Policy = Policy {
        needs: Some(Needs::Maps),
        bpffs: true,
        recover_first: false,
    };
    /// `unload`: likewise, unless forced.
    const UNLOADS: Policy = Policy {
        needs: Some(Needs::Network),
        bpffs: true,
        recover_first: false,
    };
    /// `check`: loads the program through the verifier and pins nothing.
    const CHECKS: Policy = Policy {
        needs: Some(Needs::Network),
        bpffs: false,
        recover_first: false,
    };

    /// Checks the environment the policy asks for, once, before the verb.
    fn prepare(self, pin: &PinPath) -> Result<()> {
        let Some(needs) = self.needs else {
            return Ok(());
        };
        check_privileges(needs)?;
        crate::sys::bpf::lift_memlock_limit();
        if self.bpffs {
            ensure_bpffs(pin)?;
        }
        if self.recover_first {
            if let Err(e) = lifecycle::recover_interrupted(pin, &mut |note| eprintln!("portwatch: {note}")) {
                eprintln!("portwatch: warning: {e:#}");
            }
        }
        Ok(())
    }
}

/// A verb, ready to run.
type Verb<'a> = Box<dyn FnOnce() -> Result<()> + 'a>;

pub(crate) use alert::bad_arguments as alert_bad_arguments;

/// Runs the command line's verb: one row per command, its policy and its verb. Returns the exit
/// code of a success: 0, or a check's state (`alert`).
pub(crate) fn run(cli: &Cli) -> Result<u8> {
    let pin = &PinPath::new(&cli.pin_path);
    let (policy, verb): (Policy, Verb) = match &cli.command {
        // A monitoring-plugin check has exit codes of its own (0 to 3) and reports every failure
        // itself, as UNKNOWN: the environment checks included.
        Command::Alert(args) => {
            // From the history store: files only.
            let policy = if args.history { Policy::FILES } else { Policy::READS };
            return Ok(alert::run(pin, args, || policy.prepare(pin)));
        }
        Command::Load(args) => (Policy::NETWORK, Box::new(|| load::run(pin, args))),
        Command::Attach {
            iface,
            direction,
            mode,
            netns,
        } => (
            Policy::NETWORK,
            Box::new(|| attach::attach(pin, iface, netns.as_deref(), direction.map(Into::into), *mode)),
        ),
        Command::Detach { iface, netns } => (
            Policy::NETWORK,
            Box::new(|| attach::detach(pin, iface, netns.as_deref())),
        ),
        Command::Ports(command @ PortsCommand::List { .. }) => (Policy::READS, Box::new(|| ports::run(pin, command))),
        Command::Ports(command) => (Policy::MAPS, Box::new(|| ports::run(pin, command))),
        Command::Status { json } => (Policy::READS, Box::new(|| status::run(pin, *json))),
        Command::Top(args) => (Policy::READS, Box::new(|| top::run(pin, args))),
        Command::Reset(args) => (Policy::RESETS, Box::new(|| reset::run(pin, args))),
        Command::Unload { drain_to, force } => (
            Policy::UNLOADS,
            Box::new(|| unload::run(pin, drain_to.as_deref(), *force)),
        ),
        Command::Check => (Policy::CHECKS, Box::new(check::run)),
        Command::Apply(args) => (Policy::NETWORK, Box::new(|| apply::run(pin, args))),
        Command::Watch { file } => (Policy::NETWORK, Box::new(|| watch::run(pin, file))),
        Command::Config(ConfigCommand::Show) => (Policy::READS, Box::new(|| config::show(pin))),
        Command::Metrics { output, export } => (
            Policy::MAPS,
            Box::new(|| metrics::run(pin, output.as_deref(), &export.into())),
        ),
        Command::Serve { listen, export } => (Policy::MAPS, Box::new(|| serve::run(pin, listen, &export.into()))),
        Command::Completions { shell } => (Policy::TEXT, Box::new(|| completions::completions(*shell))),
        Command::Man => (Policy::TEXT, Box::new(completions::man)),
        Command::History(args) => (Policy::FILES, Box::new(|| history::run(args))),
    };
    policy.prepare(pin)?;
    verb()?;
    Ok(0)
}
