//! Temporary files: the `.keysync.*` file being written, and the cleanup
//! of leftovers a crash left beside a target.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{self, UnlinkatFlags};
use tracing::{info, warn};

use super::ids::FsIds;
use super::*;

/// Temp names this process is writing right now: stale-file cleanup in one
/// directory must not delete another thread's file in flight there (the state
/// dir holds every user's cache). Leftovers of a crash are not in it.
pub(super) static IN_FLIGHT: Mutex<BTreeSet<Vec<u8>>> = Mutex::new(BTreeSet::new());

pub(super) fn in_flight() -> std::sync::MutexGuard<'static, BTreeSet<Vec<u8>>> {
    // The set stays consistent even if a holder panicked (single insert/remove).
    IN_FLIGHT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A `.keysync.*` file being written; unlinked on drop unless renamed.
pub(super) struct TempFile<'w> {
    /// The user the writer acts as below its base, if any.
    pub(super) act_as: Option<(Uid, Gid)>,
    pub(super) dir: &'w OwnedFd,
    pub(super) name: OsString,
    pub(super) path: PathBuf,
    pub(super) exists: std::cell::Cell<bool>,
}

impl<'w> TempFile<'w> {
    pub(super) fn create(
        dir: &'w OwnedFd,
        target_path: &Path,
        file_mode: u32,
        act_as: Option<(Uid, Gid)>,
    ) -> Result<(Self, File), WriteError> {
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
        let mode = Mode::from_bits_truncate(file_mode & 0o777);
        for _ in 0..8 {
            let random: String = std::iter::repeat_with(fastrand::alphanumeric)
                .take(12)
                .collect();
            let mut name = OsString::from(OsStr::from_bytes(TEMP_PREFIX));
            name.push(&random);
            // Registered before it exists, so a concurrent cleanup never sees it unregistered.
            in_flight().insert(name.as_bytes().to_vec());
            let temp = TempFile {
                act_as,
                dir,
                path: target_path.with_file_name(&name),
                name,
                exists: std::cell::Cell::new(false),
            };
            match fcntl::openat(
                Some(temp.dir.as_raw_fd()),
                temp.name.as_os_str(),
                flags,
                mode,
            ) {
                Ok(fd) => {
                    temp.exists.set(true);
                    return Ok((temp, File::from(own(fd))));
                }
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(io_err(target_path, "create a temporary file beside", e)),
            }
        }
        Err(io_err(
            target_path,
            "create a temporary file beside",
            Errno::EEXIST,
        ))
    }

    /// The name is gone (renamed over the target): nothing to clean up.
    pub(super) fn renamed(&self) {
        self.exists.set(false);
    }
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if self.exists.get() {
            // As the acting user, like every operation below base; on failure to
            // switch, still remove our own file.
            let _ids = self
                .act_as
                .and_then(|(uid, gid)| FsIds::switch(uid, gid, &self.path).ok());
            match unistd::unlinkat(
                Some(self.dir.as_raw_fd()),
                self.name.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "cannot remove temporary file")
                }
            }
        }
        in_flight().remove(self.name.as_bytes());
    }
}

/// Removes regular files named `.keysync.*` in `dir` that no thread of this
/// process is writing: leftovers of a crash. Best effort: a failure is logged,
/// the write goes on (sshd ignores these names anyway).
pub(super) fn remove_stale_temps(dir: &OwnedFd, target_path: &Path) {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let stale: Vec<OsString> = {
        let mut listing = match Dir::openat(Some(dir.as_raw_fd()), ".", flags, Mode::empty()) {
            Ok(listing) => listing,
            Err(e) => {
                warn!(path = %target_path.display(), error = %e, "cannot list directory for stale temporary files");
                return;
            }
        };
        let busy = in_flight();
        listing
            .iter()
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_bytes().to_vec())
            .filter(|name| name.starts_with(TEMP_PREFIX) && !busy.contains(name))
            .map(|name| OsStr::from_bytes(&name).to_owned())
            .collect()
    };
    for name in stale {
        let path = target_path.with_file_name(&name);
        match lstat_at(dir, &name) {
            Ok(st) if file_type(&st) == SFlag::S_IFREG => {}
            _ => continue,
        }
        match unistd::unlinkat(
            Some(dir.as_raw_fd()),
            name.as_os_str(),
            UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) => info!(path = %path.display(), "removed stale temporary file"),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot remove stale temporary file")
            }
        }
    }
}
