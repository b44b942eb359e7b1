//! Acting as a user: the thread's fsuid/fsgid, switched for the
//! operations inside a non-root home and restored on drop.

use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{self, Gid, Uid};

use super::*;

/// Switches the calling thread's fsuid/fsgid and restores the previous ones on
/// drop (also when unwinding). setfsuid/setfsgid are per thread, so other
/// threads keep root's; the writer must not move threads while one is alive
/// (it never holds one across a call to the caller's code).
pub(super) struct FsIds {
    pub(super) prev_uid: Uid,
    pub(super) prev_gid: Gid,
}

impl FsIds {
    /// gid first: once the fsuid is not 0, the fs capabilities are gone.
    pub(super) fn switch(uid: Uid, gid: Gid, path: &Path) -> Result<Self, WriteError> {
        let prev_gid = unistd::setfsgid(gid);
        let prev_uid = unistd::setfsuid(uid);
        let ids = FsIds { prev_uid, prev_gid };
        // The calls report no error; ask for the current values to be sure we
        // do not go on as root.
        if current_fsuid() != uid || current_fsgid() != gid {
            return Err(io_err(
                path,
                "switch to the user's filesystem ids for",
                Errno::EPERM,
            ));
        }
        Ok(ids)
    }
}

impl Drop for FsIds {
    /// uid first: restoring fsuid 0 brings back the right to set any fsgid.
    fn drop(&mut self) {
        unistd::setfsuid(self.prev_uid);
        unistd::setfsgid(self.prev_gid);
    }
}

/// The current fsuid: an invalid id (-1) changes nothing and returns it.
pub(super) fn current_fsuid() -> Uid {
    unistd::setfsuid(Uid::from_raw(u32::MAX))
}

pub(super) fn current_fsgid() -> Gid {
    unistd::setfsgid(Gid::from_raw(u32::MAX))
}

/// Runs `f` on this thread with `uid`/`gid` as its filesystem ids (when the
/// process is root; otherwise as it is), for work outside the writer that
/// must see a home as its user does, such as adding a directory watch.
pub(crate) fn as_user<T>(
    uid: Uid,
    gid: Gid,
    path: &Path,
    f: impl FnOnce() -> T,
) -> Result<T, WriteError> {
    let _ids = if unistd::geteuid().is_root() {
        Some(FsIds::switch(uid, gid, path)?)
    } else {
        None
    };
    Ok(f())
}
