//! The file once located: what was read of it, and replacing or removing it
//! only while it is still what was read (the identity check before the
//! rename, and the retries when another writer got in between).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::libc;
use nix::sys::stat::{self, FileStat, Mode, SFlag};
use nix::unistd::{self, UnlinkatFlags};
use tracing::{debug, warn};

use super::temp::TempFile;
use super::*;

/// The identity of a file as seen by fstat: if any of it differs, someone
/// replaced or modified the file. ctime is included on top of DESIGN's
/// (dev, ino, size, mtime) because it also catches writers that restore mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ident {
    pub(super) dev: libc::dev_t,
    pub(super) ino: libc::ino_t,
    pub(super) size: libc::off_t,
    pub(super) mtime: (libc::time_t, libc::c_long),
    pub(super) ctime: (libc::time_t, libc::c_long),
}

impl Ident {
    pub(super) fn of(st: &FileStat) -> Self {
        Ident {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// The file to manage, once located: its directory (the destination's, when a
/// root-owned link was followed), its name there, and what was read.
pub(super) struct Target {
    pub(super) dir: OwnedFd,
    pub(super) name: OsString,
    pub(super) path: PathBuf,
    pub(super) current: Option<Vec<u8>>,
    /// None: the file was absent.
    pub(super) ident: Option<Ident>,
}

impl Writer<'_> {
    /// Reads the file `name` in `dir`. `hops` counts the root-owned links followed
    /// to get here; what a link leads to must pass sshd's rule.
    pub(super) fn read_target(
        &self,
        dir: OwnedFd,
        name: OsString,
        path: PathBuf,
        hops: u32,
    ) -> Result<Target, WriteError> {
        for _ in 0..=MAX_RETRIES {
            // lstat first, so a device or FIFO is never even opened.
            let st = match lstat_at(&dir, &name) {
                Ok(st) => st,
                Err(Errno::ENOENT) => {
                    return Ok(Target {
                        dir,
                        name,
                        path,
                        current: None,
                        ident: None,
                    });
                }
                Err(e) => return Err(io_err(&path, "stat", e)),
            };
            match file_type(&st) {
                SFlag::S_IFREG => {}
                SFlag::S_IFLNK => match self.follow_file_link(&dir, &name, &path, hops)? {
                    Some(target) => return Ok(target),
                    None => continue,
                },
                _ => return Err(not_regular(&path)),
            }
            let flags = OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC;
            let mut file = match fcntl::openat(
                Some(dir.as_raw_fd()),
                name.as_os_str(),
                flags,
                Mode::empty(),
            ) {
                Ok(fd) => File::from(own(fd)),
                // Replaced between the lstat and the open: look again.
                Err(Errno::ENOENT | Errno::ELOOP) => continue,
                Err(e) => return Err(io_err(&path, "open", e)),
            };
            let before = stat::fstat(file.as_raw_fd()).map_err(|e| io_err(&path, "stat", e))?;
            if file_type(&before) != SFlag::S_IFREG {
                return Err(not_regular(&path));
            }
            if hops > 0 {
                self.check_sshd_rule(&before, &path)?;
            }
            let size = u64::try_from(before.st_size).unwrap_or(0);
            if size > MAX_FILE_SIZE {
                warn!(path = %path.display(), size, "file too large; not reading it");
                return Err(WriteError::TooLarge { path, size });
            }
            let mut bytes = Vec::with_capacity(size as usize);
            (&mut file)
                .take(MAX_FILE_SIZE + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| io_err_std(&path, "read", e))?;
            if bytes.len() as u64 > MAX_FILE_SIZE {
                let size = bytes.len() as u64;
                warn!(path = %path.display(), size, "file too large; not reading it");
                return Err(WriteError::TooLarge { path, size });
            }
            let after = stat::fstat(file.as_raw_fd()).map_err(|e| io_err(&path, "stat", e))?;
            if Ident::of(&before) != Ident::of(&after) {
                // Written to while we read it: the bytes may be a mix.
                continue;
            }
            return Ok(Target {
                dir,
                name,
                path,
                current: Some(bytes),
                ident: Some(Ident::of(&after)),
            });
        }
        Err(self.raced())
    }

    /// A symlink at the file: follow it only when root owns it; the file it
    /// leads to (and the directory, when reached through another path) must
    /// pass sshd's rule. None: it is no longer a link.
    pub(super) fn follow_file_link(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        path: &Path,
        hops: u32,
    ) -> Result<Option<Target>, WriteError> {
        let Some(text) = self.root_link_text(dir, name, path)? else {
            return Ok(None);
        };
        if hops >= MAX_LINK_HOPS {
            return Err(io_err(path, "follow symlinks", Errno::ELOOP));
        }
        let bytes = text.as_os_str().as_bytes();
        let (dest_dir, dest_name, dest_path) = match bytes.iter().rposition(|&b| b == b'/') {
            None => {
                let dup = dir
                    .try_clone()
                    .map_err(|e| io_err_std(path, "duplicate descriptor of", e))?;
                let dest = path.with_file_name(&text);
                (dup, OsStr::from_bytes(bytes).to_owned(), dest)
            }
            Some(i) => {
                let dir_text = OsStr::from_bytes(if i == 0 { b"/" } else { &bytes[..i] });
                let dir_path = match path.parent() {
                    Some(parent) => parent.join(dir_text),
                    None => PathBuf::from(dir_text),
                };
                let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
                let fd = match fcntl::openat(Some(dir.as_raw_fd()), dir_text, flags, Mode::empty())
                {
                    Ok(fd) => own(fd),
                    Err(Errno::ENOTDIR) => {
                        return Err(WriteError::NotADirectory { path: dir_path });
                    }
                    Err(e) => {
                        return Err(io_err(
                            &dir_path,
                            "open the directory a symlink leads to",
                            e,
                        ));
                    }
                };
                let st = stat::fstat(fd.as_raw_fd()).map_err(|e| io_err(&dir_path, "stat", e))?;
                self.check_sshd_rule(&st, &dir_path)?;
                let dest_name = OsStr::from_bytes(&bytes[i + 1..]).to_owned();
                let dest_path = dir_path.join(&dest_name);
                (fd, dest_name, dest_path)
            }
        };
        if matches!(dest_name.as_bytes(), b"" | b"." | b"..") {
            return Err(not_regular(&dest_path));
        }
        debug!(path = %path.display(), target = %dest_path.display(), "following root-owned symlink at the file");
        self.read_target(dest_dir, dest_name, dest_path, hops + 1)
            .map(Some)
    }

    /// Writes `bytes` to a temp file and renames it over the target, unless the
    /// target changed since it was read (then None: read again).
    pub(super) fn replace(
        &self,
        target: &Target,
        bytes: &[u8],
        before_rename: &mut dyn FnMut(),
    ) -> Result<Option<Outcome>, WriteError> {
        let temp = self.as_user(|| {
            remove_stale_temps(&target.dir, &target.path);
            let (temp, mut file) = TempFile::create(
                &target.dir,
                &target.path,
                self.spec.file_mode,
                self.act_as(),
            )?;
            let path = &temp.path;
            file.write_all(bytes)
                .map_err(|e| io_err_std(path, "write", e))?;
            self.fix_owner_and_mode(&file, self.spec.file_mode, path)?;
            file.sync_all().map_err(|e| io_err_std(path, "fsync", e))?;
            Ok(temp)
        })?;
        before_rename();
        self.as_user(|| {
            if !self.unchanged_since_read(target)? {
                return Ok(None);
            }
            fcntl::renameat(
                Some(target.dir.as_raw_fd()),
                temp.name.as_os_str(),
                Some(target.dir.as_raw_fd()),
                target.name.as_os_str(),
            )
            .map_err(|e| io_err(&target.path, "rename temporary file over", e))?;
            temp.renamed();
            unistd::fsync(target.dir.as_raw_fd())
                .map_err(|e| io_err(&target.path, "fsync the directory of", e))?;
            debug!(path = %target.path.display(), bytes = bytes.len(), "wrote file");
            Ok(Some(Outcome::Written))
        })
    }

    /// Removes the target, unless it changed since it was read (then None).
    pub(super) fn remove(
        &self,
        target: &Target,
        before_rename: &mut dyn FnMut(),
    ) -> Result<Option<Outcome>, WriteError> {
        before_rename();
        self.as_user(|| {
            if !self.unchanged_since_read(target)? {
                return Ok(None);
            }
            unistd::unlinkat(
                Some(target.dir.as_raw_fd()),
                target.name.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            )
            .map_err(|e| io_err(&target.path, "remove", e))?;
            unistd::fsync(target.dir.as_raw_fd())
                .map_err(|e| io_err(&target.path, "fsync the directory of", e))?;
            debug!(path = %target.path.display(), "removed file");
            Ok(Some(Outcome::Removed))
        })
    }

    /// Is the name still bound to the file that was read (or still absent)?
    /// Between this check and the rename a window of a few microseconds remains;
    /// a writer that hits it is caught by the directory watch and the next pass.
    pub(super) fn unchanged_since_read(&self, target: &Target) -> Result<bool, WriteError> {
        let now = match lstat_at(&target.dir, &target.name) {
            Ok(st) => Some(Ident::of(&st)),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(io_err(&target.path, "stat", e)),
        };
        Ok(now == target.ident)
    }

    /// chown (as root, when an owner is set) then chmod: chown can clear mode
    /// bits, and chmod makes the mode exact whatever the umask.
    pub(super) fn fix_owner_and_mode(
        &self,
        fd: &impl AsRawFd,
        mode: u32,
        path: &Path,
    ) -> Result<(), WriteError> {
        if let (true, Some((uid, gid))) = (self.root, self.spec.owner) {
            unistd::fchown(fd.as_raw_fd(), Some(uid), Some(gid))
                .map_err(|e| io_err(path, "chown", e))?;
        }
        stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode & 0o7777))
            .map_err(|e| io_err(path, "chmod", e))
    }

    pub(super) fn raced(&self) -> WriteError {
        warn!(path = %self.spec.path.display(), "kept changing while being read; giving up for now");
        WriteError::Raced {
            path: self.spec.path.clone(),
        }
    }
}
