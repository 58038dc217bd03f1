//! Errors that an operator acts on, each with its exit code. Anything else is exit code 1.

use std::path::PathBuf;

/// Exit codes, documented in `portwatch --help`.
pub mod exit {
    /// A failure not listed below (a syscall the kernel refused, I/O...).
    pub const FAILURE: u8 = 1;
    /// Bad arguments (an unknown flag, a bad port SPEC, `--max-entries 0`...) or a bad
    /// configuration file; sizes whose maps would take more memory than `--memory-limit` allows
    /// (without `--force`): arguments to change, like the others.
    pub const USAGE: u8 = 2;
    /// Not root, or missing CAP_BPF (every command) / CAP_NET_ADMIN (those that load or attach).
    pub const PERMISSION: u8 = 3;
    /// Nothing is loaded at the pin path.
    pub const NOT_LOADED: u8 = 4;
    /// Pinned state that this portwatch cannot use as asked: another layout version, or a
    /// `load` whose `--max-entries`/`--direction` differ from the loaded ones.
    pub const CONFLICT: u8 = 5;
    /// An interface that does not exist, or is not attached.
    pub const INTERFACE: u8 = 6;
    /// bpffs is missing and cannot be mounted, or the pin path is not on bpffs.
    pub const BPFFS: u8 = 7;
    /// `history`: a record file or database that cannot be used (not a reset record, a damaged
    /// database, another schema version, a directory it cannot write).
    pub const HISTORY: u8 = 8;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "permission denied: this portwatch command needs root, or the capabilities {needs} \
         (missing: {missing}); run it with sudo"
    )]
    Permission { missing: String, needs: &'static str },
    #[error("nothing is loaded at {}: run `portwatch load --iface IF --port SPEC` first", .0.display())]
    NotLoaded(PathBuf),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Interface(String),
    #[error("{0}")]
    Bpffs(String),
    /// A configuration file that cannot be used as it is: exit code 2, like bad arguments.
    #[error("{0}")]
    Config(String),
    /// A history record file or database that cannot be used.
    #[error("{0}")]
    History(String),
    /// Maps that would take more than the memory guard allows (`memory::weigh`): exit code 2, like
    /// bad arguments, since the sizes asked for are what to change.
    #[error("{0}")]
    TooMuchMemory(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Permission { .. } => exit::PERMISSION,
            Error::NotLoaded(_) => exit::NOT_LOADED,
            Error::Conflict(_) => exit::CONFLICT,
            Error::Interface(_) => exit::INTERFACE,
            Error::Bpffs(_) => exit::BPFFS,
            Error::Config(_) => exit::USAGE,
            Error::History(_) => exit::HISTORY,
            Error::TooMuchMemory(_) => exit::USAGE,
        }
    }
}

/// The exit code for any error a verb returned.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|e| e.downcast_ref::<Error>())
        .map(Error::exit_code)
        .unwrap_or(exit::FAILURE)
}
