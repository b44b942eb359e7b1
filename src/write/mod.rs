//! The atomic, symlink-safe writer: the only code in keysync that touches users'
//! homes (and the per-user cache files in the state dir).
//!
//! [`apply`] makes one file equal to what a caller-supplied function wants, given
//! what is on disk now. The protocol is DESIGN.md §4: read the current file and
//! remember its identity (device, inode, size, mtime and ctime); write the new
//! bytes to a `.keysync.<random>` file in the same directory, `fchown`/`fchmod`
//! it, `fsync` it; check that the target is still the file that was read (if not,
//! read it again and ask again, a few times); `renameat` within the same
//! directory fd; `fsync` the directory. Identical bytes write nothing.
//!
//! Everything below the trusted `base` directory is reached through directory
//! file descriptors, one component at a time, with `O_NOFOLLOW`, so a user who
//! controls their home cannot redirect the writer with a symlink. For a non-root
//! user's home the operations below `base` run with that user's fsuid/fsgid, so
//! the kernel refuses whatever the user could not do themselves.
//!
//! Symlinks: a link that is not owned by root (at a directory component or at
//! the file) is never followed, read or replaced: the call fails with
//! [`WriteError::SymlinkRefused`]. A root-owned link was put there by root, so it
//! is followed (its text is read through an `O_PATH` descriptor of the verified
//! link itself, so a swapped-in user link is never used), and what it leads to
//! must pass sshd's StrictModes rule: owned by root or by the user, and not
//! group- or world-writable. A root-owned link *at the file* is kept: the new
//! content is written atomically at the link's destination (temp file and rename
//! in the destination's directory), and a removal removes the destination,
//! leaving the link dangling. This keeps the setups where root's keys live
//! elsewhere working, and root's link stays the single source of where they are.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{self, FileStat, SFlag};
use nix::unistd::{Gid, Uid};
use tracing::{debug, warn};

mod ids;
mod strict;
mod target;
mod temp;
#[cfg(test)]
mod tests;
mod walk;

pub(crate) use ids::as_user;
pub use strict::strict_modes_problem;
use temp::remove_stale_temps;

/// One call's view of its spec. `walk.rs` finds the file below `base`
/// (`Writer::new`, `locate`); `target.rs` reads, replaces and removes it.
struct Writer<'a> {
    spec: &'a FileSpec,
    /// Directories between base and the file.
    dirs: Vec<OsString>,
    name: OsString,
    /// `base`, opened as the process (root controls the path to it).
    base_fd: OwnedFd,
    /// euid 0: chown and fsuid switching are possible.
    root: bool,
}

/// Files larger than this are refused instead of read (authorized_keys files
/// are kilobytes; 10,000 keys are about 1 MiB).
pub const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

/// How many times the target may change under the writer before it gives up.
pub(super) const MAX_RETRIES: u32 = 5;

/// How many root-owned links in a row are followed at the file.
pub(super) const MAX_LINK_HOPS: u32 = 8;

/// Prefix of the temporary files; leftovers with it are removed before a write.
pub(super) const TEMP_PREFIX: &[u8] = b".keysync.";

/// What one call makes true on disk.
#[derive(Debug, Clone)]
pub struct FileSpec {
    /// Absolute path of the file to manage, e.g. /home/alice/.ssh/authorized_keys.
    pub path: PathBuf,
    /// A trusted directory that is an ancestor of `path` (the user's home, or the state dir).
    /// `base` itself is opened following symlinks (root controls the path to it);
    /// every component between `base` and the file is opened with O_NOFOLLOW|O_DIRECTORY.
    pub base: PathBuf,
    /// Owner for created directories and the written file (chown only when the process
    /// euid is 0; otherwise left as is).
    pub owner: Option<(Uid, Gid)>,
    /// When Some: all operations below `base` (open, create, read, write, rename, unlink)
    /// run with setfsuid/setfsgid set to this user (and restored afterwards, also on
    /// error or panic), so the kernel refuses what that user could not do. Used for
    /// non-root users' homes. Only effective when euid is 0.
    pub act_as: Option<(Uid, Gid)>,
    /// Mode of the written file (0o600 for authorized_keys, 0o640 for the cache).
    pub file_mode: u32,
    /// Mode of directories created between base and the file (0o700). Missing
    /// directories are created.
    pub dir_mode: u32,
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The file already had the wanted bytes (or was absent and should be); nothing was touched.
    Unchanged,
    /// The file was replaced (or created) atomically.
    Written,
    /// The file was removed.
    Removed,
}

/// Why a file could not be made right. For every variant the agent does the
/// same: that user (or cache file) is reported failed in status, nothing was
/// written for it, no temporary file is left behind, and the other users go
/// on; the next pass (or the directory watch) tries again.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A symlink not owned by root sits where a directory or the file should be.
    /// A user could have planted it, so it was not followed, read or replaced.
    /// The agent reports the user failed and keeps refusing until someone fixes it.
    #[error("refusing to follow {}: a symlink not owned by root", path.display())]
    SymlinkRefused { path: PathBuf },
    /// Something other than a directory (or a root-owned link to one) sits where a
    /// directory is needed. Reported; nothing is created in its place.
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    /// The target is a FIFO, directory, socket or device. It is neither read nor
    /// replaced; reported until someone removes it.
    #[error("{} is not a regular file", path.display())]
    NotARegularFile { path: PathBuf },
    /// A root-owned link was followed, but what it leads to fails sshd's
    /// StrictModes rule (owned by root or the user, not group/world writable),
    /// so sshd would not use it either. Reported; nothing written.
    #[error("{}: {why}", path.display())]
    BadPermissions { path: PathBuf, why: String },
    /// The current file is larger than [`MAX_FILE_SIZE`]; it is not read (nor
    /// rewritten). Reported; nothing written.
    #[error("{} is {size} bytes, over the {MAX_FILE_SIZE}-byte limit", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    /// A system call failed, often because the user (acting fsuid) may not do it,
    /// e.g. a root-owned `.ssh`. Reported; retried on the next pass.
    #[error("cannot {op} {}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The target kept changing between read and rename; gave up after
    /// re-reading it `MAX_RETRIES` (5) times. Retried on the next pass.
    #[error("{} kept changing while being written; gave up", path.display())]
    Raced { path: PathBuf },
    /// `path` is not strictly below `base` through plain names (no `..`), or one
    /// of them is not absolute: a bug or a bad config, nothing is touched.
    #[error("{} is not a file below {}", path.display(), base.display())]
    PathOutsideBase { path: PathBuf, base: PathBuf },
}

/// Make the file at `spec.path` equal to `desired(current)`.
///
/// `desired` gets the current bytes (None if the file does not exist) and returns
/// the wanted bytes, or None when the file should not exist (then an existing file
/// is removed; an absent one stays absent, and no directory is created for it).
/// Nothing is written when the bytes are identical (no mtime change). `desired`
/// may be called more than once (after a concurrent change it is asked again with
/// the new content); it runs with the thread's normal credentials.
// The closure type is spelled out: it is the contract the rest of the daemon calls.
#[allow(clippy::type_complexity)]
pub fn apply(
    spec: &FileSpec,
    desired: &mut dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
) -> Result<Outcome, WriteError> {
    apply_with_hook(spec, desired, &mut || {})
}

/// [`apply`] with a test seam: `before_rename` runs after the temporary file is
/// fully written and fsynced (or, for a removal, right before the check that
/// precedes the unlink) and before the target is checked again and replaced.
/// Tests use it to change the target at the worst moment. It runs with the
/// thread's normal credentials.
#[allow(clippy::type_complexity)]
pub fn apply_with_hook(
    spec: &FileSpec,
    desired: &mut dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    before_rename: &mut dyn FnMut(),
) -> Result<Outcome, WriteError> {
    let writer = Writer::new(spec)?;
    for attempt in 0..=MAX_RETRIES {
        if attempt > 0 {
            debug!(path = %spec.path.display(), attempt, "target changed under the writer; reading it again");
        }
        // Without creating anything: an absent file that should stay absent
        // leaves no trace (not even a `.ssh` directory).
        let found = writer.as_user(|| writer.locate(false))?;
        let current = found.as_ref().and_then(|t| t.current.as_deref());
        let want = desired(current);
        if want.as_deref() == current {
            debug!(path = %spec.path.display(), "unchanged");
            return Ok(Outcome::Unchanged);
        }
        let done = match (want, found) {
            (None, Some(target)) => writer.remove(&target, before_rename)?,
            (Some(bytes), found) => {
                let target = match found {
                    Some(target) => target,
                    None => match writer.as_user(|| writer.locate(true))? {
                        // Created the missing directories; the file is still absent.
                        Some(target) if target.current.is_none() => target,
                        // Someone created it meanwhile: read and ask again.
                        _ => continue,
                    },
                };
                writer.replace(&target, &bytes, before_rename)?
            }
            // want None and nothing found: equal to current (None), returned above.
            (None, None) => Some(Outcome::Unchanged),
        };
        if let Some(outcome) = done {
            return Ok(outcome);
        }
    }
    warn!(path = %spec.path.display(), retries = MAX_RETRIES, "target kept changing; giving up for now");
    Err(WriteError::Raced {
        path: spec.path.clone(),
    })
}

/// Removes `.keysync.*` leftovers of a crash (a kill between creating a
/// temporary file and renaming it) beside `spec.path`, reaching the directory
/// as [`apply`] does: no user's symlink followed, acting as the user. A write
/// cleans up too, but the next one may be long in coming when the content is
/// already right. A missing directory is not an error; nothing is created.
pub fn remove_leftovers(spec: &FileSpec) -> Result<(), WriteError> {
    let writer = Writer::new(spec)?;
    writer.as_user(|| {
        if let Some((dir, path)) = writer.locate_dir(false)? {
            remove_stale_temps(&dir, &path.join(&writer.name));
        }
        Ok(())
    })
}

/// Splits `spec.path` into the directory names below `spec.base` and the file name.
pub(super) fn split_below_base(spec: &FileSpec) -> Result<(Vec<OsString>, OsString), WriteError> {
    let outside = || WriteError::PathOutsideBase {
        path: spec.path.clone(),
        base: spec.base.clone(),
    };
    if !spec.path.is_absolute() || !spec.base.is_absolute() {
        return Err(outside());
    }
    let rest = spec.path.strip_prefix(&spec.base).map_err(|_| outside())?;
    let mut names = Vec::new();
    for component in rest.components() {
        match component {
            Component::Normal(name) => names.push(name.to_owned()),
            _ => return Err(outside()),
        }
    }
    let name = names.pop().ok_or_else(outside)?;
    Ok((names, name))
}

pub(super) fn lstat_at(dir: &OwnedFd, name: &OsStr) -> nix::Result<FileStat> {
    stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

pub(super) fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

pub(super) fn not_regular(path: &Path) -> WriteError {
    warn!(path = %path.display(), "not a regular file; refusing");
    WriteError::NotARegularFile {
        path: path.to_owned(),
    }
}

/// Takes ownership of a descriptor nix just returned.
pub(super) fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open/openat; nothing else
    // owns it, so this is its only owner and closes it exactly once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

pub(super) fn io_err(path: &Path, op: &'static str, errno: Errno) -> WriteError {
    io_err_std(path, op, io::Error::from(errno))
}

pub(super) fn io_err_std(path: &Path, op: &'static str, source: io::Error) -> WriteError {
    WriteError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}
