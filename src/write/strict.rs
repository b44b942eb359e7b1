//! sshd's StrictModes rule, checked on what the writer manages (DESIGN.md
//! §4): sshd ignores an `authorized_keys` whose file, or any directory from
//! the home down to it, is group- or world-writable or owned by someone other
//! than the user or root. The agent writes such a file anyway (a removal
//! must land whatever sshd thinks of the modes) but reports the user as not
//! ready, with the reason, instead of claiming its keys work.

use std::os::fd::AsRawFd;

use nix::fcntl::{self, AtFlags, OFlag};
use nix::sys::stat::{self, FileStat, Mode, SFlag};

use super::Writer;
use super::*;

/// Why sshd's StrictModes would refuse the file `spec` names, walking as
/// [`apply`] does (as the user, no user's symlink followed); None when it
/// would accept it, or when there is nothing (yet) to judge.
pub fn strict_modes_problem(spec: &FileSpec) -> Option<String> {
    let (uid, _) = spec.owner?;
    let writer = Writer::new(spec).ok()?;
    let judge = |st: &FileStat, path: &Path| -> Option<String> {
        let mode = st.st_mode & 0o7777;
        if st.st_uid != 0 && st.st_uid != uid.as_raw() {
            Some(format!(
                "{} is owned by uid {}, not by the user or root: sshd's StrictModes refuses the keys",
                path.display(),
                st.st_uid
            ))
        } else if mode & 0o022 != 0 {
            Some(format!(
                "{} is group- or world-writable (mode {mode:o}): sshd's StrictModes refuses the keys",
                path.display()
            ))
        } else {
            None
        }
    };
    writer
        .as_user(|| {
            let mut path = spec.base.clone();
            let base_st =
                stat::fstat(writer.base_fd.as_raw_fd()).map_err(|e| io_err(&path, "stat", e))?;
            if let Some(why) = judge(&base_st, &path) {
                return Ok(Some(why));
            }
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let mut dir = writer
                .base_fd
                .try_clone()
                .map_err(|e| io_err_std(&path, "duplicate descriptor of", e))?;
            for name in &writer.dirs {
                path.push(name);
                // A missing directory, or a root-owned link the writer
                // follows: nothing this check can judge.
                let Ok(fd) = fcntl::openat(
                    Some(dir.as_raw_fd()),
                    name.as_os_str(),
                    flags,
                    Mode::empty(),
                ) else {
                    return Ok(None);
                };
                dir = own(fd);
                let st = stat::fstat(dir.as_raw_fd()).map_err(|e| io_err(&path, "stat", e))?;
                if let Some(why) = judge(&st, &path) {
                    return Ok(Some(why));
                }
            }
            path.push(&writer.name);
            match stat::fstatat(
                Some(dir.as_raw_fd()),
                writer.name.as_os_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) if file_type(&st) == SFlag::S_IFREG => Ok(judge(&st, &path)),
                _ => Ok(None),
            }
        })
        .ok()
        .flatten()
}
