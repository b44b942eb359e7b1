//! The board the writer publishes on and everyone else reads (DESIGN.md §8):
//! the status document (a `tokio::sync::watch`), the metrics registry and
//! the writer loop's heartbeat, which `/healthz` and readiness follow.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::status::{RefreshStatus, Status, unix_now};

/// How often the writer loop beats when systemd asks for no watchdog.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// The writer loop's heartbeat, which `/healthz` reports on. The writer is
/// the loop that does the work (and sends systemd's `WATCHDOG=1`), so a
/// writer stuck in a write or a deadlock shows up here too.
struct Heartbeat {
    origin: Instant,
    /// Milliseconds since `origin` of the last beat.
    last_ms: AtomicU64,
    /// The writer's beat period in milliseconds.
    period_ms: AtomicU64,
}

impl Heartbeat {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The published status, the metrics and the writer's heartbeat: the
/// writer publishes and beats, everyone else reads.
#[derive(Clone)]
pub struct Board {
    status: Arc<watch::Sender<Status>>,
    pub metrics: Arc<Metrics>,
    heartbeat: Arc<Heartbeat>,
}

impl Default for Board {
    fn default() -> Self {
        Self::new()
    }
}

impl Board {
    pub fn new() -> Self {
        let (status, _) = watch::channel(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: unix_now(),
            ..Status::default()
        });
        Board {
            status: Arc::new(status),
            metrics: Arc::new(Metrics::default()),
            // Start-up counts as a beat: the writer starts after the state is restored.
            heartbeat: Arc::new(Heartbeat {
                origin: Instant::now(),
                last_ms: AtomicU64::new(0),
                period_ms: AtomicU64::new(millis(DEFAULT_HEARTBEAT)),
            }),
        }
    }

    /// Replaces the status document (the writer only). The start time,
    /// version and refresh counts stay the board's.
    pub fn publish(&self, mut status: Status) {
        self.status.send_modify(|current| {
            status.version.clone_from(&current.version);
            status.started_at = current.started_at;
            status.refresh = std::mem::take(&mut current.refresh);
            *current = status;
        });
    }

    /// Replaces the login-triggered refresh counts (the writer only).
    pub(crate) fn publish_refresh(&self, refresh: RefreshStatus) {
        self.status.send_if_modified(|current| {
            let changed = current.refresh != refresh;
            current.refresh = refresh;
            changed
        });
    }

    /// A copy with uptime and summary freshly computed.
    pub fn snapshot(&self) -> Status {
        let mut s = self.status.borrow().clone();
        s.uptime_seconds = (unix_now() - s.started_at).max(0.0);
        s.summarize();
        s
    }

    /// A receiver that sees every publication, for the metrics exporters.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// The metrics text for the current snapshot (see [`Metrics::text`]).
    pub fn metrics_text(&self, openmetrics: bool) -> String {
        let status = self.status.borrow().clone();
        self.metrics.text(&status, openmetrics)
    }

    /// The writer loop is alive and will beat again within `period`.
    pub fn beat(&self, period: Duration) {
        self.heartbeat
            .period_ms
            .store(millis(period), Ordering::Relaxed);
        self.heartbeat
            .last_ms
            .store(self.heartbeat.now_ms(), Ordering::Relaxed);
    }

    /// What `/readyz` and `keysync status --check` answer: the writer loop
    /// is alive, every source has a good answer and no user's write failed.
    /// A hung agent is not ready, even though its last state looked fine.
    pub fn ready(&self) -> Result<(), String> {
        self.liveness()?;
        self.snapshot().readiness()
    }

    /// Ok while the writer loop beats on time. Three missed beats (plus a
    /// second of slack for a loaded machine) count as stalled.
    pub fn liveness(&self) -> Result<(), String> {
        let period = self.heartbeat.period_ms.load(Ordering::Relaxed);
        let last = self.heartbeat.last_ms.load(Ordering::Relaxed);
        let age = self.heartbeat.now_ms().saturating_sub(last);
        if age > period.saturating_mul(3).saturating_add(1000) {
            return Err(format!(
                "the writer loop is stalled: last heartbeat {:.1}s ago, expected every {:.1}s",
                age as f64 / 1000.0,
                period as f64 / 1000.0
            ));
        }
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{SourceKindName, SourceMode, SourceStatus};

    #[test]
    fn a_writer_that_stops_beating_is_reported() {
        let board = Board::new();
        board.beat(Duration::from_millis(10));
        assert!(board.liveness().is_ok());
        // Last beat 5 s ago with a 10 ms period: past three periods plus
        // the second of slack.
        let stale = Board {
            heartbeat: Arc::new(Heartbeat {
                origin: Instant::now() - Duration::from_secs(5),
                last_ms: AtomicU64::new(0),
                period_ms: AtomicU64::new(10),
            }),
            ..board
        };
        let why = stale.liveness().unwrap_err();
        assert!(why.contains("stalled"), "{why}");
        // Ready by its status, but a stalled writer is not ready.
        assert!(stale.snapshot().readiness().is_ok());
        assert!(stale.ready().unwrap_err().contains("stalled"));
    }

    #[test]
    fn publishing_keeps_the_start_time() {
        let board = Board::new();
        let started = board.snapshot().started_at;
        let mut status = Status::default();
        status.sources.insert(
            "a".into(),
            SourceStatus {
                mode: SourceMode::Subscribe,
                kind: SourceKindName::Http,
                ..SourceStatus::default()
            },
        );
        board.publish(status);
        let snap = board.snapshot();
        assert_eq!(snap.started_at, started);
        assert_eq!(snap.sources["a"].mode, SourceMode::Subscribe);
    }
}
