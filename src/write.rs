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

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag};
use nix::libc;
use nix::sys::stat::{self, FileStat, Mode, SFlag};
use nix::unistd::{self, Gid, Uid, UnlinkatFlags};
use tracing::{debug, info, warn};

/// Files larger than this are refused instead of read (authorized_keys files
/// are kilobytes; 10,000 keys are about 1 MiB).
pub const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

/// How many times the target may change under the writer before it gives up.
const MAX_RETRIES: u32 = 5;

/// How many root-owned links in a row are followed at the file.
const MAX_LINK_HOPS: u32 = 8;

/// Prefix of the temporary files; leftovers with it are removed before a write.
const TEMP_PREFIX: &[u8] = b".keysync.";

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

/// The identity of a file as seen by fstat: if any of it differs, someone
/// replaced or modified the file. ctime is included on top of DESIGN's
/// (dev, ino, size, mtime) because it also catches writers that restore mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ident {
    dev: libc::dev_t,
    ino: libc::ino_t,
    size: libc::off_t,
    mtime: (libc::time_t, libc::c_long),
    ctime: (libc::time_t, libc::c_long),
}

impl Ident {
    fn of(st: &FileStat) -> Self {
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
struct Target {
    dir: OwnedFd,
    name: OsString,
    path: PathBuf,
    current: Option<Vec<u8>>,
    /// None: the file was absent.
    ident: Option<Ident>,
}

/// One call's view of its spec.
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

impl<'a> Writer<'a> {
    fn new(spec: &'a FileSpec) -> Result<Self, WriteError> {
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
    fn as_user<T>(&self, f: impl FnOnce() -> Result<T, WriteError>) -> Result<T, WriteError> {
        let _ids = match self.act_as() {
            Some((uid, gid)) => Some(FsIds::switch(uid, gid, &self.spec.path)?),
            None => None,
        };
        f()
    }

    fn act_as(&self) -> Option<(Uid, Gid)> {
        self.spec.act_as.filter(|_| self.root)
    }

    /// Besides root, the uid that may own what a root-owned link leads to.
    fn user_uid(&self) -> Option<Uid> {
        self.spec.owner.or(self.spec.act_as).map(|(uid, _)| uid)
    }

    /// Walks to the file's directory and reads the file. None: a directory is
    /// missing and `create` is false.
    fn locate(&self, create: bool) -> Result<Option<Target>, WriteError> {
        let Some((dir, path)) = self.locate_dir(create)? else {
            return Ok(None);
        };
        let path = path.join(&self.name);
        self.read_target(dir, self.name.clone(), path, 0).map(Some)
    }

    /// Walks to the file's directory. None: a directory is missing and
    /// `create` is false.
    fn locate_dir(&self, create: bool) -> Result<Option<(OwnedFd, PathBuf)>, WriteError> {
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
    fn open_dir(
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
    fn follow_dir_link(
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
    fn root_link_text(
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
    fn check_sshd_rule(&self, st: &FileStat, path: &Path) -> Result<(), WriteError> {
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

    /// Reads the file `name` in `dir`. `hops` counts the root-owned links followed
    /// to get here; what a link leads to must pass sshd's rule.
    fn read_target(
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
    fn follow_file_link(
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
    fn replace(
        &self,
        target: &Target,
        bytes: &[u8],
        before_rename: &mut dyn FnMut(),
    ) -> Result<Option<Outcome>, WriteError> {
        let temp = self.as_user(|| {
            remove_stale_temps(&target.dir, &target.path);
            let (temp, mut file) = TempFile::create(self, target)?;
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
    fn remove(
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
    fn unchanged_since_read(&self, target: &Target) -> Result<bool, WriteError> {
        let now = match lstat_at(&target.dir, &target.name) {
            Ok(st) => Some(Ident::of(&st)),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(io_err(&target.path, "stat", e)),
        };
        Ok(now == target.ident)
    }

    /// chown (as root, when an owner is set) then chmod: chown can clear mode
    /// bits, and chmod makes the mode exact whatever the umask.
    fn fix_owner_and_mode(
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

    fn raced(&self) -> WriteError {
        warn!(path = %self.spec.path.display(), "kept changing while being read; giving up for now");
        WriteError::Raced {
            path: self.spec.path.clone(),
        }
    }
}

/// Splits `spec.path` into the directory names below `spec.base` and the file name.
fn split_below_base(spec: &FileSpec) -> Result<(Vec<OsString>, OsString), WriteError> {
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

/// Switches the calling thread's fsuid/fsgid and restores the previous ones on
/// drop (also when unwinding). setfsuid/setfsgid are per thread, so other
/// threads keep root's; the writer must not move threads while one is alive
/// (it never holds one across a call to the caller's code).
struct FsIds {
    prev_uid: Uid,
    prev_gid: Gid,
}

impl FsIds {
    /// gid first: once the fsuid is not 0, the fs capabilities are gone.
    fn switch(uid: Uid, gid: Gid, path: &Path) -> Result<Self, WriteError> {
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
fn current_fsuid() -> Uid {
    unistd::setfsuid(Uid::from_raw(u32::MAX))
}

fn current_fsgid() -> Gid {
    unistd::setfsgid(Gid::from_raw(u32::MAX))
}

/// Temp names this process is writing right now: stale-file cleanup in one
/// directory must not delete another thread's file in flight there (the state
/// dir holds every user's cache). Leftovers of a crash are not in it.
static IN_FLIGHT: Mutex<BTreeSet<Vec<u8>>> = Mutex::new(BTreeSet::new());

fn in_flight() -> std::sync::MutexGuard<'static, BTreeSet<Vec<u8>>> {
    // The set stays consistent even if a holder panicked (single insert/remove).
    IN_FLIGHT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A `.keysync.*` file being written; unlinked on drop unless renamed.
struct TempFile<'w> {
    writer: &'w Writer<'w>,
    dir: &'w OwnedFd,
    name: OsString,
    path: PathBuf,
    exists: std::cell::Cell<bool>,
}

impl<'w> TempFile<'w> {
    fn create(writer: &'w Writer<'w>, target: &'w Target) -> Result<(Self, File), WriteError> {
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
        let mode = Mode::from_bits_truncate(writer.spec.file_mode & 0o777);
        for _ in 0..8 {
            let random: String = std::iter::repeat_with(fastrand::alphanumeric)
                .take(12)
                .collect();
            let mut name = OsString::from(OsStr::from_bytes(TEMP_PREFIX));
            name.push(&random);
            // Registered before it exists, so a concurrent cleanup never sees it unregistered.
            in_flight().insert(name.as_bytes().to_vec());
            let temp = TempFile {
                writer,
                dir: &target.dir,
                path: target.path.with_file_name(&name),
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
                Err(e) => return Err(io_err(&target.path, "create a temporary file beside", e)),
            }
        }
        Err(io_err(
            &target.path,
            "create a temporary file beside",
            Errno::EEXIST,
        ))
    }

    /// The name is gone (renamed over the target): nothing to clean up.
    fn renamed(&self) {
        self.exists.set(false);
    }
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if self.exists.get() {
            // As the acting user, like every operation below base; on failure to
            // switch, still remove our own file.
            let _ids = self
                .writer
                .act_as()
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
fn remove_stale_temps(dir: &OwnedFd, target_path: &Path) {
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

fn lstat_at(dir: &OwnedFd, name: &OsStr) -> nix::Result<FileStat> {
    stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn not_regular(path: &Path) -> WriteError {
    warn!(path = %path.display(), "not a regular file; refusing");
    WriteError::NotARegularFile {
        path: path.to_owned(),
    }
}

/// Takes ownership of a descriptor nix just returned.
fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open/openat; nothing else
    // owns it, so this is its only owner and closes it exactly once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn io_err(path: &Path, op: &'static str, errno: Errno) -> WriteError {
    io_err_std(path, op, io::Error::from(errno))
}

fn io_err_std(path: &Path, op: &'static str, source: io::Error) -> WriteError {
    WriteError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

#[cfg(test)]
mod tests {
    //! Real files, modes, owners and symlinks in temp dirs; these tests run as
    //! root (they chown, lchown and switch fsuid). The unprivileged user is a
    //! bare uid/gid: setfsuid and chown need no passwd entry.

    use super::*;
    use std::fs::{self, Permissions};
    use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, lchown, symlink};
    use std::os::unix::net::UnixListener;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::mpsc;
    use std::time::{Duration, SystemTime};
    use tempfile::TempDir;

    const USER: u32 = 61_234;
    const GROUP: u32 = 61_234;
    const OTHER: u32 = 61_235;

    fn user() -> (Uid, Gid) {
        (Uid::from_raw(USER), Gid::from_raw(GROUP))
    }

    /// A temp dir with `home/` owned by the test user, mode 0755.
    struct Fixture {
        tmp: TempDir,
        home: PathBuf,
    }

    impl Fixture {
        fn new() -> Self {
            Self::with_home_owner(USER, GROUP)
        }

        /// Like /root: home owned by root, 0700.
        fn root_home() -> Self {
            let fx = Self::with_home_owner(0, 0);
            chmod(&fx.home, 0o700);
            fx
        }

        fn with_home_owner(uid: u32, gid: u32) -> Self {
            assert!(
                unistd::geteuid().is_root(),
                "write.rs tests need root (chown, setfsuid)"
            );
            let tmp = TempDir::new().unwrap();
            let home = tmp.path().join("home");
            mkdir(&home, 0o755, uid, gid);
            Fixture { tmp, home }
        }

        /// A path outside the home, in the same temp dir.
        fn outside(&self, name: &str) -> PathBuf {
            self.tmp.path().join(name)
        }

        fn ssh(&self) -> PathBuf {
            self.home.join(".ssh")
        }

        fn keys(&self) -> PathBuf {
            self.home.join(".ssh/authorized_keys")
        }

        /// authorized_keys for the test user, acting as them (the daemon's setup
        /// for a non-root user).
        fn user_spec(&self) -> FileSpec {
            FileSpec {
                path: self.keys(),
                base: self.home.clone(),
                owner: Some(user()),
                act_as: Some(user()),
                file_mode: 0o600,
                dir_mode: 0o700,
            }
        }

        /// authorized_keys for root (no fsuid switch).
        fn root_spec(&self) -> FileSpec {
            FileSpec {
                owner: Some((Uid::from_raw(0), Gid::from_raw(0))),
                act_as: None,
                ..self.user_spec()
            }
        }
    }

    fn mkdir(path: &Path, mode: u32, uid: u32, gid: u32) {
        fs::create_dir(path).unwrap();
        chown(path, Some(uid), Some(gid)).unwrap();
        chmod(path, mode);
    }

    fn put(path: &Path, bytes: &[u8], mode: u32, uid: u32) {
        fs::write(path, bytes).unwrap();
        chown(path, Some(uid), Some(uid)).unwrap();
        chmod(path, mode);
    }

    /// Modes are always set explicitly: the umask test changes the process umask.
    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn set_to(bytes: &'static [u8]) -> impl FnMut(Option<&[u8]>) -> Option<Vec<u8>> {
        move |_| Some(bytes.to_vec())
    }

    /// What block mode does: keep every line, add ours if missing.
    fn add_line(line: &'static str) -> impl FnMut(Option<&[u8]>) -> Option<Vec<u8>> {
        move |current| {
            let mut text = String::from_utf8(current.unwrap_or_default().to_vec()).unwrap();
            if !text.lines().any(|l| l == line) {
                text.push_str(line);
                text.push('\n');
            }
            Some(text.into_bytes())
        }
    }

    /// Another writer (the platform) replaces the file atomically.
    fn replace_as_platform(keys: &Path, bytes: &[u8]) {
        let other = keys.with_file_name("platform.tmp");
        put(&other, bytes, 0o600, USER);
        fs::rename(&other, keys).unwrap();
    }

    fn temps(dir: &Path) -> Vec<String> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".keysync."))
            .collect()
    }

    fn assert_no_temps(dirs: &[&Path]) {
        for dir in dirs {
            assert_eq!(
                temps(dir),
                Vec::<String>::new(),
                "temp files left in {dir:?}"
            );
        }
    }

    fn assert_root_ids() {
        assert_eq!(current_fsuid().as_raw(), 0, "fsuid not restored");
        assert_eq!(current_fsgid(), unistd::getegid(), "fsgid not restored");
    }

    fn permission_denied(err: &WriteError) -> bool {
        matches!(err, WriteError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied)
    }

    #[test]
    fn creates_ssh_dir_and_file_as_the_user() {
        let fx = Fixture::new();
        let out = apply(&fx.user_spec(), &mut set_to(b"ssh-ed25519 AAAA k\n")).unwrap();
        assert_eq!(out, Outcome::Written);
        assert_eq!(fs::read(fx.keys()).unwrap(), b"ssh-ed25519 AAAA k\n");
        for (path, mode) in [(fx.ssh(), 0o700), (fx.keys(), 0o600)] {
            let meta = fs::symlink_metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (USER, GROUP), "{path:?}");
            assert_eq!(meta.mode() & 0o7777, mode, "{path:?}");
        }
        assert_no_temps(&[&fx.ssh()]);
        assert_root_ids();
    }

    #[test]
    fn as_root_chowns_created_dir_and_file_to_the_owner() {
        let fx = Fixture::new();
        let spec = FileSpec {
            act_as: None,
            ..fx.user_spec()
        };
        assert_eq!(apply(&spec, &mut set_to(b"k\n")).unwrap(), Outcome::Written);
        for path in [fx.ssh(), fx.keys()] {
            let meta = fs::symlink_metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (USER, GROUP), "{path:?}");
        }
        assert_eq!(mode_of(&fx.ssh()), 0o700);
        assert_eq!(mode_of(&fx.keys()), 0o600);
    }

    #[test]
    fn identical_bytes_touch_nothing() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        put(&fx.keys(), b"k\n", 0o600, USER);
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        File::options()
            .write(true)
            .open(fx.keys())
            .unwrap()
            .set_modified(old)
            .unwrap();
        let before = fs::metadata(fx.keys()).unwrap();

        let mut seen = None;
        let out = apply(&fx.user_spec(), &mut |cur| {
            seen = cur.map(<[u8]>::to_vec);
            Some(b"k\n".to_vec())
        })
        .unwrap();

        assert_eq!(out, Outcome::Unchanged);
        assert_eq!(seen.as_deref(), Some(&b"k\n"[..]));
        let after = fs::metadata(fx.keys()).unwrap();
        assert_eq!(after.modified().unwrap(), old);
        assert_eq!(
            (after.ino(), after.ctime(), after.ctime_nsec()),
            (before.ino(), before.ctime(), before.ctime_nsec())
        );
        assert_no_temps(&[&fx.ssh()]);
    }

    #[test]
    fn empty_content_creates_an_empty_file() {
        let fx = Fixture::new();
        assert_eq!(
            apply(&fx.user_spec(), &mut set_to(b"")).unwrap(),
            Outcome::Written
        );
        assert_eq!(fs::read(fx.keys()).unwrap(), b"");
        assert_eq!(
            apply(&fx.user_spec(), &mut set_to(b"")).unwrap(),
            Outcome::Unchanged
        );
    }

    #[test]
    fn none_removes_an_existing_file() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        put(&fx.keys(), b"k\n", 0o600, USER);
        assert_eq!(
            apply(&fx.user_spec(), &mut |_| None).unwrap(),
            Outcome::Removed
        );
        assert!(!fx.keys().exists());
        assert!(fx.ssh().is_dir());
        assert_no_temps(&[&fx.ssh()]);
        assert_root_ids();
    }

    #[test]
    fn absent_and_none_is_unchanged_and_creates_nothing() {
        let fx = Fixture::new();
        let mut calls = 0;
        let out = apply(&fx.user_spec(), &mut |cur| {
            calls += 1;
            assert_eq!(cur, None);
            None
        })
        .unwrap();
        assert_eq!((out, calls), (Outcome::Unchanged, 1));
        assert!(
            !fx.ssh().exists(),
            "no .ssh for a file that should not exist"
        );
    }

    #[test]
    fn fifo_at_target_is_refused_promptly() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        unistd::mkfifo(&fx.keys(), Mode::from_bits_truncate(0o600)).unwrap();
        let spec = fx.user_spec();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(apply(&spec, &mut set_to(b"k\n")));
        });
        // A blocking open of the FIFO would hang here forever.
        let result = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("apply blocked on a FIFO");
        assert!(
            matches!(result, Err(WriteError::NotARegularFile { .. })),
            "{result:?}"
        );
        assert_eq!(file_type_at(&fx.keys()), SFlag::S_IFIFO);
        assert_no_temps(&[&fx.ssh()]);
    }

    fn file_type_at(path: &Path) -> SFlag {
        let st = stat::lstat(path).unwrap();
        file_type(&st)
    }

    #[test]
    fn directory_at_target_is_refused() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        mkdir(&fx.keys(), 0o700, USER, GROUP);
        let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
        assert!(matches!(err, WriteError::NotARegularFile { .. }), "{err:?}");
        assert!(fx.keys().is_dir());
        assert_no_temps(&[&fx.ssh()]);
    }

    #[test]
    fn socket_at_target_is_refused() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        let _listener = UnixListener::bind(fx.keys()).unwrap();
        let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
        assert!(matches!(err, WriteError::NotARegularFile { .. }), "{err:?}");
        assert_eq!(file_type_at(&fx.keys()), SFlag::S_IFSOCK);
    }

    #[test]
    fn regular_file_at_ssh_is_not_a_directory() {
        let fx = Fixture::new();
        put(&fx.ssh(), b"", 0o600, USER);
        let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
        assert!(
            matches!(err, WriteError::NotADirectory { ref path } if *path == fx.ssh()),
            "{err:?}"
        );
        assert_eq!(fs::read(fx.ssh()).unwrap(), b"");
    }

    #[test]
    fn dangling_user_symlink_at_target_is_refused() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        let dest = fx.outside("planted");
        symlink(&dest, fx.keys()).unwrap();
        lchown(fx.keys(), Some(USER), Some(GROUP)).unwrap();
        for spec in [fx.user_spec(), fx.root_spec()] {
            let err = apply(&spec, &mut set_to(b"k\n")).unwrap_err();
            assert!(
                matches!(err, WriteError::SymlinkRefused { ref path } if *path == fx.keys()),
                "{err:?}"
            );
        }
        assert!(!dest.exists(), "wrote through the user's link");
        assert_eq!(fs::read_link(fx.keys()).unwrap(), dest);
        assert_no_temps(&[&fx.ssh(), fx.tmp.path()]);
    }

    #[test]
    fn user_symlink_to_a_file_elsewhere_is_never_read_or_written() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        let dest = fx.outside("shadow");
        put(&dest, b"secret\n", 0o600, 0);
        let before = fs::metadata(&dest).unwrap();
        symlink(&dest, fx.keys()).unwrap();
        lchown(fx.keys(), Some(USER), Some(GROUP)).unwrap();
        // As root too: running as root is exactly when following would hurt.
        for spec in [fx.user_spec(), fx.root_spec()] {
            let mut calls = 0;
            let err = apply(&spec, &mut |_| {
                calls += 1;
                Some(b"k\n".to_vec())
            })
            .unwrap_err();
            assert!(matches!(err, WriteError::SymlinkRefused { .. }), "{err:?}");
            assert_eq!(calls, 0, "the link's target was read");
        }
        let after = fs::metadata(&dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"secret\n");
        assert_eq!(
            (after.ino(), after.mtime(), after.mtime_nsec()),
            (before.ino(), before.mtime(), before.mtime_nsec())
        );
        assert!(
            fs::symlink_metadata(fx.keys())
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn user_symlink_at_ssh_dir_is_refused() {
        let fx = Fixture::new();
        let elsewhere = fx.outside("elsewhere");
        mkdir(&elsewhere, 0o700, 0, 0);
        symlink(&elsewhere, fx.ssh()).unwrap();
        lchown(fx.ssh(), Some(USER), Some(GROUP)).unwrap();
        for spec in [fx.user_spec(), fx.root_spec()] {
            let err = apply(&spec, &mut set_to(b"k\n")).unwrap_err();
            assert!(
                matches!(err, WriteError::SymlinkRefused { ref path } if *path == fx.ssh()),
                "{err:?}"
            );
        }
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn user_symlink_at_ssh_dir_to_nowhere_is_refused_not_created() {
        let fx = Fixture::new();
        let dest = fx.outside("nowhere");
        symlink(&dest, fx.ssh()).unwrap();
        lchown(fx.ssh(), Some(USER), Some(GROUP)).unwrap();
        let err = apply(&fx.root_spec(), &mut set_to(b"k\n")).unwrap_err();
        assert!(matches!(err, WriteError::SymlinkRefused { .. }), "{err:?}");
        assert!(!dest.exists());
    }

    #[test]
    fn root_symlink_at_ssh_to_root_dir_is_followed() {
        let fx = Fixture::root_home();
        let elsewhere = fx.outside("root-ssh");
        mkdir(&elsewhere, 0o700, 0, 0);
        symlink(&elsewhere, fx.ssh()).unwrap();
        let out = apply(&fx.root_spec(), &mut set_to(b"k\n")).unwrap();
        assert_eq!(out, Outcome::Written);
        assert_eq!(fs::read(elsewhere.join("authorized_keys")).unwrap(), b"k\n");
        assert_eq!(mode_of(&elsewhere.join("authorized_keys")), 0o600);
        assert_eq!(
            fs::read_link(fx.ssh()).unwrap(),
            elsewhere,
            "the link is kept"
        );
        assert_no_temps(&[&elsewhere]);
    }

    #[test]
    fn root_symlink_at_ssh_to_the_users_own_dir_is_followed_as_the_user() {
        let fx = Fixture::new();
        let elsewhere = fx.outside("user-ssh");
        mkdir(&elsewhere, 0o700, USER, GROUP);
        // Relative link text resolves from the link's directory, as the kernel does.
        symlink("../user-ssh", fx.ssh()).unwrap();
        assert_eq!(
            apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap(),
            Outcome::Written
        );
        let meta = fs::metadata(elsewhere.join("authorized_keys")).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (USER, 0o600));
    }

    #[test]
    fn dangling_root_symlink_at_ssh_is_an_error_and_creates_nothing() {
        let fx = Fixture::root_home();
        let dest = fx.outside("missing");
        symlink(&dest, fx.ssh()).unwrap();
        let err = apply(&fx.root_spec(), &mut set_to(b"k\n")).unwrap_err();
        assert!(matches!(err, WriteError::Io { .. }), "{err:?}");
        assert!(!dest.exists());
    }

    #[test]
    fn chain_of_root_symlinks_at_target_is_followed() {
        let fx = Fixture::root_home();
        let dest = root_keys_link(&fx, 0o600);
        // authorized_keys -> authorized_keys2 -> ../../keys/root
        fs::rename(fx.keys(), fx.ssh().join("authorized_keys2")).unwrap();
        symlink("authorized_keys2", fx.keys()).unwrap();
        assert_eq!(
            apply(&fx.root_spec(), &mut add_line("ours")).unwrap(),
            Outcome::Written
        );
        assert_eq!(fs::read(&dest).unwrap(), b"platform-key\nours\n");
        assert!(
            fs::symlink_metadata(fx.ssh().join("authorized_keys2"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn root_symlink_at_ssh_to_group_writable_dir_is_bad_permissions() {
        let fx = Fixture::root_home();
        let elsewhere = fx.outside("shared");
        mkdir(&elsewhere, 0o775, 0, 0);
        symlink(&elsewhere, fx.ssh()).unwrap();
        let err = apply(&fx.root_spec(), &mut set_to(b"k\n")).unwrap_err();
        assert!(matches!(err, WriteError::BadPermissions { .. }), "{err:?}");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn root_symlink_at_ssh_to_someone_elses_dir_is_bad_permissions() {
        let fx = Fixture::new();
        let elsewhere = fx.outside("other");
        // 0755, so the user can open it and the rule (not the kernel) refuses.
        mkdir(&elsewhere, 0o755, OTHER, OTHER);
        symlink(&elsewhere, fx.ssh()).unwrap();
        let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
        assert!(matches!(err, WriteError::BadPermissions { .. }), "{err:?}");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    /// A root home whose authorized_keys is a root-owned link to /<tmp>/keys/root.
    fn root_keys_link(fx: &Fixture, file_mode: u32) -> PathBuf {
        mkdir(&fx.ssh(), 0o700, 0, 0);
        let keys_dir = fx.outside("keys");
        mkdir(&keys_dir, 0o700, 0, 0);
        let dest = keys_dir.join("root");
        put(&dest, b"platform-key\n", file_mode, 0);
        symlink("../../keys/root", fx.keys()).unwrap();
        dest
    }

    #[test]
    fn root_symlink_at_target_is_written_through_and_kept() {
        let fx = Fixture::root_home();
        let dest = root_keys_link(&fx, 0o600);
        let out = apply(&fx.root_spec(), &mut add_line("ours")).unwrap();
        assert_eq!(out, Outcome::Written);
        assert_eq!(fs::read(&dest).unwrap(), b"platform-key\nours\n");
        assert_eq!(mode_of(&dest), 0o600);
        assert_eq!(
            fs::read_link(fx.keys()).unwrap(),
            Path::new("../../keys/root")
        );
        assert_no_temps(&[&fx.ssh(), dest.parent().unwrap()]);
        // And reading through it sees our line: nothing more to do.
        assert_eq!(
            apply(&fx.root_spec(), &mut add_line("ours")).unwrap(),
            Outcome::Unchanged
        );
    }

    #[test]
    fn root_symlink_at_target_in_the_same_dir_is_followed() {
        let fx = Fixture::root_home();
        mkdir(&fx.ssh(), 0o700, 0, 0);
        symlink("authorized_keys.real", fx.keys()).unwrap();
        assert_eq!(
            apply(&fx.root_spec(), &mut set_to(b"k\n")).unwrap(),
            Outcome::Written
        );
        assert_eq!(
            fs::read(fx.ssh().join("authorized_keys.real")).unwrap(),
            b"k\n"
        );
        assert!(
            fs::symlink_metadata(fx.keys())
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn root_symlink_at_target_to_world_writable_file_is_bad_permissions() {
        let fx = Fixture::root_home();
        let dest = root_keys_link(&fx, 0o666);
        let err = apply(&fx.root_spec(), &mut add_line("ours")).unwrap_err();
        assert!(
            matches!(err, WriteError::BadPermissions { ref path, .. } if path.ends_with("keys/root")),
            "{err:?}"
        );
        assert_eq!(fs::read(&dest).unwrap(), b"platform-key\n");
    }

    #[test]
    fn root_symlink_at_target_removal_removes_the_destination_and_keeps_the_link() {
        let fx = Fixture::root_home();
        let dest = root_keys_link(&fx, 0o600);
        assert_eq!(
            apply(&fx.root_spec(), &mut |_| None).unwrap(),
            Outcome::Removed
        );
        assert!(!dest.exists());
        assert!(
            fs::symlink_metadata(fx.keys())
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn change_before_rename_is_reread_and_the_foreign_line_survives() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        put(&fx.keys(), b"a\n", 0o600, USER);
        let keys = fx.keys();
        let mut hooks = 0;
        let mut seen = Vec::new();
        let mut merge = add_line("ours");
        let out = apply_with_hook(
            &fx.user_spec(),
            &mut |cur| {
                seen.push(cur.map(<[u8]>::to_vec));
                merge(cur)
            },
            &mut || {
                hooks += 1;
                if hooks == 1 {
                    replace_as_platform(&keys, b"a\nforeign\n");
                }
            },
        )
        .unwrap();
        assert_eq!(out, Outcome::Written);
        assert_eq!(fs::read(fx.keys()).unwrap(), b"a\nforeign\nours\n");
        assert_eq!(
            seen,
            vec![Some(b"a\n".to_vec()), Some(b"a\nforeign\n".to_vec())]
        );
        assert_eq!(hooks, 2);
        assert_eq!(mode_of(&fx.keys()), 0o600);
        assert_no_temps(&[&fx.ssh()]);
    }

    #[test]
    fn in_place_append_before_rename_is_noticed() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        put(&fx.keys(), b"a\n", 0o600, USER);
        let keys = fx.keys();
        let mut first = true;
        let out = apply_with_hook(&fx.user_spec(), &mut add_line("ours"), &mut || {
            if std::mem::take(&mut first) {
                // `echo foreign >> authorized_keys`: same inode, new size and mtime.
                let mut f = File::options().append(true).open(&keys).unwrap();
                f.write_all(b"foreign\n").unwrap();
            }
        })
        .unwrap();
        assert_eq!(out, Outcome::Written);
        assert_eq!(fs::read(fx.keys()).unwrap(), b"a\nforeign\nours\n");
    }

    #[test]
    fn target_that_never_stops_changing_gives_up() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        let keys = fx.keys();
        let mut n = 0;
        let mut calls = 0;
        let err = apply_with_hook(
            &fx.user_spec(),
            &mut |cur| {
                calls += 1;
                add_line("ours")(cur)
            },
            &mut || {
                n += 1;
                replace_as_platform(&keys, format!("foreign {n}\n").as_bytes());
            },
        )
        .unwrap_err();
        assert!(matches!(err, WriteError::Raced { .. }), "{err:?}");
        assert_eq!(calls, MAX_RETRIES + 1);
        assert_eq!(
            fs::read_to_string(fx.keys()).unwrap(),
            format!("foreign {n}\n")
        );
        assert_no_temps(&[&fx.ssh()]);
        assert_root_ids();
    }

    #[test]
    fn change_before_removal_is_reread() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        put(&fx.keys(), b"ours\n", 0o600, USER);
        let keys = fx.keys();
        let mut first = true;
        // Drop our line; remove the file when nothing else is left.
        let mut drop_ours = |cur: Option<&[u8]>| {
            let text = String::from_utf8(cur?.to_vec()).unwrap();
            let rest: String = text
                .lines()
                .filter(|l| *l != "ours")
                .map(|l| format!("{l}\n"))
                .collect();
            (!rest.is_empty()).then(|| rest.into_bytes())
        };
        let out = apply_with_hook(&fx.user_spec(), &mut drop_ours, &mut || {
            if std::mem::take(&mut first) {
                replace_as_platform(&keys, b"ours\nforeign\n");
            }
        })
        .unwrap();
        assert_eq!(out, Outcome::Written);
        assert_eq!(fs::read(fx.keys()).unwrap(), b"foreign\n");
    }

    #[test]
    fn user_cannot_write_into_a_root_owned_ssh_dir() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o755, 0, 0);
        let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
        assert!(permission_denied(&err), "{err:?}");
        assert!(!fx.keys().exists());
        assert_no_temps(&[&fx.ssh()]);
        assert_root_ids();
        // The same as root succeeds: the refusal came from acting as the user.
        let spec = FileSpec {
            act_as: None,
            ..fx.user_spec()
        };
        assert_eq!(apply(&spec, &mut set_to(b"k\n")).unwrap(), Outcome::Written);
    }

    #[test]
    fn user_cannot_create_ssh_in_a_home_they_cannot_write() {
        let fx = Fixture::with_home_owner(0, 0);
        let err = apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap_err();
        assert!(permission_denied(&err), "{err:?}");
        assert!(!fx.ssh().exists());
        assert_root_ids();
    }

    #[test]
    fn callbacks_run_with_normal_credentials_and_a_panic_cleans_up() {
        let fx = Fixture::new();
        let mut fsuid_in_desired = None;
        let result = catch_unwind(AssertUnwindSafe(|| {
            apply_with_hook(
                &fx.user_spec(),
                &mut |_| {
                    fsuid_in_desired = Some(current_fsuid().as_raw());
                    Some(b"k\n".to_vec())
                },
                &mut || {
                    assert_eq!(current_fsuid().as_raw(), 0);
                    panic!("hook panics after the temp file is written");
                },
            )
        }));
        assert!(result.is_err());
        assert_eq!(fsuid_in_desired, Some(0));
        assert_root_ids();
        assert!(!fx.keys().exists());
        assert_no_temps(&[&fx.ssh()]);
    }

    #[test]
    fn stale_temp_files_are_removed_and_nothing_else() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        let ssh = fx.ssh();
        put(&ssh.join(".keysync.x"), b"half", 0o600, USER);
        mkdir(&ssh.join(".keysync.dir"), 0o700, USER, GROUP);
        put(&ssh.join(".keysyncx"), b"", 0o600, USER);
        put(&ssh.join("id_ed25519"), b"", 0o600, USER);
        symlink("/etc/passwd", ssh.join(".keysync.link")).unwrap();
        // A temp another thread is writing right now is not stale.
        in_flight().insert(b".keysync.busy".to_vec());
        put(&ssh.join(".keysync.busy"), b"", 0o600, USER);

        assert_eq!(
            apply(&fx.user_spec(), &mut set_to(b"k\n")).unwrap(),
            Outcome::Written
        );

        in_flight().remove(&b".keysync.busy"[..]);
        assert!(!ssh.join(".keysync.x").exists());
        let mut left = temps(&ssh);
        left.sort();
        assert_eq!(left, [".keysync.busy", ".keysync.dir", ".keysync.link"]);
        assert!(ssh.join(".keysyncx").exists() && ssh.join("id_ed25519").exists());
    }

    #[test]
    fn umask_does_not_change_the_modes() {
        for mask in [0o077, 0o022] {
            let fx = Fixture::new();
            let spec = FileSpec {
                path: fx.home.join("a/b/file"),
                file_mode: 0o664,
                dir_mode: 0o775,
                ..fx.user_spec()
            };
            let old = stat::umask(Mode::from_bits_truncate(mask));
            let result = apply(&spec, &mut set_to(b"k\n"));
            stat::umask(old);
            assert_eq!(result.unwrap(), Outcome::Written, "umask {mask:o}");
            assert_eq!(mode_of(&fx.home.join("a")), 0o775, "umask {mask:o}");
            assert_eq!(mode_of(&fx.home.join("a/b")), 0o775, "umask {mask:o}");
            assert_eq!(mode_of(&spec.path), 0o664, "umask {mask:o}");
        }
    }

    #[test]
    fn cache_file_in_the_state_dir_gets_its_group_and_mode() {
        let fx = Fixture::with_home_owner(0, 0);
        let spec = FileSpec {
            path: fx.home.join("users/alice.keys"),
            base: fx.home.clone(),
            owner: Some((Uid::from_raw(0), Gid::from_raw(GROUP))),
            act_as: None,
            file_mode: 0o640,
            dir_mode: 0o750,
        };
        assert_eq!(apply(&spec, &mut set_to(b"")).unwrap(), Outcome::Written);
        for (path, mode) in [(fx.home.join("users"), 0o750), (spec.path.clone(), 0o640)] {
            let meta = fs::symlink_metadata(&path).unwrap();
            assert_eq!(
                (meta.uid(), meta.gid(), meta.mode() & 0o7777),
                (0, GROUP, mode),
                "{path:?}"
            );
        }
    }

    #[test]
    fn paths_not_below_base_are_refused() {
        let fx = Fixture::new();
        let cases = [
            fx.home.join("../etc/passwd"),
            fx.home.join(".ssh/../../x"),
            fx.outside("elsewhere/authorized_keys"),
            fx.home.clone(),
            PathBuf::from("relative/authorized_keys"),
        ];
        for path in cases {
            let spec = FileSpec {
                path: path.clone(),
                ..fx.user_spec()
            };
            let err = apply(&spec, &mut set_to(b"k\n")).unwrap_err();
            assert!(
                matches!(err, WriteError::PathOutsideBase { .. }),
                "{path:?}: {err:?}"
            );
        }
        assert_eq!(
            fs::read_dir(fx.tmp.path()).unwrap().count(),
            1,
            "only home/"
        );
    }

    #[test]
    fn oversized_file_is_refused_not_read() {
        let fx = Fixture::new();
        mkdir(&fx.ssh(), 0o700, USER, GROUP);
        put(&fx.keys(), b"", 0o600, USER);
        // Sparse: no 16 MiB actually written.
        File::options()
            .write(true)
            .open(fx.keys())
            .unwrap()
            .set_len(MAX_FILE_SIZE + 1)
            .unwrap();
        let mut calls = 0;
        let err = apply(&fx.user_spec(), &mut |_| {
            calls += 1;
            None
        })
        .unwrap_err();
        assert!(
            matches!(err, WriteError::TooLarge { size, .. } if size == MAX_FILE_SIZE + 1),
            "{err:?}"
        );
        assert_eq!(calls, 0);
        assert_eq!(fs::metadata(fx.keys()).unwrap().len(), MAX_FILE_SIZE + 1);
    }

    #[test]
    fn missing_base_is_an_io_error() {
        let fx = Fixture::new();
        let spec = FileSpec {
            base: fx.outside("gone"),
            path: fx.outside("gone/.ssh/authorized_keys"),
            ..fx.user_spec()
        };
        let err = apply(&spec, &mut set_to(b"k\n")).unwrap_err();
        assert!(
            matches!(
                err,
                WriteError::Io {
                    op: "open base directory",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!fx.outside("gone").exists());
    }
}
