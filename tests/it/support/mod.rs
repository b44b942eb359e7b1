//! What the integration tests share: the fake control plane, a scratch
//! world per test with the real binary in it, and one of each helper the
//! tests used to copy into every file. Below, the few generic ones: waiting,
//! leaving the runtime, skipping what cannot run here, and failure messages.

pub mod agent;
pub mod block;
pub mod config;
pub mod env;
pub mod fake_cp;
pub mod files;
pub mod http;
pub mod metrics;
pub mod nginx;
pub mod notify;
pub mod raw_http;
pub mod scenario;
pub mod sshd;
pub mod users;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Generous deadline for "eventually" conditions on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

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

/// Runs a blocking test body (the binary, ssh, file polls) off the runtime
/// that serves the fake control plane, and re-raises its panic so the
/// assertion message is the test's own.
pub async fn blocking<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(body).await {
        Ok(value) => value,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("test body did not finish: {e}"),
        },
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether `test` can run here: `missing` names what it lacks, if anything.
/// Without it the test is skipped loudly on a developer machine; under CI
/// (which installs everything and runs as root) it fails instead.
pub fn can_run(test: &str, missing: Option<&str>) -> bool {
    let Some(why) = missing else { return true };
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {why}; under CI this test must run"
    );
    eprintln!("\n!!!!! {test}: SKIPPED, {why} !!!!!\n");
    false
}

/// For tests that need root (users, chown, mounts, sshd).
pub fn require_root(test: &str) -> bool {
    can_run(test, (!is_root()).then_some("it needs root"))
}

/// Runs `cmd` with stdout and stderr captured for up to `within` and kills
/// it after that; returns whether it exited in time, and what it printed.
pub fn output_within(cmd: &mut Command, within: Duration) -> (bool, Output) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let exited = eventually(within, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
    }
    (
        exited,
        child.wait_with_output().expect("wait for the child"),
    )
}

/// A sorted copy, for comparing key sets.
pub fn sorted(keys: &[String]) -> Vec<String> {
    let mut v = keys.to_vec();
    v.sort();
    v
}

/// The last 40 lines of a log above debug level, for failure messages.
pub fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Bytes (a process's output) as text, for messages and comparisons.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The name of the user running the tests: a user the agent can write for
/// without root (a file in a scratch directory, the hook's cache).
pub fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .expect("the current user has a passwd entry")
}
