//! Where a reset's record goes: an append-only file, which is the commit log of the exactly-once
//! protocol (`reset`), or stdout when it is a pipe or a terminal.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom, Write},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::fault;

/// The record's destination.
pub(crate) enum Output {
    /// A regular file, written at its end (`--output FILE`, `--drain-to FILE`, or stdout as
    /// `>> FILE`): exactly once.
    File(RecordFile),
    /// Stdout, a pipe or a terminal: what was written may have been read, so a reset interrupted
    /// after writing may print its counts again (never loses them).
    Stdout,
}

impl Output {
    /// `--output FILE`, or stdout (as a file when it is one, written at its end).
    pub(crate) fn open(path: Option<&Path>) -> Result<Output> {
        Ok(match path {
            Some(path) => Output::File(RecordFile::open(path)?),
            None => RecordFile::stdout().map_or(Output::Stdout, Output::File),
        })
    }

    /// Writes the record `render` writes (`Written` says how long it is and its hash). A file gets
    /// it streamed to its end, not yet synced (`sync` does that); stdout gets it whole once it is
    /// rendered, so that a failure while rendering prints nothing. If anything fails, a file is cut
    /// back to its old length.
    pub(crate) fn write(&mut self, render: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<Written> {
        match self {
            Output::File(file) => file.append(render),
            Output::Stdout => {
                let mut bytes = Vec::new();
                render(&mut bytes).context("rendering the record")?;
                let mut out = io::stdout().lock();
                let mut hashing = Hashing::new(&mut out);
                hashing
                    .write_all(&bytes)
                    .and_then(|()| hashing.flush())
                    .context("writing to stdout")?;
                Ok(hashing.written())
            }
        }
    }

    /// Makes a written record durable (a file, and its directory entry if this created it).
    pub(crate) fn sync(&mut self) -> Result<()> {
        match self {
            Output::File(file) => file.sync(),
            Output::Stdout => Ok(()),
        }
    }
}

/// A record's length and hash, as written.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Written {
    pub len: u64,
    pub hash: u64,
}

/// Counts and hashes what goes through it. Its first write passes half the bytes, then the
/// `reset:writing` fault point: a crash test can stop a reset with part of its record written.
struct Hashing<W: Write> {
    inner: W,
    len: u64,
    hash: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            len: 0,
            hash: FNV_OFFSET,
        }
    }

    fn written(&self) -> Written {
        Written {
            len: self.len,
            hash: self.hash,
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let first = self.len == 0 && buf.len() > 1;
        let buf = if first { &buf[..buf.len() / 2] } else { buf };
        let n = self.inner.write(buf)?;
        self.hash = hash_more(self.hash, &buf[..n]);
        self.len += n as u64;
        if first {
            self.inner.flush()?;
            fault::point("reset:writing")?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hash_more(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| (h ^ b as u64).wrapping_mul(FNV_PRIME))
}

/// FNV-1a, 64 bits: recovery recognises a whole record in the file by its length and this.
pub(crate) fn hash(bytes: &[u8]) -> u64 {
    hash_more(FNV_OFFSET, bytes)
}

/// A regular file that records are appended to.
pub(crate) struct RecordFile {
    file: File,
    pub path: PathBuf,
    /// This run created it: its directory entry is synced too.
    created: bool,
}

impl RecordFile {
    /// Opens (creating) `path` for appending. Nothing else happens to the file before the reset
    /// can write: a path that cannot be written fails with nothing touched.
    pub(crate) fn open(path: &Path) -> Result<RecordFile> {
        let created = !path.exists();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !file.metadata()?.file_type().is_file() {
            anyhow::bail!("{} is not a regular file", path.display());
        }
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(RecordFile { file, path, created })
    }

    /// Stdout as a file, when it is a regular file written at its end (`>> log`, or `> log`):
    /// then cutting it back to its old length undoes a partial write. Its path is what
    /// `/proc/self/fd/1` names.
    fn stdout() -> Option<RecordFile> {
        let mut file = File::from(io::stdout().as_fd().try_clone_to_owned().ok()?);
        let appends = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .is_ok_and(|flags| flags & libc::O_APPEND != 0);
        let len = file.metadata().ok().filter(|m| m.file_type().is_file())?.len();
        let at = file.stream_position().ok()?;
        if !(appends || at == len) {
            return None;
        }
        let path = std::fs::read_link("/proc/self/fd/1").ok()?;
        // Opened again, to read its end too (the shell's descriptor may be write-only).
        let file = std::fs::OpenOptions::new()
            .append(true)
            .read(true)
            .open("/proc/self/fd/1")
            .ok()
            .filter(|f| {
                f.metadata()
                    .is_ok_and(|m| m.ino() == file.metadata().map(|m| m.ino()).unwrap_or(0))
            })?;
        Some(RecordFile {
            file,
            path,
            created: false,
        })
    }

    pub(crate) fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .with_context(|| format!("reading {}", self.path.display()))?
            .len())
    }

    /// Device and inode: the journal checks that recovery reopens the same file.
    pub(crate) fn identity(&self) -> Result<(u64, u64)> {
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// A JSON record cut short at the end of the file (a crash or power loss before it was
    /// synced: the counts it held were never removed) is cut off; returns the bytes removed.
    /// Anything else not ending in a newline is left as it is.
    pub(crate) fn cut_torn_record(&self) -> Result<u64> {
        let len = self.len()?;
        if len == 0 {
            return Ok(0);
        }
        let last_line = last_line_start(&self.file, len)?;
        if last_line == len {
            return Ok(0);
        }
        let mut head = [0u8; 8];
        let n = std::os::unix::fs::FileExt::read_at(&self.file, &mut head, last_line)?;
        if !head[..n].starts_with(br#"{"time":"#) {
            return Ok(0);
        }
        self.file
            .set_len(last_line)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("cutting a torn record off {}", self.path.display()))?;
        Ok(len - last_line)
    }

    fn append(&mut self, render: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<Written> {
        let old_len = self.len()?;
        let mut hashing = Hashing::new(&self.file);
        let written = {
            let mut buffered = io::BufWriter::with_capacity(1 << 20, &mut hashing);
            render(&mut buffered).and_then(|()| buffered.flush())
        };
        match written {
            Ok(()) => Ok(hashing.written()),
            Err(e) => {
                self.cut_back(old_len);
                Err(e).with_context(|| format!("writing {}", self.path.display()))
            }
        }
    }

    fn sync(&mut self) -> Result<()> {
        let synced = fault::point("reset:fsync")
            .and_then(|()| self.file.sync_data())
            .and_then(|()| match self.created {
                true => sync_dir(&self.path),
                false => Ok(()),
            });
        synced.with_context(|| format!("syncing {}", self.path.display()))
    }

    /// Cuts the file back to `len` (best effort: recovery checks again).
    pub(crate) fn cut_back(&self, len: u64) {
        let _ = self.file.set_len(len).and_then(|()| self.file.sync_data());
    }
}

/// The offset just after the file's last newline (0 if it has none).
fn last_line_start(file: &File, len: u64) -> io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        let mut f = file;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// What recovery finds of an interrupted record in the file the journal names.
pub(crate) enum Found {
    /// The file holds the whole record at `at`: the reset committed.
    Whole,
    /// Part of it or nothing; the file was cut back to where the record began.
    CutBack(u64),
    /// The file is gone: so is whatever it held of the record.
    Gone,
}

/// Looks for the record (`whole`: its length and hash, when it was written whole) at offset `at`
/// of `path`, which must still be the file with `identity`; cuts off what there is of it unless it
/// is whole.
pub(crate) fn find(path: &Path, identity: (u64, u64), at: u64, whole: Option<Written>) -> Result<Found> {
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Gone),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let m = file.metadata()?;
    if (m.dev(), m.ino()) != identity {
        anyhow::bail!(
            "{} is not the file the reset wrote to any more (it was replaced or rotated): its record may be in the \
             old file",
            path.display()
        );
    }
    let size = m.len();
    if size < at {
        anyhow::bail!(
            "{} is shorter ({size} bytes) than before the reset wrote to it ({at}): something else changed it",
            path.display()
        );
    }
    if let Some(Written { len, hash: hash_of }) = whole {
        if size >= at + len {
            let mut bytes = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, at)?;
            if hash(&bytes) == hash_of {
                file.sync_data()?;
                return Ok(Found::Whole);
            }
        }
        if size > at + len {
            anyhow::bail!(
                "{} has {} bytes after where the reset's record began, and they are not its record: something else \
                 wrote to it",
                path.display(),
                size - at
            );
        }
    }
    file.set_len(at)
        .and_then(|()| file.sync_data())
        .with_context(|| format!("cutting {} back to {at} bytes", path.display()))?;
    Ok(Found::CutBack(size - at))
}
