//! A real OpenSSH world for login tests and benchmarks: accounts made with
//! `useradd`, client keys from `ssh-keygen`, the hook binary installed where
//! sshd accepts an AuthorizedKeysCommand, a private `sshd` on 127.0.0.1 and
//! the `ssh` client. Everything made is removed on drop.
//!
//! The same helpers as in tests/sshd.rs (which predates this module), kept
//! here so the refresh tests and the login benchmark share one copy. Needs
//! root (useradd, sshd); [`can_run`] says whether the test can go on.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::agent::{bin, eventually, is_root};

pub const SSHD: &str = "/usr/sbin/sshd";

/// True when the test can run; false (after a loud message) when it must
/// be skipped on a developer machine. Under CI it panics instead.
pub fn can_run(test: &str) -> bool {
    let missing = if !is_root() {
        Some("it must run as root (useradd, sshd)")
    } else if !Path::new(SSHD).exists() {
        Some("openssh-server is not installed (/usr/sbin/sshd)")
    } else {
        None
    };
    let Some(why) = missing else { return true };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}; under CI this test must run");
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: {why} !!!!!!!!\n");
    false
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// useradd/usermod/userdel lock /etc/passwd; tests in one binary run in
/// parallel, so they take turns, and retry when another process holds it.
static ACCOUNTS: Mutex<()> = Mutex::new(());

fn account_command(program: &str, args: &[&str]) -> Output {
    let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = None;
    eventually(Duration::from_secs(20), || {
        let out = Command::new(program).args(args).output().expect(program);
        // 1 is "cannot lock /etc/passwd; try again later" (and other
        // update failures); anything else is final.
        let retry = out.status.code() == Some(1);
        last = Some(out);
        !retry
    });
    last.expect("ran at least once")
}

/// A real account, removed with its home on drop.
pub struct LoginUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl LoginUser {
    /// `useradd -m` with a home under /home and a shell, unlocked for
    /// public-key logins (password `*`: no password works, the account is
    /// not locked, which sshd checks without PAM).
    pub fn login(name: &str) -> LoginUser {
        Self::create(name, &["-m", "-s", "/bin/sh"]);
        let out = account_command("usermod", &["-p", "*", name]);
        assert!(out.status.success(), "usermod -p: {}", text(&out.stderr));
        Self::lookup(name)
    }

    /// A user with no home and no shell in group root: the stand-in for the
    /// packaged `keysync` user, which reads the caches and reaches the
    /// health socket through its group (here root: without a `keysync`
    /// group the caches are root:root 0640 and the socket root:root 0660).
    pub fn hook(name: &str) -> LoginUser {
        Self::create(name, &["-M", "-s", "/usr/sbin/nologin", "-G", "root"]);
        Self::lookup(name)
    }

    fn create(name: &str, flags: &[&str]) {
        let mut args = flags.to_vec();
        args.push(name);
        let mut out = account_command("useradd", &args);
        if out.status.code() == Some(9) {
            // Left over from a crashed run with the same pid.
            let _ = account_command("userdel", &["-r", name]);
            out = account_command("useradd", &args);
        }
        assert!(
            out.status.success(),
            "useradd {args:?}: {}",
            text(&out.stderr)
        );
    }

    fn lookup(name: &str) -> LoginUser {
        let user = nix::unistd::User::from_name(name)
            .expect("getpwnam")
            .unwrap_or_else(|| panic!("{name} was just created"));
        LoginUser {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        }
    }
}

impl Drop for LoginUser {
    fn drop(&mut self) {
        let out = account_command("userdel", &["-r", &self.name]);
        if !out.status.success() {
            eprintln!("warning: userdel -r {}: {}", self.name, text(&out.stderr));
        }
    }
}

/// An ed25519 client key made by ssh-keygen.
pub struct ClientKey {
    pub private: PathBuf,
    /// The `.pub` line: `ssh-ed25519 AAAA… <comment>`.
    pub public: String,
}

pub fn client_key(dir: &Path, name: &str) -> ClientKey {
    let private = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C"])
        .arg(format!("{name}@keysync-test"))
        .arg("-f")
        .arg(&private)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {}", text(&out.stderr));
    let public = std::fs::read_to_string(private.with_extension("pub")).expect("read .pub");
    ClientKey {
        private,
        public: public.trim_end().to_string(),
    }
}

/// The AuthorizedKeysCommand binary. sshd refuses a command unless it and
/// every parent directory are root-owned and not group/world-writable, which
/// rules out /tmp (1777) and possibly the cargo target dir: the binary is
/// linked (or copied) into a fresh 0755 directory under /run.
pub struct HookBinary {
    dir: tempfile::TempDir,
}

impl HookBinary {
    pub fn install() -> HookBinary {
        Self::install_from(&bin())
    }

    pub fn install_from(built: &Path) -> HookBinary {
        let dir = tempfile::Builder::new()
            .prefix("keysync-akc-")
            .tempdir_in("/run")
            .expect("tempdir in /run");
        chmod(dir.path(), 0o755);
        let path = dir.path().join("keysync");
        let meta = std::fs::metadata(built).expect("stat the built binary");
        use std::os::unix::fs::MetadataExt;
        let safe = meta.uid() == 0 && meta.mode() & 0o022 == 0;
        // A hard link shares the (root-owned, 0755) inode and costs nothing;
        // across file systems, or with unsafe modes, copy.
        if !(safe && std::fs::hard_link(built, &path).is_ok()) {
            std::fs::copy(built, &path).expect("copy the binary");
            chmod(&path, 0o755);
        }
        HookBinary { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("keysync")
    }
}

/// An sshd_config for one login user, with `keys` (the AuthorizedKeysFile
/// and AuthorizedKeysCommand lines) appended. Makes the host key in `dir`.
pub fn sshd_config(dir: &Path, login_user: &str, keys: &str) -> String {
    let host_key = dir.join("ssh_host_ed25519_key");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .output()
        .expect("ssh-keygen host key");
    assert!(
        out.status.success(),
        "ssh-keygen host key: {}",
        text(&out.stderr)
    );
    format!(
        "ListenAddress 127.0.0.1\n\
         HostKey {host_key}\n\
         PidFile {pid}\n\
         StrictModes yes\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         PermitRootLogin no\n\
         AllowUsers {login_user}\n\
         LogLevel DEBUG1\n\
         {keys}",
        host_key = host_key.display(),
        pid = dir.join("sshd.pid").display(),
    )
}

/// A private sshd, stopped on drop.
pub struct Sshd {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Sshd {
    /// Starts `sshd -D -e` with `config` (its `Port` comes from `-p`) and
    /// waits until it listens. A port taken between picking and binding is
    /// retried with another.
    pub fn start(dir: &Path, config: &str) -> Sshd {
        std::fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd (privilege separation)");
        let config_path = dir.join("sshd_config");
        std::fs::write(&config_path, config).expect("write sshd_config");
        let log = dir.join("sshd.log");
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("pick a port")
                .port();
            let log_file = std::fs::File::create(&log).expect("sshd log");
            // sshd re-executes itself per connection: it needs its absolute path.
            let mut child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(&config_path)
                .arg("-p")
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .expect("spawn sshd");
            let listening = format!("Server listening on 127.0.0.1 port {port}");
            let mut exited = false;
            eventually(Duration::from_secs(20), || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&listening))
            });
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
            if !exited && last_log.contains(&listening) {
                return Sshd { child, port, log };
            }
            let _ = child.kill();
            let _ = child.wait();
            if !last_log.contains("Address already in use") {
                break;
            }
        }
        panic!("sshd did not start:\n{last_log}");
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `ssh … USER@127.0.0.1 true` with only `key`, no config files, no
    /// agent, no prompts; and how long it took. Fails the test if it has
    /// not finished after 60 s.
    pub fn ssh(&self, user: &str, key: &ClientKey) -> (Output, Duration) {
        let started = Instant::now();
        let mut child = Command::new("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(&key.private)
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "PreferredAuthentications=publickey",
                "-o",
                "ConnectTimeout=20",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(format!("{user}@127.0.0.1"))
            .arg("true")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ssh");
        let finished = eventually(Duration::from_secs(60), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        let took = started.elapsed();
        if !finished {
            let _ = child.kill();
        }
        let out = child.wait_with_output().expect("wait for ssh");
        assert!(
            finished,
            "ssh did not finish within 60 s\nsshd log:\n{}",
            self.log_tail()
        );
        (out, took)
    }

    /// Logs in with `key`; returns how long the login took.
    pub fn assert_logs_in(&mut self, user: &str, key: &ClientKey, why: &str) -> Duration {
        let (out, took) = self.ssh(user, key);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{why}: expected `ssh -i {}` to log in (exit 0), got {:?}\nssh: {}\nsshd log:\n{}",
            key.private.display(),
            out.status,
            text(&out.stderr),
            self.log_tail()
        );
        took
    }

    /// Asserts sshd refuses `key`; returns how long the refusal took.
    pub fn assert_refused(&mut self, user: &str, key: &ClientKey, why: &str) -> Duration {
        let (out, took) = self.ssh(user, key);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(255),
            "{why}: expected ssh to be refused (exit 255, \"Permission denied\"), got {:?}\nssh: {stderr}\nsshd log:\n{}",
            out.status,
            self.log_tail()
        );
        // 255 is also what ssh returns when it cannot connect at all: only
        // an authentication refusal by a live sshd counts.
        assert!(
            stderr.contains("Permission denied (publickey)"),
            "{why}: ssh exited 255 but not with an authentication refusal: {stderr}\nsshd log:\n{}",
            self.log_tail()
        );
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "{why}: sshd died\n{}",
            self.log_tail()
        );
        took
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
