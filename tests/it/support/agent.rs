//! Running the real `keysync` binary in tests: a scratch directory with a
//! config, a state dir, a health socket and a target file, and a handle to
//! a running daemon that is stopped (SIGTERM, then SIGKILL) on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keysync"))
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
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

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env("KEYSYNC_TEST_API_KEY", "test-token")
            .env("KEYSYNC_LOG", "debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null());
        cmd
    }

    /// `keysync run --once` with this env's config.
    pub fn run_once(&self) -> Output {
        let config = self.config_path();
        self.command(&[
            "run",
            "--once",
            "--config",
            config.to_str().expect("utf-8 path"),
        ])
        .output()
        .expect("run keysync")
    }

    /// Starts `keysync run` in the background; its stderr goes to `<dir>/agent.log`.
    pub fn spawn(&self) -> Agent {
        self.spawn_with(|_| {})
    }

    /// Like [`TestEnv::spawn`], letting the caller adjust the command (env vars).
    pub fn spawn_with(&self, adjust: impl FnOnce(&mut Command)) -> Agent {
        let config = self.config_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("agent.log"))
            .expect("log file");
        let mut cmd = self.command(&["run", "--config", config.to_str().expect("utf-8 path")]);
        cmd.stdout(Stdio::null()).stderr(log);
        adjust(&mut cmd);
        let child = cmd.spawn().expect("spawn keysync");
        Agent {
            child: Some(child),
            log: self.path().join("agent.log"),
        }
    }

    /// The target file's content, if it exists.
    pub fn read_target(&self) -> Option<String> {
        std::fs::read_to_string(self.target()).ok()
    }

    /// The hook cache of a user.
    pub fn cache(&self, user: &str) -> Option<String> {
        std::fs::read_to_string(self.state_dir().join("users").join(format!("{user}.keys"))).ok()
    }
}

/// A running agent. Dropping it stops it.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// SIGTERM, then waits up to `within` for the exit; SIGKILL after that.
    /// Returns the exit status and how long the stop took.
    pub fn stop(self, within: Duration) -> (ExitStatus, Duration) {
        self.stop_with(nix::sys::signal::Signal::SIGTERM, within)
    }

    /// Like [`Agent::stop`] with another signal (e.g. SIGINT).
    pub fn stop_with(
        mut self,
        sig: nix::sys::signal::Signal,
        within: Duration,
    ) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("child");
        let started = Instant::now();
        // An agent that already exited (and may have been reaped by `alive`)
        // must not be signalled: its pid may belong to someone else by now.
        if let Ok(Some(status)) = child.try_wait() {
            return (status, started.elapsed());
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return (status, started.elapsed());
            }
            if started.elapsed() > within {
                let _ = child.kill();
                let status = child.wait().expect("wait");
                return (status, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL now.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` every 20 ms until it holds or `timeout` passes. For
/// "eventually" conditions; the timeout is generous, never a performance claim.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
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

/// The keys (lines) inside the managed block of a file's content.
pub fn block_keys(content: &str) -> Vec<String> {
    let mut inside = false;
    let mut keys = Vec::new();
    for line in content.lines() {
        if line.starts_with("# BEGIN keysync managed keys") {
            inside = true;
        } else if line.starts_with("# END keysync managed keys") {
            inside = false;
        } else if inside {
            keys.push(line.to_string());
        }
    }
    keys
}

/// Runs a blocking test body off the runtime that serves the fake control
/// plane, re-raising its panic so the assertion message is the test's.
pub async fn blocking(body: impl FnOnce() + Send + 'static) {
    if let Err(e) = tokio::task::spawn_blocking(body).await {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("test body did not finish: {e}"),
        }
    }
}

/// For tests that need root (users, chown, mounts): true when root. Under
/// CI a non-root run fails; elsewhere the test is skipped loudly.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root, and CI is set"
    );
    eprintln!("\n!!!!! {test}: SKIPPED, needs root (runs as root under CI) !!!!!\n");
    false
}
