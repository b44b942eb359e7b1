//! A private `sshd` on 127.0.0.1 for tests whose outcome is a real login:
//! the sshd itself, client keys from `ssh-keygen`, and the hook binary
//! installed where sshd accepts an `AuthorizedKeysCommand`. Needs root
//! (sshd, useradd); [`can_run`] says loudly when a test cannot run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::env::bin;
use super::files::chmod;
use super::users::TestUser;
use super::{eventually, is_root, log_tail, output_within, text};

pub const SSHD: &str = "/usr/sbin/sshd";

/// True when the test can run here: as root, with sshd installed.
pub fn can_run(test: &str) -> bool {
    let missing = if !is_root() {
        Some("it must run as root (useradd, sshd)")
    } else if !Path::new(SSHD).exists() {
        Some("openssh-server is not installed (/usr/sbin/sshd)")
    } else {
        None
    };
    crate::support::can_run(test, missing)
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
    pub dir: tempfile::TempDir,
}

impl HookBinary {
    pub fn install() -> HookBinary {
        let dir = tempfile::Builder::new()
            .prefix("keysync-akc-")
            .tempdir_in("/run")
            .expect("tempdir in /run");
        chmod(dir.path(), 0o755);
        // As the packages install them: the front binary as bin/keysync,
        // the agent binary as libexec/keysync/keysync.
        for sub in ["bin", "libexec", "libexec/keysync"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir in the hook dir");
            chmod(&dir.path().join(sub), 0o755);
        }
        let front = PathBuf::from(env!("CARGO_BIN_EXE_keysync-front"));
        place(&front, &dir.path().join("bin/keysync"));
        place(&bin(), &dir.path().join("libexec/keysync/keysync"));
        HookBinary { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("bin/keysync")
    }
}

/// Puts the built binary `built` at `path`, 0755 and root's.
fn place(built: &Path, path: &Path) {
    let meta = std::fs::metadata(built).expect("stat the built binary");
    use std::os::unix::fs::MetadataExt;
    let safe = meta.uid() == 0 && meta.mode() & 0o022 == 0;
    // A hard link shares the (root-owned, 0755) inode and costs nothing;
    // across file systems, or with unsafe modes, copy.
    if !(safe && std::fs::hard_link(built, path).is_ok()) {
        std::fs::copy(built, path).expect("copy the binary");
        chmod(path, 0o755);
    }
}

/// The parts of a login through the hook: a login user, the user the hook
/// runs as, the installed binary, and a directory for client keys. The
/// hook user reaches the state dir and the socket through group root, so
/// `dir` becomes 0750.
pub struct LoginRig {
    pub user: TestUser,
    pub hook_user: TestUser,
    pub binary: HookBinary,
    keys: PathBuf,
}

impl LoginRig {
    /// Users named `name` and `{name}k`.
    pub fn new(dir: &Path, name: &str) -> LoginRig {
        chmod(dir, 0o750);
        let user = TestUser::login_user(name);
        let hook_user = TestUser::hook_user(&format!("{name}k"));
        let keys = dir.join("client-keys");
        std::fs::create_dir(&keys).expect("mkdir client-keys");
        LoginRig {
            user,
            hook_user,
            binary: HookBinary::install(),
            keys,
        }
    }

    pub fn key(&self, name: &str) -> ClientKey {
        client_key(&self.keys, name)
    }

    /// The sshd lines that run the hook with `%u`, or `%u %f` with
    /// `fingerprint` (and `--socket`, when given, for the login-triggered
    /// refresh).
    pub fn hook_lines(&self, state_dir: &Path, socket: Option<&Path>, fingerprint: bool) -> String {
        let socket = socket.map_or(String::new(), |s| format!(" --socket {}", s.display()));
        let fpr = if fingerprint { " %f" } else { "" };
        format!(
            "AuthorizedKeysCommand {} authorized-keys --state-dir {}{socket} %u{fpr}\n\
             AuthorizedKeysCommandUser {}\n",
            self.binary.path().display(),
            state_dir.display(),
            self.hook_user.name,
        )
    }
}

/// A private sshd, stopped on drop.
pub struct Sshd {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
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
        log_tail(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// `ssh … USER@127.0.0.1 true` with only `key`, no config files, no
    /// agent, no prompts. Fails the test if it has not finished after 60 s.
    pub fn ssh(&self, user: &str, key: &ClientKey) -> Output {
        let mut ssh = Command::new("ssh");
        ssh.args(["-F", "/dev/null", "-i"])
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
            .stdin(Stdio::null());
        let (finished, out) = output_within(&mut ssh, Duration::from_secs(60));
        assert!(
            finished,
            "ssh did not finish within 60 s\nsshd log:\n{}",
            self.log_tail()
        );
        out
    }

    /// Asserts that `ssh` logs in; how long it took.
    pub fn assert_logs_in(&mut self, user: &str, key: &ClientKey, why: &str) -> Duration {
        let started = Instant::now();
        let out = self.ssh(user, key);
        let took = started.elapsed();
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

    /// Asserts that `ssh` is refused by a live sshd; how long it took.
    pub fn assert_refused(&mut self, user: &str, key: &ClientKey, why: &str) -> Duration {
        let started = Instant::now();
        let out = self.ssh(user, key);
        let took = started.elapsed();
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

/// An sshd config for `login_user` on 127.0.0.1 with a fresh host key in
/// `dir`, StrictModes on, public keys only; `keys` says where keys come
/// from (`AuthorizedKeysFile …`, `AuthorizedKeysCommand …`).
pub fn base_config(dir: &Path, login_user: &str, keys: &str) -> String {
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
