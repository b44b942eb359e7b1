//! A private `sshd` on 127.0.0.1 and a real login user, for tests that ask
//! OpenSSH itself whether a line keysync wrote lets a key in. Included with
//! `#[path = "support/sshd.rs"] mod sshd;` by the tests that need it (the
//! same harness as tests/sshd.rs, which predates it).
//!
//! Needs root (useradd, sshd). [`can_run`] says loudly when a test cannot
//! run; under CI it fails instead.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";

/// True when the test can run; false (after a loud message) when it must
/// be skipped on a developer machine. Under CI it panics instead.
pub fn can_run(test: &str) -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// useradd and friends, retried while another process holds /etc/passwd's
/// lock (exit 1).
fn account_command(program: &str, args: &[&str]) -> Output {
    let mut last = None;
    eventually(Duration::from_secs(20), || {
        let out = Command::new(program).args(args).output().expect(program);
        let retry = out.status.code() == Some(1);
        last = Some(out);
        !retry
    });
    last.expect("ran at least once")
}

/// A real account with a home under /home, removed with it on drop.
pub struct LoginUser {
    pub name: String,
    pub home: PathBuf,
}

impl LoginUser {
    /// `useradd -m` with a shell, unlocked for public-key logins (password
    /// `*`: no password works, the account is not locked).
    pub fn create(name: &str) -> LoginUser {
        let args = ["-m", "-s", "/bin/sh", name];
        let mut out = account_command("useradd", &args);
        if out.status.code() == Some(9) {
            // Left over from a crashed run with the same pid.
            let _ = account_command("userdel", &["-r", name]);
            out = account_command("useradd", &args);
        }
        assert!(out.status.success(), "useradd: {}", text(&out.stderr));
        let out = account_command("usermod", &["-p", "*", name]);
        assert!(out.status.success(), "usermod -p: {}", text(&out.stderr));
        let user = nix::unistd::User::from_name(name)
            .expect("getpwnam")
            .unwrap_or_else(|| panic!("{name} was just created"));
        LoginUser {
            name: name.to_string(),
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

impl ClientKey {
    pub fn create(dir: &Path, name: &str) -> ClientKey {
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
}

/// A private sshd reading `~/.ssh/authorized_keys` only, stopped on drop.
pub struct Sshd {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Sshd {
    /// Starts `sshd -D -e` in `dir` for `login_user` and waits until it
    /// listens. A port taken between picking and binding is retried.
    pub fn start(dir: &Path, login_user: &str) -> Sshd {
        std::fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd (privilege separation)");
        let host_key = dir.join("ssh_host_ed25519_key");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key)
            .output()
            .expect("ssh-keygen host key");
        assert!(out.status.success(), "host key: {}", text(&out.stderr));
        let config = format!(
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
             AuthorizedKeysFile .ssh/authorized_keys\n",
            host_key = host_key.display(),
            pid = dir.join("sshd.pid").display(),
        );
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `ssh … USER@127.0.0.1 true` with only `key`: no config files, no
    /// agent, no prompts. Fails the test if it has not finished after 60 s.
    pub fn ssh(&self, user: &str, key: &ClientKey) -> Output {
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
        if !finished {
            let _ = child.kill();
        }
        let out = child.wait_with_output().expect("wait for ssh");
        assert!(
            finished,
            "ssh did not finish within 60 s\nsshd log:\n{}",
            self.log_tail()
        );
        out
    }

    pub fn assert_logs_in(&self, user: &str, key: &ClientKey, why: &str) {
        let out = self.ssh(user, key);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{why}: expected `ssh -i {}` to log in (exit 0), got {:?}\nssh: {}\nsshd log:\n{}",
            key.private.display(),
            out.status,
            text(&out.stderr),
            self.log_tail()
        );
    }

    pub fn assert_refused(&mut self, user: &str, key: &ClientKey, why: &str) {
        let out = self.ssh(user, key);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(255),
            "{why}: expected ssh to be refused (exit 255), got {:?}\nssh: {stderr}\nsshd log:\n{}",
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
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
