//! Network namespaces: the one portwatch runs in, or one given by `--netns NAME|PATH` (or `netns:`
//! in a configuration file), where an interface is looked up and a program attached. Pins stay in
//! the bpffs of portwatch's own mount namespace, whatever the network namespace.

use std::{
    fs::File,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::error::Error;

/// Where `ip netns add NAME` puts its namespaces.
const NAMED: &str = "/run/netns";
/// This thread's network namespace.
const OWN: &str = "/proc/thread-self/ns/net";

/// A network namespace, known by its inode (what attachment keys hold) and, when one was given,
/// by the name or path it was given as (what attachment records hold, to enter it again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NetNs {
    /// As given: an `ip netns` name or a path; `None` for the namespace the command runs in.
    pub given: Option<String>,
    path: PathBuf,
    pub inode: u64,
}

fn inode(path: &Path) -> std::io::Result<u64> {
    std::fs::metadata(path).map(|m| m.ino())
}

impl NetNs {
    /// The namespace this command runs in.
    pub(crate) fn current() -> Result<NetNs> {
        Ok(NetNs {
            given: None,
            path: PathBuf::from(OWN),
            inode: inode(Path::new(OWN)).with_context(|| format!("reading {OWN}"))?,
        })
    }

    /// `NAME` (of `ip netns`, under /run/netns) or a path (`/proc/PID/ns/net`, a bind mount of one).
    pub(crate) fn named(given: &str) -> Result<NetNs> {
        let path = if given.contains('/') {
            PathBuf::from(given)
        } else {
            Path::new(NAMED).join(given)
        };
        if given.is_empty() || given.len() > portwatch_common::ATTACH_NETNS_LEN {
            return Err(Error::Interface(format!(
                "{given:?} is not a network namespace name or path (1 to {} bytes)",
                portwatch_common::ATTACH_NETNS_LEN
            ))
            .into());
        }
        let inode = inode(&path).map_err(|e| {
            Error::Interface(format!(
                "no network namespace {given:?} ({}: {e}): see `ip netns list`, or give a path such as \
                 /proc/PID/ns/net",
                path.display()
            ))
        })?;
        Ok(NetNs {
            given: Some(given.to_string()),
            path,
            inode,
        })
    }

    /// `--netns` as given, or the current namespace.
    pub(crate) fn from_arg(given: Option<&str>) -> Result<NetNs> {
        match given {
            Some(given) => NetNs::named(given),
            None => NetNs::current(),
        }
    }

    /// Runs `f` in this namespace (on this thread), then returns to the one it ran in. Interface
    /// names and indexes, netlink and TCX links inside `f` are this namespace's.
    pub(crate) fn enter<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        let own = File::open(OWN).with_context(|| format!("opening {OWN}"))?;
        if own.metadata().map(|m| m.ino()).ok() == Some(self.inode) {
            return Ok(f());
        }
        let target = File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        // The path may name another namespace than it did: enter only the one recorded.
        if target.metadata().map(|m| m.ino()).ok() != Some(self.inode) {
            return Err(Error::Interface(format!(
                "{} is no longer the network namespace it was (inode {})",
                self.path.display(),
                self.inode
            ))
            .into());
        }
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering the network namespace {}", self.path.display()))?;
        let result = f();
        // Going on in another namespace than the caller's would act on the wrong interfaces.
        if let Err(e) = setns(own.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("portwatch: could not return to its own network namespace ({e})");
            std::process::abort();
        }
        Ok(result)
    }

    /// The namespace of an attachment: its recorded name or path when one was given (`None` when
    /// that is gone or names another namespace now), or the current one when the inode is its.
    pub(crate) fn of_attachment(inode: u64, recorded: &str) -> Option<NetNs> {
        let ns = if recorded.is_empty() {
            NetNs::current().ok()?
        } else {
            NetNs::named(recorded).ok()?
        };
        (ns.inode == inode).then_some(ns)
    }

    /// For messages: ` in network namespace NAME`, or nothing for the current one.
    pub(crate) fn suffix(&self) -> String {
        match &self.given {
            Some(given) => format!(" in network namespace {given}"),
            None => String::new(),
        }
    }
}
