//! One agent per state dir (DESIGN.md §4): `<state_dir>/lock`, held with
//! `flock` for the agent's lifetime and holding its pid. A second agent on
//! the same state dir (another config, another socket) would fight the
//! first over every file; it exits 2 instead, naming the first one's pid.
//! The kernel drops the lock when the holder dies, so a crash never leaves
//! a stale lock behind.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Why the lock could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another agent runs on this state dir: exit 2, nothing touched.
    #[error(
        "another keysync agent (pid {pid}) is running on state_dir {}; only one agent may use a state dir",
        dir.display()
    )]
    Held { dir: PathBuf, pid: String },
    #[error("cannot lock state_dir {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct StateLock {
    _file: Flock<File>,
}

/// Takes the lock of `state_dir` (which must exist), or says who has it.
pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
    let path = state_dir.join("lock");
    let io = |source| LockError::Io {
        dir: state_dir.to_path_buf(),
        source,
    };
    // The lock is held through a read-only descriptor: a descriptor open
    // for writing for the agent's lifetime would keep the state dir's file
    // system from being remounted read-only. The pid is written through a
    // short-lived one once the lock is ours.
    let open = |write: bool| {
        std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .create(write)
            .truncate(write)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&path)
    };
    if !path.exists() {
        drop(open(true).map_err(io)?);
    }
    let file = match Flock::lock(open(false).map_err(io)?, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::Held {
                dir: state_dir.to_path_buf(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.to_string()
                },
            });
        }
        Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
    };
    // Ours now: record who holds it.
    let mut record = open(true).map_err(io)?;
    writeln!(record, "{}", std::process::id()).map_err(io)?;
    Ok(StateLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_told_the_first_ones_pid_and_the_lock_frees_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path()).unwrap();
        // flock locks belong to the open file: a second open in this
        // process conflicts like another process would.
        let err = acquire(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        assert!(acquire(dir.path()).is_ok());
    }
}
