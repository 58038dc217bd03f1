//! `portwatch metrics [--output FILE]`: the metrics in the Prometheus text format, on stdout or
//! written atomically for node_exporter's textfile collector (a temporary file beside FILE,
//! fsync'd, renamed over it: a reader sees the old file or the new one, never half of one).

use std::{io::Write, path::Path};

use anyhow::{Context, Result};

use crate::{
    metrics::{self, Options},
    pinned::{Access, PinPath, Pinned},
};

pub(super) fn run(pin: &PinPath, output: Option<&Path>, options: &Options) -> Result<()> {
    let text = metrics::render(Pinned::probe(pin, Access::Snapshot)?.as_mut(), options, None)?;
    match output {
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("writing to stdout")
        }
        Some(path) => write_atomically(path, text.as_bytes()),
    }
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().context("--output names no file")?.to_string_lossy();
    // A name the textfile collector skips (it reads *.prom only).
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        // The rename itself, on disk.
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}
