//! The agent's observable state: what `/status`, `/readyz`, `/metrics`,
//! `keysync status` and systemd's `STATUS=` report (DESIGN.md §8).
//!
//! The loops update one shared [`Status`] behind a mutex (updates are rare
//! and tiny, so contention is not a concern) and the metrics registry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch, as JSON numbers.
pub fn unix_now() -> f64 {
    to_unix(SystemTime::now())
}

pub fn to_unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The whole status document (`GET /status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// Unix time the agent started.
    pub started_at: f64,
    pub uptime_seconds: f64,
    pub config: ConfigStatus,
    pub sources: BTreeMap<String, SourceStatus>,
    pub users: BTreeMap<String, UserStatus>,
    /// One line for an operator, also sent as systemd `STATUS=`.
    pub summary: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub path: PathBuf,
    pub loaded_at: f64,
    pub last_reload_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SourceStatus {
    pub kind: String,
    /// `poll` or `subscribe`.
    pub mode: String,
    pub last_attempt: Option<f64>,
    pub last_success: Option<f64>,
    pub last_error: Option<String>,
    pub etag: Option<String>,
    pub key_count: usize,
    /// A good answer is known (fresh or persisted).
    pub has_answer: bool,
    /// Whether the subscription stream is connected (subscribe mode).
    #[serde(default)]
    pub stream_connected: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserStatus {
    pub path: Option<PathBuf>,
    pub write_mode: String,
    pub fingerprints: Vec<String>,
    pub last_write: Option<f64>,
    pub drift_repairs: u64,
    pub last_error: Option<String>,
    /// Waiting for sources, or for the confirmation of a mass removal.
    pub pending: Option<String>,
}

impl Status {
    /// Ready: every source has a good answer and no user failed its last write.
    pub fn readiness(&self) -> Result<(), String> {
        let missing: Vec<&str> = self
            .sources
            .iter()
            .filter(|(_, s)| !s.has_answer)
            .map(|(n, _)| n.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(format!("no good answer yet from source(s): {}", missing.join(", ")));
        }
        let failed: Vec<String> = self
            .users
            .iter()
            .filter_map(|(n, u)| u.last_error.as_ref().map(|e| format!("{n}: {e}")))
            .collect();
        if !failed.is_empty() {
            return Err(format!("user write failed: {}", failed.join("; ")));
        }
        Ok(())
    }

    /// Recomputes the one-line summary.
    pub fn summarize(&mut self) {
        let keys: usize = self.users.values().map(|u| u.fingerprints.len()).sum();
        let failing: Vec<&str> = self
            .sources
            .iter()
            .filter(|(_, s)| s.last_error.is_some())
            .map(|(n, _)| n.as_str())
            .collect();
        let last = self
            .sources
            .values()
            .filter_map(|s| s.last_success)
            .fold(None, |acc: Option<f64>, t| Some(acc.map_or(t, |a| a.max(t))));
        let since = match last {
            Some(t) => format!("last success {:.0}s ago", (unix_now() - t).max(0.0)),
            None => "no success yet".to_string(),
        };
        self.summary = match self.readiness() {
            Ok(()) if failing.is_empty() => {
                format!("in sync: {keys} key(s) for {} user(s), {since}", self.users.len())
            }
            Ok(()) => format!(
                "serving last good keys ({keys}); failing source(s): {}; {since}",
                failing.join(", ")
            ),
            Err(why) => format!("not ready: {why}"),
        };
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    pub source: String,
    /// ok, unchanged, empty, error.
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UserLabels {
    pub user: String,
}

/// The Prometheus metrics of DESIGN.md §8, owned by the agent (no globals).
pub struct Metrics {
    pub registry: Registry,
    pub fetch_total: Family<FetchLabels, Counter>,
    pub last_success: Family<SourceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub keys: Family<UserLabels, Gauge>,
    pub writes_total: Family<UserLabels, Counter>,
    pub drift_repairs_total: Family<UserLabels, Counter>,
    pub fetch_duration: Family<SourceLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keysync");
        let fetch_total = Family::<FetchLabels, Counter>::default();
        let last_success = Family::<SourceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let keys = Family::<UserLabels, Gauge>::default();
        let writes_total = Family::<UserLabels, Counter>::default();
        let drift_repairs_total = Family::<UserLabels, Counter>::default();
        let fetch_duration = Family::<SourceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        });
        registry.register("fetch", "Fetches by source and result", fetch_total.clone());
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last good answer per source",
            last_success.clone(),
        );
        registry.register("keys", "Keys managed per user", keys.clone());
        registry.register("writes", "Files written per user", writes_total.clone());
        registry.register(
            "drift_repairs",
            "Managed blocks re-asserted after another writer changed the file",
            drift_repairs_total.clone(),
        );
        registry.register(
            "fetch_duration_seconds",
            "Duration of fetches per source",
            fetch_duration.clone(),
        );
        Metrics {
            registry,
            fetch_total,
            last_success,
            keys,
            writes_total,
            drift_repairs_total,
            fetch_duration,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The handle the loops share.
#[derive(Clone)]
pub struct Shared {
    status: Arc<Mutex<Status>>,
    pub metrics: Arc<Metrics>,
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    pub fn new() -> Self {
        let now = unix_now();
        Shared {
            status: Arc::new(Mutex::new(Status {
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at: now,
                ..Status::default()
            })),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// Locks the status. A panic while holding it cannot leave it
    /// inconsistent in a way that matters for reporting, so poison is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy with uptime and summary freshly computed.
    pub fn snapshot(&self) -> Status {
        let mut s = self.lock().clone();
        s.uptime_seconds = (unix_now() - s.started_at).max(0.0);
        s.summarize();
        s
    }
}
