//! `portwatch watch -f FILE`: applies the file, then again within a second of every change to it,
//! until SIGINT or SIGTERM (exit 0; counting goes on in the kernel). The only resident mode, and an
//! optional one: nothing depends on it running.
//!
//! It watches the file's directory, not the file: editors write a new file and rename it over the
//! old one, and a file deleted and created again is another inode.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use notify::{EventKind, RecursiveMode, Watcher};

use crate::{
    config::Desired,
    pinned::PinPath,
    reconcile::{self, Options},
};

/// Edits arrive as bursts of events (write, close, rename): one apply after the burst.
const SETTLE: Duration = Duration::from_millis(200);
/// How often the loop looks at the stop flag when nothing happens.
const TICK: Duration = Duration::from_millis(100);

pub(super) fn run(pin: &PinPath, file: &Path) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("handling SIGINT and SIGTERM")?;
    }
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .context("the configuration file has no file name")?
        .to_owned();
    let (events, arrivals) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = events.send(event);
    })
    .context("watching for changes (inotify)")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;

    apply(pin, file);
    let mut due: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        match arrivals.recv_timeout(TICK) {
            Ok(Ok(event)) => {
                let ours = event.paths.iter().any(|p| p.file_name() == Some(&name));
                let changes = matches!(
                    event.kind,
                    EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
                );
                if ours && changes {
                    due = Some(Instant::now() + SETTLE);
                }
            }
            Ok(Err(e)) => eprintln!("portwatch: watching {}: {e}", file.display()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("the watch on {} ended", dir.display()),
        }
        if due.is_some_and(|at| Instant::now() >= at) {
            due = None;
            apply(pin, file);
        }
    }
    Ok(())
}

/// Applies the file as it is now. A file that cannot be applied (gone, invalid) is reported in one
/// line on stderr, and the state stays as it was.
fn apply(pin: &PinPath, file: &Path) {
    let applied = Desired::from_file(pin, file).and_then(|desired| reconcile::apply(&desired, &Options::default()));
    match applied {
        Ok(changes) if changes.is_empty() => println!("{}: no changes", file.display()),
        Ok(changes) => changes.iter().for_each(|line| println!("{line}")),
        Err(e) => eprintln!("portwatch: {e:#} (the state stays as it was)"),
    }
}
