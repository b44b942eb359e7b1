//! systemd notifications (sd_notify(3), DESIGN.md §8) through the sd-notify
//! crate: `READY=1` once, `STATUS=` kept current, `WATCHDOG=1` from the
//! writer loop, `STOPPING=1` at shutdown. Silent without `NOTIFY_SOCKET`, as
//! in a container.
//!
//! The daemon is given its [`Notifier`] by the caller (`run`), so tests in
//! this crate drive the real loop with a notifier that records what it would
//! have sent; tests of the binary set `NOTIFY_SOCKET` for the agent they
//! start, as systemd does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;

#[derive(Clone)]
enum Sink {
    /// `$NOTIFY_SOCKET`, read by sd-notify at each send.
    Systemd,
    /// Nowhere (no service manager).
    Silent,
    /// In memory, one string per notification (`KEY=value` lines).
    Record(Arc<Mutex<Vec<String>>>),
}

/// Where notifications go, and whether the service manager wants watchdog pings.
#[derive(Clone)]
pub struct Notifier {
    sink: Sink,
    watchdog: Option<Duration>,
    ready: Arc<AtomicBool>,
}

impl Notifier {
    /// From systemd's environment: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` when
    /// `WATCHDOG_PID` is unset or names this process.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        match socket {
            Some(_) => Notifier {
                sink: Sink::Systemd,
                watchdog: sd_notify::watchdog_enabled().filter(|w| !w.is_zero()),
                ready: Arc::default(),
            },
            None => Self::silent(),
        }
    }

    /// A notifier that sends nothing (`run --once`, containers).
    pub fn silent() -> Self {
        Notifier {
            sink: Sink::Silent,
            watchdog: None,
            ready: Arc::default(),
        }
    }

    /// A notifier that keeps every message, and asks for pings every
    /// `watchdog / 2` when `watchdog` is given: for in-process tests.
    pub fn recording(watchdog: Option<Duration>) -> (Self, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::<Mutex<Vec<String>>>::default();
        let notifier = Notifier {
            sink: Sink::Record(seen.clone()),
            watchdog,
            ready: Arc::default(),
        };
        (notifier, seen)
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        match &self.sink {
            Sink::Silent => {}
            Sink::Systemd => {
                if let Err(e) = sd_notify::notify(states) {
                    tracing::debug!(error = %e, "cannot notify systemd: {e}");
                }
            }
            Sink::Record(seen) => {
                let text: String = states.iter().map(|s| format!("{s}\n")).collect();
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(text);
            }
        }
    }

    /// READY=1, once, with the current status line.
    pub fn ready(&self, status: &str) {
        if !self.ready.swap(true, Ordering::SeqCst) {
            let status = one_line(status);
            self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        }
    }

    /// Whether READY=1 was sent.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn status(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Status(&status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// Half of `WATCHDOG_USEC`, when the service manager asked for pings.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }
}

/// A notification is newline-separated `KEY=value` lines.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_sent_once_and_status_is_one_line() {
        let (n, seen) = Notifier::recording(Some(Duration::from_secs(30)));
        n.ready("a\nb");
        n.ready("again");
        n.status("x\ry");
        n.watchdog();
        n.stopping();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "READY=1\nSTATUS=a b\n",
                "STATUS=x y\n",
                "WATCHDOG=1\n",
                "STOPPING=1\n"
            ]
        );
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        assert!(n.is_ready());
    }

    #[test]
    fn a_silent_notifier_asks_for_no_pings() {
        let n = Notifier::silent();
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x");
        assert!(n.is_ready());
    }
}
