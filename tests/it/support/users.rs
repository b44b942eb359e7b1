//! Real accounts for tests that need a user's home (symlink rules, fsuid
//! writes, sshd logins): created with useradd, removed with userdel on drop.
//!
//! useradd, usermod and userdel lock /etc/passwd and /etc/group. The tests
//! of this binary run in parallel, so they take turns ([`ACCOUNTS`]), and
//! retry while another process (a test binary elsewhere) holds the lock.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use super::{eventually, text};

/// One account command at a time in this process.
static ACCOUNTS: Mutex<()> = Mutex::new(());

/// Runs an account command; exit 1 and 10 ("cannot lock /etc/passwd" or
/// /etc/group, "try again later") are retried for up to 20 s.
fn account_command(program: &str, args: &[&str]) -> Output {
    let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = None;
    eventually(Duration::from_secs(20), || {
        let out = Command::new(program).args(args).output().expect(program);
        let retry = matches!(out.status.code(), Some(1 | 10));
        last = Some(out);
        !retry
    });
    last.expect("ran at least once")
}

pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// `userdel -r` on drop: the home is the user's own (under /home).
    remove_home: bool,
}

impl TestUser {
    /// A new user named `<prefix>-<random>` with `home` and no login shell;
    /// `create_home`: useradd -m, else the home does not exist. The home
    /// should lie in the test's temp dir, which removes it.
    pub fn create(prefix: &str, home: PathBuf, create_home: bool) -> TestUser {
        let name = format!("{prefix}-{:08x}", fastrand::u32(..));
        let home_arg = home.to_str().expect("utf-8 home");
        let flag = if create_home { "-m" } else { "-M" };
        Self::add(&name, &[flag, "-s", "/usr/sbin/nologin", "-d", home_arg]);
        let user = Self::lookup(&name, false);
        assert_eq!(user.home, home, "useradd -d");
        user
    }

    /// `useradd -m` with a normal home under /home and a shell, unlocked
    /// for public-key logins (password `*`: no password works, the account
    /// is not locked, which sshd checks without PAM).
    pub fn login_user(name: &str) -> TestUser {
        Self::add(name, &["-m", "-s", "/bin/sh"]);
        let out = account_command("usermod", &["-p", "*", name]);
        assert!(out.status.success(), "usermod -p: {}", text(&out.stderr));
        Self::lookup(name, true)
    }

    /// A user with no home and no shell that may read root-group files: the
    /// stand-in for the packaged `keysync` user, whose group owns the caches
    /// (here the caches are root:root 0640, as without a keysync group).
    pub fn hook_user(name: &str) -> TestUser {
        Self::add(name, &["-M", "-s", "/usr/sbin/nologin", "-G", "root"]);
        Self::lookup(name, false)
    }

    fn add(name: &str, flags: &[&str]) {
        let mut args = flags.to_vec();
        args.push(name);
        let mut out = account_command("useradd", &args);
        if out.status.code() == Some(9) {
            // Left over from a crashed run with the same name.
            let _ = account_command("userdel", &["-r", name]);
            out = account_command("useradd", &args);
        }
        assert!(
            out.status.success(),
            "useradd {args:?}: {}",
            text(&out.stderr)
        );
    }

    fn lookup(name: &str, remove_home: bool) -> TestUser {
        let user = nix::unistd::User::from_name(name)
            .expect("getpwnam")
            .unwrap_or_else(|| panic!("{name} was just created"));
        TestUser {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
            remove_home,
        }
    }

    /// Gives `path` (not what a link points to) to this user.
    pub fn chown(&self, path: &Path) {
        super::files::lchown(path, self.uid, self.gid);
    }

    pub fn ssh(&self) -> PathBuf {
        self.home.join(".ssh")
    }

    pub fn keys(&self) -> PathBuf {
        self.home.join(".ssh/authorized_keys")
    }

    /// Writes `~/.ssh/<file>` the way the user would by hand: .ssh 0700 and
    /// the file 0600, both owned by the user.
    pub fn write_by_hand(&self, file: &str, content: &str) {
        let ssh = self.ssh();
        std::fs::create_dir_all(&ssh).expect("mkdir .ssh");
        let path = ssh.join(file);
        std::fs::write(&path, content).expect("write by hand");
        for (p, mode) in [(&ssh, 0o700), (&path, 0o600)] {
            super::files::chmod(p, mode);
            self.chown(p);
        }
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
        let args: &[&str] = if self.remove_home {
            &["-r", &self.name]
        } else {
            &[&self.name]
        };
        let out = account_command("userdel", args);
        let gone = nix::unistd::User::from_name(&self.name)
            .ok()
            .flatten()
            .is_none();
        if !gone || (self.remove_home && !out.status.success()) {
            eprintln!("warning: userdel {args:?}: {}", text(&out.stderr));
        }
    }
}
