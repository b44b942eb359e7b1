//! Real, unprivileged accounts for tests that need a user's home (symlink
//! rules, fsuid writes): created with useradd, removed on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl TestUser {
    /// A new user named `<prefix>-<random>` with `home`; `create_home`:
    /// useradd -m, else the home does not exist. The home should lie in the
    /// test's temp dir, which removes it.
    pub fn create(prefix: &str, home: PathBuf, create_home: bool) -> TestUser {
        let name = format!("{prefix}-{:08x}", fastrand::u32(..));
        let mut last = String::new();
        // useradd takes a lock on /etc/passwd; parallel tests may hold it a moment.
        for _ in 0..50 {
            let out = Command::new("useradd")
                .args([
                    if create_home { "-m" } else { "-M" },
                    "-s",
                    "/usr/sbin/nologin",
                    "-d",
                ])
                .arg(&home)
                .arg(&name)
                .output()
                .expect("run useradd");
            if out.status.success() {
                let user = nix::unistd::User::from_name(&name)
                    .ok()
                    .flatten()
                    .expect("new user in passwd");
                return TestUser {
                    name,
                    uid: user.uid.as_raw(),
                    gid: user.gid.as_raw(),
                    home,
                };
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("useradd {name} failed: {last}");
    }

    /// Gives `path` (not what a link points to) to this user.
    pub fn chown(&self, path: &Path) {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("lchown {}: {e}", path.display()));
    }

    pub fn ssh(&self) -> PathBuf {
        self.home.join(".ssh")
    }

    pub fn keys(&self) -> PathBuf {
        self.home.join(".ssh/authorized_keys")
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // Take planted links out first, so no cleanup can follow them.
        for link in [self.keys(), self.ssh()] {
            if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
                let _ = std::fs::remove_file(&link);
            }
        }
        for _ in 0..50 {
            let out = Command::new("userdel").arg(&self.name).output();
            let gone = nix::unistd::User::from_name(&self.name)
                .ok()
                .flatten()
                .is_none();
            if gone || out.is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not remove test user {}", self.name);
    }
}
