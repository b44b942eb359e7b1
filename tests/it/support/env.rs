//! The real `keysync` binary in a scratch world: [`TestEnv`] is a temp
//! directory with a config, a state dir, a health socket and a target file,
//! and the commands a test runs against them (`run --once`, `run` in the
//! background, `status`). Every command runs without systemd's variables,
//! so the agent is in container mode unless a test sets them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::agent::Agent;
use super::block::block_keys;

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keysync"))
}

/// `keysync ARGS…`, not run yet: no stdin, no systemd in the environment.
pub fn keysync_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null());
    cmd
}

/// `keysync ARGS…`, run to the end.
pub fn keysync(args: &[&str]) -> Output {
    keysync_cmd(args).output().expect("run keysync")
}

/// A `run --once` that has not exited by then hangs (the tests' timeouts are seconds).
const HANG: Duration = Duration::from_secs(60);

/// How a watched `run --once` ended.
pub struct OnceResult {
    pub code: i32,
    pub stderr: String,
    /// Peak resident memory of the process, in KiB.
    pub max_rss_kib: i64,
}

/// A scratch world for one agent.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("keysync-test.")
            .tempdir()
            .expect("tempdir");
        TestEnv { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn config_path(&self) -> PathBuf {
        self.path().join("config.toml")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }
    pub fn socket(&self) -> PathBuf {
        self.path().join("health.sock")
    }
    /// The default target file of [`Config::vast`](super::config::Config::vast): `<dir>/home/.ssh/authorized_keys`.
    pub fn target(&self) -> PathBuf {
        self.path().join("home/.ssh/authorized_keys")
    }

    /// Writes the config file: a [`Config`](super::config::Config) or plain text.
    pub fn write_config(&self, config: impl std::fmt::Display) {
        std::fs::write(self.config_path(), config.to_string()).expect("write config");
    }

    /// `keysync ARGS…` as the agent of this env runs: the API key in env
    /// `KEYSYNC_TEST_API_KEY`, logs at debug level.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = keysync_cmd(args);
        cmd.env("KEYSYNC_TEST_API_KEY", "test-token")
            .env("KEYSYNC_LOG", "debug");
        cmd
    }

    fn config_arg(&self) -> String {
        self.config_path().to_str().expect("utf-8 path").to_string()
    }

    /// `keysync run --once` with this env's config.
    pub fn run_once(&self) -> Output {
        self.command(&["run", "--once", "--config", &self.config_arg()])
            .output()
            .expect("run keysync")
    }

    /// [`run_once`](Self::run_once) as (exit code, stderr).
    pub fn run_once_exit(&self) -> (i32, String) {
        let out = self.run_once();
        (out.status.code().unwrap_or(-1), super::text(&out.stderr))
    }

    /// `keysync run --once` at info level, reaped with wait4 for its own
    /// peak RSS; a run that outlives [`HANG`] is killed and reported as hung.
    pub fn run_once_watched(&self) -> OnceResult {
        let stderr_path = self.path().join(format!("once-{}.log", fastrand::u64(..)));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = self
            .command(&["run", "--once", "--config", &self.config_arg()])
            .env("KEYSYNC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn keysync");
        let pid = child.id() as i32;
        let started = Instant::now();
        let mut status = 0;
        // SAFETY: rusage is plain old data; zeroed is a valid value.
        let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
        // The child's own high-water mark (VmHWM of its memory after exec),
        // read while it runs: wait4's ru_maxrss also counts the memory of
        // this (large, multi-test) process from before the child's exec.
        let mut peak_kib = 0i64;
        let hwm = |pid: i32| -> Option<i64> {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        loop {
            if let Some(kib) = hwm(pid) {
                peak_kib = peak_kib.max(kib);
            }
            // SAFETY: pid is our own child, not yet reaped (std's Child never
            // waits unless asked); status and usage are valid out-pointers.
            let reaped =
                unsafe { nix::libc::wait4(pid, &mut status, nix::libc::WNOHANG, &mut usage) };
            if reaped == pid {
                break;
            }
            assert!(reaped == 0, "wait4: {}", std::io::Error::last_os_error());
            if started.elapsed() > HANG {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                // SAFETY: as above.
                unsafe { nix::libc::wait4(pid, &mut status, 0, &mut usage) };
                panic!(
                    "run --once hung for {HANG:?}:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(child);
        let code = if nix::libc::WIFEXITED(status) {
            nix::libc::WEXITSTATUS(status)
        } else {
            -1
        };
        OnceResult {
            code,
            stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
            max_rss_kib: if peak_kib > 0 {
                peak_kib
            } else {
                usage.ru_maxrss
            },
        }
    }

    /// Starts `keysync run` in the background; its stderr goes to `<dir>/agent.log`.
    pub fn spawn(&self) -> Agent {
        self.spawn_with(|_| {})
    }

    /// Like [`TestEnv::spawn`], letting the caller adjust the command (env vars).
    pub fn spawn_with(&self, adjust: impl FnOnce(&mut Command)) -> Agent {
        let log = self.path().join("agent.log");
        let mut cmd = self.command(&["run", "--config", &self.config_arg()]);
        adjust(&mut cmd);
        Agent::spawn(cmd, log)
    }

    /// The target file's content, if it exists.
    pub fn read_target(&self) -> Option<String> {
        std::fs::read_to_string(self.target()).ok()
    }

    /// The keys in the target's managed block (none while there is no file).
    pub fn block_keys(&self) -> Vec<String> {
        block_keys(&self.read_target().unwrap_or_default())
    }

    /// The hook cache of a user.
    pub fn cache(&self, user: &str) -> Option<String> {
        std::fs::read_to_string(self.state_dir().join("users").join(format!("{user}.keys"))).ok()
    }

    /// `keysync status --socket <this env's socket> ARGS…`.
    pub fn status(&self, args: &[&str]) -> Output {
        let socket = self.socket();
        let mut all = vec!["status", "--socket", socket.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        keysync(&all)
    }

    /// `keysync status --json`, parsed; fails the test when the agent does
    /// not answer.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.status(&["--json"]);
        assert!(out.status.success(), "keysync status --json: {out:?}");
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// `keysync status --json`, or Null while the agent does not answer.
    pub fn try_status_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.status(&["--json"]).stdout).unwrap_or(serde_json::Value::Null)
    }
}
