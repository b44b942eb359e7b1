//! Locating one file: the directory walk by descriptor from the user's home,
//! the root-owned links followed on the way, and sshd's ownership rule for
//! each step (the protocol in the module docs of `write`; what is done with
//! the file once found is in `target`).

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::{self, FileStat, Mode, SFlag};
use nix::unistd::{self, Gid, Uid};
use tracing::{debug, warn};

use super::ids::FsIds;
use super::target::Target;
use super::*;

impl<'a> Writer<'a> {
    pub(super) fn new(spec: &'a FileSpec) -> Result<Self, WriteError> {
        let (dirs, name) = split_below_base(spec)?;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let root = unistd::geteuid().is_root();
        // A user's home is often 0700: open it as that user, so a hardened
        // service without CAP_DAC_READ_SEARCH can still reach it.
        let _ids = match spec.act_as.filter(|_| root) {
            Some((uid, gid)) => Some(FsIds::switch(uid, gid, &spec.path)?),
            None => None,
        };
        let base_fd = match fcntl::open(&spec.base, flags, Mode::empty()) {
            Ok(fd) => own(fd),
            Err(Errno::ENOTDIR) => {
                return Err(WriteError::NotADirectory {
                    path: spec.base.clone(),
                });
            }
            Err(e) => return Err(io_err(&spec.base, "open base directory", e)),
        };
        Ok(Writer {
            spec,
            dirs,
            name,
            base_fd,
            root,
        })
    }

    /// Runs `f` with the acting user's fsuid/fsgid (when there is one and we are root).
    pub(super) fn as_user<T>(
        &self,
        f: impl FnOnce() -> Result<T, WriteError>,
    ) -> Result<T, WriteError> {
        let _ids = match self.act_as() {
            Some((uid, gid)) => Some(FsIds::switch(uid, gid, &self.spec.path)?),
            None => None,
        };
        f()
    }

    pub(super) fn act_as(&self) -> Option<(Uid, Gid)> {
        self.spec.act_as.filter(|_| self.root)
    }

    /// Besides root, the uid that may own what a root-owned link leads to.
    pub(super) fn user_uid(&self) -> Option<Uid> {
        self.spec.owner.or(self.spec.act_as).map(|(uid, _)| uid)
    }

    /// Walks to the file's directory and reads the file. None: a directory is
    /// missing and `create` is false.
    pub(super) fn locate(&self, create: bool) -> Result<Option<Target>, WriteError> {
        let Some((dir, path)) = self.locate_dir(create)? else {
            return Ok(None);
        };
        let path = path.join(&self.name);
        self.read_target(dir, self.name.clone(), path, 0).map(Some)
    }

    /// Walks to the file's directory. None: a directory is missing and
    /// `create` is false.
    pub(super) fn locate_dir(
        &self,
        create: bool,
    ) -> Result<Option<(OwnedFd, PathBuf)>, WriteError> {
        let mut dir = self
            .base_fd
            .try_clone()
            .map_err(|e| io_err_std(&self.spec.base, "duplicate descriptor of", e))?;
        let mut path = self.spec.base.clone();
        for name in &self.dirs {
            path.push(name);
            match self.open_dir(&dir, name, &path, create)? {
                Some(next) => dir = next,
                None => return Ok(None),
            }
        }
        Ok(Some((dir, path)))
    }

    /// Opens the directory `name` in `parent` without following a user's symlink;
    /// creates it when missing and `create` is set.
    pub(super) fn open_dir(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
        create: bool,
    ) -> Result<Option<OwnedFd>, WriteError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut created = false;
        for _ in 0..=MAX_RETRIES {
            match fcntl::openat(Some(parent.as_raw_fd()), name, flags, Mode::empty()) {
                Ok(fd) => {
                    let fd = own(fd);
                    if created {
                        self.fix_owner_and_mode(&fd, self.spec.dir_mode, path)?;
                        debug!(path = %path.display(), mode = format_args!("{:o}", self.spec.dir_mode), "created directory");
                    }
                    return Ok(Some(fd));
                }
                Err(Errno::ENOENT) if !create => return Ok(None),
                Err(Errno::ENOENT) => {
                    let mode = Mode::from_bits_truncate(self.spec.dir_mode);
                    match stat::mkdirat(Some(parent.as_raw_fd()), name, mode) {
                        Ok(()) => created = true,
                        Err(Errno::EEXIST) => {}
                        Err(e) => return Err(io_err(path, "create directory", e)),
                    }
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let st = match lstat_at(parent, name) {
                        Ok(st) => st,
                        Err(Errno::ENOENT) => continue,
                        Err(e) => return Err(io_err(path, "stat", e)),
                    };
                    match file_type(&st) {
                        SFlag::S_IFLNK => match self.follow_dir_link(parent, name, path)? {
                            Some(fd) => return Ok(Some(fd)),
                            None => continue,
                        },
                        SFlag::S_IFDIR => continue,
                        _ => {
                            warn!(path = %path.display(), "not a directory; refusing");
                            return Err(WriteError::NotADirectory {
                                path: path.to_owned(),
                            });
                        }
                    }
                }
                Err(e) => return Err(io_err(path, "open directory", e)),
            }
        }
        Err(self.raced())
    }

    /// A symlink where a directory should be: follow it only when root owns it
    /// and what it leads to passes sshd's rule. None: it is no longer a link.
    pub(super) fn follow_dir_link(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
    ) -> Result<Option<OwnedFd>, WriteError> {
        let Some(text) = self.root_link_text(parent, name, path)? else {
            return Ok(None);
        };
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let fd = match fcntl::openat(
            Some(parent.as_raw_fd()),
            text.as_os_str(),
            flags,
            Mode::empty(),
        ) {
            Ok(fd) => own(fd),
            Err(Errno::ENOTDIR) => {
                warn!(path = %path.display(), "root-owned symlink does not lead to a directory");
                return Err(WriteError::NotADirectory {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(io_err(path, "open the directory a symlink leads to", e)),
        };
        let st = stat::fstat(fd.as_raw_fd()).map_err(|e| io_err(path, "stat", e))?;
        self.check_sshd_rule(&st, path)?;
        debug!(path = %path.display(), target = %text.display(), "following root-owned symlink");
        Ok(Some(fd))
    }

    /// Reads the link `name` through an `O_PATH` descriptor of the link itself,
    /// so the text read is that of the link whose owner was checked.
    /// None: `name` is no longer a symlink (raced; look again).
    pub(super) fn root_link_text(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
    ) -> Result<Option<PathBuf>, WriteError> {
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let link = match fcntl::openat(Some(parent.as_raw_fd()), name, flags, Mode::empty()) {
            Ok(fd) => own(fd),
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(io_err(path, "open symlink", e)),
        };
        let st = stat::fstat(link.as_raw_fd()).map_err(|e| io_err(path, "stat", e))?;
        if file_type(&st) != SFlag::S_IFLNK {
            return Ok(None);
        }
        if st.st_uid != 0 {
            warn!(path = %path.display(), uid = st.st_uid, "symlink not owned by root; refusing to follow it");
            return Err(WriteError::SymlinkRefused {
                path: path.to_owned(),
            });
        }
        let text = fcntl::readlinkat(Some(link.as_raw_fd()), "")
            .map_err(|e| io_err(path, "read symlink", e))?;
        Ok(Some(PathBuf::from(text)))
    }

    /// sshd's StrictModes rule, applied to whatever a root-owned link leads to.
    pub(super) fn check_sshd_rule(&self, st: &FileStat, path: &Path) -> Result<(), WriteError> {
        let owner_ok = st.st_uid == 0 || self.user_uid().is_some_and(|u| u.as_raw() == st.st_uid);
        let why = if !owner_ok {
            format!("owned by uid {}, neither root nor the user", st.st_uid)
        } else if st.st_mode & 0o022 != 0 {
            format!(
                "group- or world-writable (mode {:04o})",
                st.st_mode & 0o7777
            )
        } else {
            return Ok(());
        };
        warn!(path = %path.display(), why, "symlink destination fails sshd's rule; refusing");
        Err(WriteError::BadPermissions {
            path: path.to_owned(),
            why,
        })
    }
}
