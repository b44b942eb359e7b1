//! A running `keysync run` (started by [`TestEnv::spawn`](super::env::TestEnv::spawn)):
//! its pid and log, signals, and a stop that waits for the exit. Dropping
//! it kills the process, also when the test fails half way.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running agent. Dropping it stops it.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    /// Spawns `cmd` with stdout discarded and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Agent {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        cmd.stdout(Stdio::null()).stderr(file);
        let child = cmd.spawn().expect("spawn keysync");
        Agent {
            child: Some(child),
            log,
        }
    }

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

    /// The end of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        super::log_tail(&self.log_text())
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
