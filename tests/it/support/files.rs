//! File-system helpers of the tests: what "the file was not touched" means,
//! modes and owners set the way an administrator would, and the writer's
//! leftover temporary files.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What "unchanged" means: same bytes, same inode, same mtime. A file that
/// was rewritten with the same bytes, or replaced by a rename, is changed.
#[derive(Debug, PartialEq, Eq)]
pub struct FileState {
    bytes: Vec<u8>,
    ino: u64,
    mtime: SystemTime,
}

impl FileState {
    /// The state of `path` itself (a link is not followed).
    pub fn of(path: &Path) -> FileState {
        let meta =
            std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        FileState {
            bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            ino: meta.ino(),
            mtime: meta.modified().expect("mtime"),
        }
    }
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Gives `path` (not what a link points to) to `uid:gid`.
pub fn lchown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("lchown {}: {e}", path.display()));
}

/// The permission bits of `path` (following links).
pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every `.keysync.*` file below `dir` (the writer's temporary files).
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(".keysync.") {
            found.push(path.clone());
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(temp_files(&path));
        }
    }
    found
}
